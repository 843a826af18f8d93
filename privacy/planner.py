"""``fedfer privacy plan``: the noise a school needs for a target ε, and the ε curve over rounds.

The rule is the engine's (privacy/engine.py: q = min(1, batch / declared units), round(1/q) steps per
local epoch, σ calibrated over all rounds), so the plan is what a school will train and record. "units"
is the school's *declared* size from its policy, not its exact count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from privacy.accounting import epsilon_report
from privacy.engine import plan_round, sampling  # noqa: F401  (sampling: the engine's, re-exported)


@dataclass
class Plan:
    target_epsilon: float
    delta: float
    rounds: int
    local_epochs: int
    units: int
    batch: int
    accountant: str
    sample_rate: float
    steps_per_round: int
    total_steps: int
    noise_multiplier: float
    curve: list[dict]        # [{"round", "steps", "epsilon_prv", "epsilon_rdp"}]

    def to_json(self) -> dict:
        return asdict(self)


def curve_rounds(rounds: int, max_points: int) -> list[int]:
    if rounds <= max_points:
        return list(range(1, rounds + 1))
    picks = {1, rounds} | {round(1 + i * (rounds - 1) / (max_points - 1)) for i in range(max_points)}
    return sorted(picks)


def make_plan(target_epsilon: float, delta: float, rounds: int, local_epochs: int, units: int, batch: int,
              accountant: str = "prv", max_points: int = 12) -> Plan:
    if units < 1 or batch < 1:
        raise ValueError(f"need at least one unit and a batch of at least one (got {units} units, batch {batch})")
    dp = plan_round(unit="image", declared_units=units, units_per_batch=batch, local_epochs=local_epochs,
                    rounds=rounds, target_epsilon=target_epsilon, delta=delta, noise_multiplier=0.0,
                    max_grad_norm=1.0, accountant=accountant)  # the unit does not change q, steps or σ
    q, per_round, sigma = dp.sample_rate, dp.steps, dp.noise_multiplier
    total = rounds * per_round
    curve = []
    for r in curve_rounds(rounds, max_points):
        hist = [(sigma, q, r * per_round)]
        curve.append({"round": r, "steps": r * per_round, "epsilon_prv": epsilon_report(hist, delta, "prv").epsilon,
                      "epsilon_rdp": epsilon_report(hist, delta, "rdp").epsilon})
    return Plan(target_epsilon, delta, rounds, local_epochs, units, batch, accountant, q, per_round, total, sigma, curve)


def format_plan(plan: Plan) -> str:
    lines = [
        f"target ε {plan.target_epsilon:g} at δ {plan.delta:g} after {plan.rounds} rounds × {plan.local_epochs} local epochs "
        f"({plan.accountant.upper()} accountant)",
        f"units {plan.units}, expected batch {plan.batch} → sample rate q = {plan.sample_rate:.4g}, "
        f"{plan.steps_per_round} steps per round, {plan.total_steps} in all",
        f"noise multiplier σ = {plan.noise_multiplier:.4f}",
        "",
        f"{'round':>5}  {'steps':>6}  {'ε PRV':>8}  {'ε RDP':>8}",
    ]
    for point in plan.curve:
        lines.append(f"{point['round']:>5}  {point['steps']:>6}  {point['epsilon_prv']:>8.3f}  {point['epsilon_rdp']:>8.3f}")
    lines.append("")
    lines.append("ε assumes the school is sampled in every round (the budget guard assumes nothing: it counts what ran).")
    return "\n".join(lines)
