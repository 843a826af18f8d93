"""Empirical privacy audits in one training run: canaries, their scores, and two lower bounds on ε.

m canaries are each included in the training data by an independent fair coin. After (or during)
training the auditor scores every canary — higher means "more likely trained on" — guesses "in" for
the k highest scores and "out" for the k lowest, and abstains on the rest. If training is (ε, δ)-DP the
number of correct guesses cannot be much better than chance at ε, which gives a lower bound on the ε
the training really has. Two estimators turn (m, guesses, correct) into that bound:

* **Steinke, Nasr, Jagielski 2023** ("Privacy Auditing with One (1) Training Run", arXiv 2305.08846,
  Thm 3.1 with Prop 5.2): the correct count v of r guesses is dominated by Binomial(r, e^ε/(1+e^ε))
  up to a δ term, so  p(ε) = P[Binom(r, p_ε) ≥ v] + 2mδ · max_{i=1..v} P[v−i ≤ Binom(r, p_ε) < v]/i.
  It assumes nothing but (ε, δ)-DP.
* **Mahloujifar, Melis, Chaudhuri 2025** ("Auditing f-Differential Privacy in One Run", arXiv
  2410.22235): the same game analysed with a whole trade-off curve f instead of one (ε, δ) point. The
  hypothesis is "the mechanism is μ-GDP with μ = 1/σ(ε, δ)", σ(ε, δ) the analytic-Gaussian noise for
  (ε, δ) (Balle & Wang 2018): the curve of a Gaussian mechanism that just meets the claimed ε at δ.
  Much tighter for Gaussian-noise mechanisms. DP-SGD's curve is not exactly Gaussian; with Poisson
  sampling its privacy-loss tail is heavier than the matching Gaussian's, so in the region a few
  thousand canaries can measure (false-positive rates ≥ 1/m) it lies *above* the GDP curve and the
  test stays conservative — the correct-mechanism audits below check that empirically.

Each estimator uses a guess count k fixed before the scores are seen — planned on a simulation of the
*claimed* mechanism, which looks at no audited score — or the best k of a fixed grid with the
significance split over the grid (Bonferroni); β is also split between the two estimators, so the two
reported bounds hold *jointly* with confidence 1 − β. The reference implementations are
google-deepmind/jax_privacy ``auditing.py`` (``epsilon_one_run``, ``epsilon_one_run_fdp``); this is an
independent numpy/scipy version with guesses on both sides and the corrections above.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import optimize, special, stats


# ------------------------------------------------------------------------------------- Steinke
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of ≥ v correct out of r guesses on m canaries under an (ε, δ)-DP mechanism."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not (0 <= delta <= 1):
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    p = float(special.expit(eps))
    tail = float(stats.binom.sf(v - 1, r, p))          # P[Binom(r, p) >= v]
    if v == 0 or delta == 0:
        return min(1.0, tail)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)   # P[=v-1], P[=v-2], …, P[=0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + alpha * delta * 2 * m)


def _largest_rejected(rejects: Callable[[float], bool], tolerance: float = 1e-4) -> float:
    """Largest ε ≥ 0 with ``rejects(ε)`` true, assuming rejection is monotone (true up to some ε*)."""
    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(hi):
        lo, hi = hi, 2 * hi
        if hi > 512:
            return math.inf
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    return lo


def epsilon_steinke(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """Steinke et al.'s lower bound: the largest ε whose p-value is below β (0 if none)."""
    _check_beta(beta)
    return _largest_rejected(lambda eps: p_value(m, r, v, eps, delta) < beta)


# ------------------------------------------------------------------------------------- f-DP
@lru_cache(maxsize=4096)
def gaussian_sigma(eps: float, delta: float) -> float:
    """Noise σ (sensitivity 1) at which the Gaussian mechanism is exactly (ε, δ)-DP (Balle & Wang
    2018, Thm 8): δ = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ)."""
    if not (eps >= 0 and 0 < delta < 1):
        raise ValueError(f"need eps >= 0 and delta in (0, 1), got {eps}, {delta}")

    def excess_delta(log_sigma: float) -> float:
        s = math.exp(log_sigma)
        return float(special.ndtr(0.5 / s - eps * s) - math.exp(eps + special.log_ndtr(-0.5 / s - eps * s)) - delta)

    return math.exp(optimize.brentq(excess_delta, -20.0, 40.0, xtol=1e-12))


def fdp_rejects(m: int, r: int, v: int, eps: float, delta: float, beta: float) -> bool:
    """Whether v correct of r guesses on m canaries refute μ-GDP with μ = 1/σ(ε, δ) at level β.

    The recursion of Mahloujifar et al. (their capped bound on the probability of each number of
    correct guesses, "audit_rh_with_cap"): it tracks r_i, the mass of runs with ≥ i correct guesses,
    and h_i, the mass with i or fewer among the wrong ones, lowering i from v; each step may only raise
    h to the trade-off curve's inverse at r. If the β-scaled masses cannot fit within the r/m total,
    no μ-GDP mechanism makes v correct guesses with probability β.
    """
    mu = 1.0 / gaussian_sigma(eps, delta)
    correct_mass = beta * v / m
    wrong_mass = beta * (r - v) / m
    for i in range(v - 1, -1, -1):
        lifted = max(wrong_mass, float(special.ndtr(special.ndtri(correct_mass) - mu)))
        if lifted == wrong_mass:
            break  # neither mass can move again
        correct_mass = min(correct_mass + i / (r - i) * (lifted - wrong_mass), 1.0)
        wrong_mass = lifted
    return correct_mass + wrong_mass > r / m


def epsilon_fdp(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """The f-DP (Gaussian trade-off) lower bound: the largest ε the counts refute at level β."""
    _check_beta(beta)
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if v == 0 or not (0 < delta < 1):
        return 0.0
    return _largest_rejected(lambda eps: fdp_rejects(m, r, v, eps, delta, beta))


#: the two one-run estimators, by the name their bounds are reported under (in this order)
ESTIMATORS: dict[str, Callable[[int, int, int, float, float], float]] = {"steinke": epsilon_steinke, "fdp": epsilon_fdp}


def _check_beta(beta: float) -> None:
    if not (0 < beta < 1):
        raise ValueError(f"beta must be in (0, 1), got {beta}")


# ------------------------------------------------------------------------------------- guesses
@dataclass
class OneRunBound:
    estimator: str          # "steinke" or "fdp"
    epsilon: float          # the lower bound on ε
    confidence: float       # joint confidence of the pair of bounds
    canaries: int           # m
    guesses: int            # r at the best k (k "in" + k "out")
    correct: int            # v at the best k
    k: int                  # guesses on each side at the best k
    k_grid: list[int]       # every k tried (the Bonferroni family)
    delta: float

    def to_json(self) -> dict:
        out = asdict(self)
        out["epsilon"] = None if math.isinf(self.epsilon) else self.epsilon
        return out


def bounds_exceed_claim(bounds: Mapping[str, OneRunBound], claimed_epsilon: float) -> bool:
    """The audit's verdict: a lower bound above the ε the trainer claims means the claim is wrong."""
    return any(b.epsilon > claimed_epsilon for b in bounds.values())


def default_k_grid(m: int, points: int = 16) -> list[int]:
    """Guess counts per side, fixed before the scores are seen: geometric from 5 to m/2."""
    if m < 2:
        return []
    top = m // 2
    return sorted({int(k) for k in np.round(np.geomspace(min(5, top), top, points)) if 1 <= k <= top})


def guesses_from_scores(scores: Sequence[float], k_pos: int, k_neg: int) -> np.ndarray:
    """+1 ("in") for the k_pos highest scores, −1 ("out") for the k_neg lowest, 0 abstain."""
    scores = np.asarray(scores, dtype=float)
    if k_pos + k_neg > len(scores):
        raise ValueError(f"{k_pos} + {k_neg} guesses exceed the {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(len(scores), dtype=int)
    if k_neg:
        guesses[order[:k_neg]] = -1
    if k_pos:
        guesses[order[len(scores) - k_pos:]] = 1
    return guesses


def one_run_bounds(scores: Sequence[float], included: Sequence[bool], delta: float, beta: float = 0.05,
                   k_grid: Sequence[int] | None = None,
                   planned_k: dict[str, int] | None = None) -> dict[str, OneRunBound]:
    """Both one-run lower bounds from canary scores (higher = more likely a member) and the coins.

    Each estimator gets β/2, so both bounds hold together with confidence 1 − β. Within that, either
    ``planned_k`` fixes one guess count per estimator *before* the scores are seen (see
    :func:`plan_guesses`: no further correction), or the best of ``k_grid`` (default
    :func:`default_k_grid`) is taken with β/2 split evenly over the grid (Bonferroni).
    """
    _check_beta(beta)
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    scores = np.asarray(scores, dtype=float)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    m = len(scores)
    if m == 0 or len(truth) != m:
        raise ValueError(f"need one score per canary: {m} scores, {len(truth)} inclusion flags")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    out = {}
    for name, estimate in ESTIMATORS.items():
        candidates = [planned_k[name]] if planned_k else (k_grid if k_grid is not None else default_k_grid(m))
        grid = sorted({int(k) for k in candidates if 1 <= 2 * k <= m})
        if not grid:
            raise ValueError(f"too few canaries ({m}) to guess")
        level = beta / 2 / len(grid)
        best = None
        for k in grid:
            guesses = guesses_from_scores(scores, k, k)
            r, v = int(np.count_nonzero(guesses)), int(np.sum(guesses == truth))
            eps = estimate(m, r, v, delta, level)
            if best is None or eps > best[0]:
                best = (eps, k, r, v)
        assert best is not None
        out[name] = OneRunBound(name, best[0], 1 - beta, m, best[2], best[3], best[1], grid, delta)
    return out


def plan_guesses(simulate: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]], delta: float,
                 beta: float = 0.05, seed: int = 12345, points: int = 24) -> dict[str, int]:
    """The guess count per estimator that works best on the *claimed* mechanism, found on a simulation of
    it (``simulate(rng)`` → scores, coins) — never on the audited scores, so choosing it costs no
    correction. It is the best k for the claimed mechanism, not for one that leaks more."""
    scores, included = simulate(np.random.default_rng(seed))
    m = len(scores)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    counts = []
    for k in default_k_grid(m, points):
        guesses = guesses_from_scores(scores, k, k)
        counts.append((k, int(np.count_nonzero(guesses)), int(np.sum(guesses == truth))))
    plan = {}
    for name, estimate in ESTIMATORS.items():
        plan[name] = max(counts, key=lambda c: estimate(m, c[1], c[2], delta, beta / 2))[0]
    return plan


# ------------------------------------------------------------------------------------- white box
SCORES = ("sum", "likelihood")


def canary_scores(observed: np.ndarray, statistic: str = "sum", noise_multiplier: float = 0.0,
                  sample_rate: float = 1.0) -> np.ndarray:
    """Scores from the observed per-step updates on the canary coordinates.

    ``observed`` (steps, m): each step's privatised gradient on canary i's coordinate, in units of the
    clip norm and signed so that a sampled canary adds +1 (plus N(0, σ²) noise).
    ``sum``: the dot product of the canary gradient with the updates summed over steps (Steinke et al.).
    ``likelihood``: Σ_t log((1−q) + q·exp((2z_t − 1)/(2σ²))), the per-step likelihood ratio of
    "the canary was in the data" under the claimed (σ, q): the Neyman–Pearson test for a correct
    mechanism, stronger than the sum when q < 1.
    """
    z = np.asarray(observed, dtype=float)
    if statistic == "sum" or sample_rate >= 1.0 or noise_multiplier <= 0:
        return z.sum(axis=0)
    if statistic != "likelihood":
        raise ValueError(f"score must be one of {SCORES}, got {statistic!r}")
    log_ratio = (2 * z - 1) / (2 * noise_multiplier ** 2)
    # log((1-q) + q e^a) computed without overflow
    return np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + log_ratio).sum(axis=0)


@dataclass
class WhiteBoxAudit:
    """One white-box audit of the student-level trainer: what ran, what it claims, what was proved."""
    mechanism: str                 # "correct" or the name of a deliberate bug
    claimed_epsilon: float         # the accountant's ε from what the trainer recorded (inf without noise)
    delta: float
    bounds: dict[str, OneRunBound]
    noise_multiplier: float        # recorded σ
    sample_rate: float             # recorded q
    steps: int
    canaries: int
    included: int
    frames_per_canary: int
    base_students: int
    score: str
    seconds: float
    mean_score_in: float
    mean_score_out: float
    randomness: str                # "secure" (the CSPRNG draws a school trains with) or "reproducible"
    settings: dict
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)      # per canary
    membership: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)  # the coins

    @property
    def bound_above_claim(self) -> bool:
        return bounds_exceed_claim(self.bounds, self.claimed_epsilon)

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("scores", "membership")}
        out["bounds"] = {k: b.to_json() for k, b in self.bounds.items()}
        out["claimed_epsilon"] = None if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        out["bound_above_claim"] = self.bound_above_claim
        out["ratio_fdp_to_claim"] = (None if math.isinf(self.claimed_epsilon) or self.claimed_epsilon == 0
                                     else self.bounds["fdp"].epsilon / self.claimed_epsilon)
        return out


#: Where the audited trainer's draws come from. ``secure``: the CSPRNG streams a school trains with (Poisson
#: sampling, frame choice, noise; privacy/secure_random.py), so the audit checks the mechanism that runs;
#: ``reproducible``: torch generators seeded from the audit's seed, to replay a result bit for bit. Either way
#: the canaries' coins and data are the auditor's choices and come from the audit's seed.
RANDOMNESS = ("secure", "reproducible")

#: What :meth:`PrivateTrainer.randomness_sources` must report for each choice of :data:`RANDOMNESS`.
_EXPECTED_SOURCES = {
    "secure": {"unit-sampling": "csprng", "frame-choice": "csprng", "noise": "csprng", "transform-seeds": "csprng"},
    "reproducible": {"unit-sampling": "torch", "frame-choice": "torch", "noise": "torch",
                     "transform-seeds": "caller"},
}


def build_private_trainer(model, optimizer, frames, unit_ids, *, declared_units: int, randomness: str = "secure",
                          **kw):
    """The clients' DP trainer (privacy/engine.py): with ``randomness="secure"`` its production CSPRNG draws,
    with ``"reproducible"`` torch generators seeded from ``seed`` (the audit's)."""
    from privacy.engine import PrivateTrainer

    _check_randomness_choice(randomness)
    return PrivateTrainer(model, optimizer, frames, unit_ids, reproducible=randomness == "reproducible",
                          declared_units=declared_units, **kw)


def _check_clipping_choice(clipping: str) -> None:
    from privacy.student_clipping import CLIPPING_MODES

    if clipping not in CLIPPING_MODES:
        raise ValueError(f"clipping must be one of {', '.join(CLIPPING_MODES)}, got {clipping!r}")


def _check_randomness_choice(randomness: str) -> None:
    if randomness not in RANDOMNESS:
        raise ValueError(f"randomness must be one of {', '.join(RANDOMNESS)}, got {randomness!r}")


def check_trainer_randomness(trainer, randomness: str) -> dict[str, str]:
    """The built trainer's randomness sources, refused unless every one is what ``randomness`` promises: an
    audit that says it checked the CSPRNG path must not have drawn anything from a torch generator (a
    trainer factory, or a change to the trainer, that swapped a stream would otherwise pass unnoticed)."""
    sources = trainer.randomness_sources()
    wrong = {name: got for name, got in sources.items() if got != _EXPECTED_SOURCES[randomness][name]}
    if wrong:
        listed = ", ".join(f"{name} from {got}" for name, got in wrong.items())
        raise ValueError(f"the audited trainer does not draw as randomness {randomness!r} requires: {listed}")
    return sources


def _probed_model(net, canaries: int, num_classes: int):
    """The model under audit plus a canary probe: one weight per canary, reached only by canary frames.

    ``forward(x, y)``: frames with label ``num_classes + i`` are canary i's; they feed a one-hot of i
    to the probe, every other frame feeds zeros, so the probe's gradient is a Dirac per canary and
    the real frames never touch it (Nasr et al. 2023's white-box Dirac canary, worst case for privacy).
    """
    from torch import nn

    class ProbedModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.probe = nn.Linear(canaries, 1, bias=False)
            nn.init.zeros_(self.probe.weight)

        def forward(self, x, y):
            canary = y - num_classes
            onehot = nn.functional.one_hot(canary.clamp(min=0), canaries).to(x.dtype)
            onehot = onehot * (canary >= 0).unsqueeze(1).to(x.dtype)
            return _logits(self.net(x)), self.probe(onehot).squeeze(1)

    return ProbedModel()


TrainerFactory = Callable[..., "object"]


def run_white_box_audit(base_x, base_y, base_units: Sequence[str], net_builder: Callable[[], "object"], *,
                        canaries: int = 8000, runs: int = 16, epsilon: float | None = 4.0, delta: float = 1e-5,
                        epochs: int = 10, units_per_batch: int | None = None, frames_per_canary: int = 2,
                        max_grad_norm: float = 1.0, lr: float = 0.1, beta: float = 0.05, score: str = "sum",
                        num_classes: int = 7, seed: int = 0, trainer_factory: TrainerFactory | None = None,
                        mechanism: str = "correct", k_grid: Sequence[int] | None = None,
                        guesses: str = "grid", randomness: str = "secure", clipping: str = "auto",
                        progress: Callable[[str], None] | None = None) -> WhiteBoxAudit:
    """Audit the student-level DP trainer white-box with Dirac canary students.

    The school's own students (``base_x``, ``base_y``, one student id per frame in ``base_units``)
    plus the included canary students (``frames_per_canary`` frames each, each canary a fair coin)
    are trained by the real trainer — its Poisson sampler over students, per-student gradient sums,
    Opacus clipping and noise — for ``epochs`` epochs at the σ that gives ``epsilon`` (DP off:
    ``epsilon=None``, σ = 0). Every step's privatised gradient on the probe is read from the optimizer
    (a hook on the wrapped SGD's step): the auditor is a school that sees each of its noisy updates.
    ``units_per_batch=None`` samples every student every step (q = 1), the tightest audit.

    The canaries are spread over ``runs`` independent trainings (each with its own coins and the same
    base students). Every canary is in one run only, so the runs together are one mechanism with the
    per-run guarantee towards each canary, and the one-run bounds apply to all m canaries at once; it
    keeps the per-step cost (rows × probe width) down.

    ``guesses="grid"`` takes each estimator's best k of ``k_grid`` (Bonferroni); ``"planned"`` fixes k
    on a numpy simulation of the mechanism the trainer claims (:func:`plan_guesses`). The planned k is
    tighter on a correct trainer's Steinke bound but is tuned to the claimed leakage: against a trainer
    that leaks more it guesses too widely, and the grid caught the broken copies where it did not.

    ``randomness`` (:data:`RANDOMNESS`): ``"secure"`` (default) trains with the CSPRNG draws a school's
    rounds use, so the audit checks the mechanism that runs; ``"reproducible"`` with torch generators seeded
    from ``seed``, which replays a result bit for bit. The canaries' coins and the model's start come from
    ``seed`` either way. Every built trainer's sources are checked (:func:`check_trainer_randomness`).
    ``clipping`` (``privacy.clipping``: auto, ghost or per-sample) picks the clipping path audited; the
    one that ran is recorded in ``settings["clipping"]``.

    ``trainer_factory(model, optimizer, frames, unit_ids, units_per_batch=, frames_per_unit=,
    noise_multiplier=, max_grad_norm=, seed=, declared_units=, randomness=, clipping=)`` builds the trainer (default
    :func:`build_private_trainer`: the clients' class); the claimed ε comes from what the built trainer
    records (its ``noise_multiplier``, ``sample_rate`` and ``steps_done``), as a client's ledger entry does.
    """
    import time as _time

    _check_white_box_args(canaries=canaries, runs=runs, score=score, guesses=guesses, units_per_batch=units_per_batch,
                          epochs=epochs, frames_per_canary=frames_per_canary, delta=delta, beta=beta,
                          max_grad_norm=max_grad_norm, lr=lr, epsilon=epsilon)
    _check_randomness_choice(randomness)
    _check_clipping_choice(clipping)
    started, say = _time.perf_counter(), progress or (lambda s: None)
    training = _WhiteBoxTraining(epsilon, delta, epochs, units_per_batch, frames_per_canary, max_grad_norm, lr,
                                 num_classes, trainer_factory, randomness, clipping)
    done = _white_box_runs(base_x, base_y, base_units, net_builder, canaries, runs, training, score, seed, say)
    sigma, q, steps = done.worst_recorded
    planned = _planned_guesses(guesses, canaries, done.worst_recorded, score, delta, beta, say)
    say(f"scoring {canaries} canaries")
    bounds = one_run_bounds(done.scores, done.included, delta, beta, k_grid, planned_k=planned)
    return WhiteBoxAudit(
        mechanism=mechanism, claimed_epsilon=max(done.claims), delta=delta, bounds=bounds,
        noise_multiplier=sigma, sample_rate=q, steps=steps, canaries=canaries, included=int(done.included.sum()),
        frames_per_canary=frames_per_canary, base_students=len(set(map(str, base_units))), score=score,
        seconds=_time.perf_counter() - started, **done.mean_scores(), randomness=randomness,
        settings=dict(target_epsilon=epsilon, epochs=epochs, runs=runs, units_per_batch=units_per_batch,
                      max_grad_norm=max_grad_norm, lr=lr, beta=beta, seed=seed, trainer=done.records[0]["trainer"],
                      randomness_sources=done.records[0]["randomness_sources"],
                      clipping=done.records[0]["clipping"],
                      units_per_run=[rec["units"] for rec in done.records], guesses=guesses),
        scores=done.scores, membership=done.included,
    )


def _check_white_box_args(*, canaries: int, runs: int, score: str, guesses: str, units_per_batch: int | None,
                          **common) -> None:
    _check_audit_args(canaries=canaries, **common)
    if not (1 <= runs <= canaries // 2):
        raise ValueError(f"runs must be between 1 and canaries/2 ({canaries // 2}), got {runs}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if guesses not in ("grid", "planned"):
        raise ValueError(f"guesses must be 'grid' or 'planned', got {guesses!r}")
    if units_per_batch is not None and units_per_batch < 1:
        raise ValueError(f"batch must be at least 1 student, got {units_per_batch}")


@dataclass(frozen=True)
class _WhiteBoxTraining:
    """How every training of one white-box audit runs (only the canaries and the seed differ per run)."""

    epsilon: float | None           # None: DP off, σ = 0
    delta: float
    epochs: int
    units_per_batch: int | None     # None: every student every step (q = 1)
    frames_per_canary: int
    max_grad_norm: float
    lr: float
    num_classes: int
    trainer_factory: TrainerFactory | None
    randomness: str                 # RANDOMNESS: the trainer's draws from the CSPRNG, or seeded torch generators
    clipping: str                   # privacy.clipping: auto | ghost | per-sample


@dataclass
class _CanaryRuns:
    """The audit's trainings together: every canary's score and coin, each run's claimed ε and record."""

    scores: np.ndarray
    included: np.ndarray
    claims: list[float]
    records: list[dict]

    @property
    def worst_recorded(self) -> tuple[float, float, int]:
        """(σ, q, steps) the run with the largest claimed ε recorded: the claim the bounds are held to."""
        return self.records[int(np.argmax(self.claims))]["recorded"]

    def mean_scores(self) -> dict[str, float]:
        n_inc = int(self.included.sum())
        return {"mean_score_in": float(self.scores[self.included].mean()) if n_inc else math.nan,
                "mean_score_out": float(self.scores[~self.included].mean()) if n_inc < len(self.included)
                else math.nan}


def _white_box_runs(base_x, base_y, base_units, net_builder, canaries: int, runs: int, training: _WhiteBoxTraining,
                    score: str, seed: int, say: Callable[[str], None]) -> _CanaryRuns:
    """The canaries spread as evenly as can be over ``runs`` trainings (run r seeded ``seed * 1009 + r``),
    each run's canaries scored at the σ and q its trainer recorded."""
    sizes = [canaries // runs + (r < canaries % runs) for r in range(runs)]
    all_scores, all_included, claims, records = [], [], [], []
    for r, size in enumerate(sizes):
        say(f"run {r + 1}/{runs}: {size} canaries")
        run = _white_box_run(base_x, base_y, base_units, net_builder, size, training, seed * 1009 + r, say)
        sigma, q, steps = run["recorded"]
        all_scores.append(canary_scores(run["observed"], score, sigma, q))
        all_included.append(run["included"])
        claims.append(math.inf if sigma == 0 else _claimed_epsilon(sigma, q, steps, training.delta))
        records.append(run)
    return _CanaryRuns(np.concatenate(all_scores), np.concatenate(all_included), claims, records)


def _planned_guesses(guesses: str, canaries: int, recorded: tuple[float, float, int], score: str, delta: float,
                     beta: float, say: Callable[[str], None]):
    """``guesses="planned"`` with noise on: each estimator's k, fixed on a simulation of the claimed
    mechanism (no audited score seen). Otherwise None: the bounds take the best k of the grid."""
    sigma, q, steps = recorded
    if not (guesses == "planned" and sigma > 0):
        return None
    say(f"planning the guesses on a simulation of the claimed mechanism (σ {sigma:.4g}, q {q:.4g}, {steps} steps)")
    return plan_guesses(lambda g: simulate_gaussian_canaries(canaries, sigma, q, steps, g, score=score), delta, beta)


def save_score_plot(audit: WhiteBoxAudit, path) -> None:
    """Histogram of the canary scores, included vs excluded, with the f-DP bound's guess thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, included = np.asarray(audit.scores), np.asarray(audit.membership, dtype=bool)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(scores.min(), scores.max(), 60)
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({int((~included).sum())})")
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({int(included.sum())})")
    k = audit.bounds["fdp"].k
    ordered = np.sort(scores)
    for x, side in ((ordered[k - 1], "out"), (ordered[-k], "in")):
        ax.axvline(x, color="k", linestyle="--", linewidth=1)
        ax.annotate(f"guess {side}", (x, ax.get_ylim()[1] * 0.9), ha="center", fontsize=8)
    claim = "∞" if math.isinf(audit.claimed_epsilon) else f"{audit.claimed_epsilon:.2f}"
    ax.set_title(f"{audit.mechanism}: claimed ε {claim}; Steinke ≥ {audit.bounds['steinke'].epsilon:.2f}, "
                 f"f-DP ≥ {audit.bounds['fdp'].epsilon:.2f}", fontsize=9)
    ax.set_xlabel("canary score (summed updates on its coordinate, clip units)" if audit.score == "sum"
                  else "canary score (log likelihood ratio)")
    ax.set_ylabel("canaries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _claimed_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    from privacy.accounting import epsilon_of

    return epsilon_of([(sigma, q, steps)], delta)


def _white_box_run(base_x, base_y, base_units, net_builder, canaries: int, training: _WhiteBoxTraining, seed: int,
                   say: Callable[[str], None]) -> dict:
    """One training with ``canaries`` Dirac canary students; the observed probe updates and the coins."""
    import torch
    from torch.utils.data import TensorDataset

    from privacy.accounting import calibrate_noise
    from privacy.engine import sampling

    t = training
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    x, y, units = _with_dirac_canaries(base_x, base_y, base_units, np.flatnonzero(included), t.frames_per_canary,
                                       t.num_classes)
    n_units = len(set(units))
    batch = n_units if t.units_per_batch is None else int(t.units_per_batch)
    q, per_epoch = sampling(n_units, batch)
    steps = t.epochs * per_epoch
    if t.epsilon is None:
        sigma = 0.0
    else:
        say(f"  calibrating σ for ε {t.epsilon} at δ {t.delta:g} (q {q:.4g}, {steps} steps)")
        sigma = calibrate_noise(t.epsilon, t.delta, q, steps)

    torch.manual_seed(seed)
    model = _probed_model(net_builder(), canaries, t.num_classes)
    sgd = torch.optim.SGD(model.parameters(), lr=t.lr)
    observed: list[np.ndarray] = []
    built: list = []
    sgd.register_step_pre_hook(_probe_reader(model, canaries, built, observed))
    factory = t.trainer_factory or build_private_trainer
    trainer = factory(model, sgd, TensorDataset(x, y), units, units_per_batch=batch,
                      frames_per_unit=t.frames_per_canary, noise_multiplier=sigma, max_grad_norm=t.max_grad_norm,
                      seed=seed, declared_units=n_units, randomness=t.randomness, clipping=t.clipping)
    sources = check_trainer_randomness(trainer, t.randomness)
    built.append(trainer)
    loss_fn = _dirac_canary_loss(t.num_classes, t.max_grad_norm)
    for _ in range(t.epochs):
        trainer.train_epoch(loss_fn)
    trainer.close()
    return {"observed": np.stack(observed) if observed else np.zeros((0, canaries)), "included": included,
            "recorded": (float(trainer.noise_multiplier), float(trainer.sample_rate), int(trainer.steps_done)),
            "units": n_units, "trainer": f"{type(trainer).__module__}.{type(trainer).__qualname__}",
            "randomness_sources": sources, "clipping": trainer.clipping}


def _with_dirac_canaries(base_x, base_y, base_units, chosen: np.ndarray, frames_per_canary: int, num_classes: int):
    """The school's frames plus ``frames_per_canary`` blank frames per chosen canary, labelled
    ``num_classes + i`` for canary i (the probe's input), with one unit id per frame."""
    import torch

    frame_shape = tuple(base_x.shape[1:])
    cx = torch.zeros((len(chosen) * frames_per_canary, *frame_shape), dtype=base_x.dtype)
    cy = torch.from_numpy(np.repeat(chosen + num_classes, frames_per_canary)).long()
    x = torch.cat([base_x, cx])
    y = torch.cat([base_y.long(), cy])
    units = [str(u) for u in base_units] + [f"canary-{i}" for i in np.repeat(chosen, frames_per_canary)]
    return x, y, units


def _probe_reader(model, canaries: int, built: list, observed: list[np.ndarray]):
    """A step pre-hook for the wrapped SGD: appends each step's privatised probe update to ``observed``
    (``built[0]`` is the trainer, built after the hook is registered)."""

    def read_update(optimizer, args, kwargs):
        # p.grad here is Opacus' (Σ clipped + noise) / expected units: undo the scaling, in clip units,
        # signed so that a canary adds +1 (its frames' loss is −C·w_i)
        trainer = built[0]
        grad = model.probe.weight.grad
        g = np.zeros(canaries) if grad is None else grad.detach().reshape(-1).double().numpy()
        observed.append(-g * trainer.expected_units / trainer.max_grad_norm)

    return read_update


def _dirac_canary_loss(num_classes: int, max_grad_norm: float):
    """Per-frame loss: cross-entropy for the school's frames, −C·(probe output) for a canary's."""
    import torch

    def loss_fn(mdl, xb, yb):
        logits, probe_out = mdl(xb, yb)
        is_canary = yb >= num_classes
        task = torch.nn.functional.cross_entropy(logits, torch.where(is_canary, 0, yb), reduction="none")
        return torch.where(is_canary, -max_grad_norm * probe_out, task)

    return loss_fn


def _check_audit_args(*, canaries: int, epochs: int, frames_per_canary: int, delta: float, beta: float,
                      max_grad_norm: float, lr: float, epsilon: float | None) -> None:
    if canaries < 2:
        raise ValueError(f"canaries must be at least 2, got {canaries}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if frames_per_canary < 1:
        raise ValueError(f"frames per canary must be at least 1, got {frames_per_canary}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    _check_beta(beta)
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"clip norm must be a positive number, got {max_grad_norm}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive number, got {epsilon}")


# ------------------------------------------------------------------------------------- ideal mechanism
def simulate_gaussian_canaries(canaries: int, noise_multiplier: float, sample_rate: float, steps: int,
                               rng: np.random.Generator, sensitivity: float = 1.0,
                               claimed_noise_multiplier: float | None = None,
                               score: str = "sum") -> tuple[np.ndarray, np.ndarray]:
    """The ideal mechanism in numpy: each step a Dirac canary, if included and Poisson-sampled, adds
    ``sensitivity`` (in clip units) to its coordinate, plus N(0, σ²). Returns (scores, included)."""
    included = rng.random(canaries) < 0.5
    sampled = (rng.random((steps, canaries)) < sample_rate) & included
    observed = sampled * sensitivity + rng.normal(0.0, noise_multiplier, (steps, canaries))
    claimed = noise_multiplier if claimed_noise_multiplier is None else claimed_noise_multiplier
    return canary_scores(observed, score, claimed, sample_rate), included


# ------------------------------------------------------------------------------------- black box
@dataclass
class BlackBoxAudit:
    """The outsider's audit: only the final model, canaries scored by their loss."""
    dp: bool
    claimed_epsilon: float          # the accountant's ε for what was trained (inf without DP)
    delta: float
    bounds: dict[str, OneRunBound]
    noise_multiplier: float
    sample_rate: float
    steps: int
    epochs: int
    canaries: int
    included: int
    base_frames: int
    units: int
    canary_loss_in: float           # mean loss of included canaries
    canary_loss_out: float          # mean loss of excluded canaries
    seconds: float
    randomness: str                 # "secure" (the CSPRNG draws a school trains with) or "reproducible"
    settings: dict

    @property
    def bound_above_claim(self) -> bool:
        return bounds_exceed_claim(self.bounds, self.claimed_epsilon)

    def to_json(self) -> dict:
        out = asdict(self)
        out["bounds"] = {k: b.to_json() for k, b in self.bounds.items()}
        out["claimed_epsilon"] = None if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        out["bound_above_claim"] = self.bound_above_claim
        return out


def make_canaries(m: int, shape: tuple[int, ...], num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m random-pattern images in [-1, 1] (independent ±1 blocks of 4×4 pixels: far from any face, so
    the model can only fit them by memorising), a random label each, and the fair-coin inclusion."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    blocks = rng.choice([-1.0, 1.0], size=(m, c, (h + 3) // 4, (w + 3) // 4))
    images = np.repeat(np.repeat(blocks, 4, axis=2), 4, axis=3)[:, :, :h, :w].astype(np.float32)
    labels = rng.integers(0, num_classes, size=m)
    included = rng.random(m) < 0.5
    return images, labels, included


def run_black_box_audit(base_x, base_y, base_units: Sequence[str] | None, model_builder: Callable[[], "object"], *,
                        canaries: int = 500, epsilon: float | None = 8.0, delta: float = 1e-5, epochs: int = 10,
                        units_per_batch: int = 32, frames_per_unit: int = 4, max_grad_norm: float = 1.0,
                        lr: float = 0.5, beta: float = 0.05, seed: int = 0, num_classes: int = 7,
                        randomness: str = "secure", clipping: str = "auto",
                        progress: Callable[[str], None] | None = None) -> BlackBoxAudit:
    """Train once on base data + included canaries (single-frame canary students: random patterns with
    random labels); bound ε from the canaries' losses under the final model only.

    ``base_x`` float tensor (N, C, H, W) in model input form, ``base_y`` int labels (N,), ``base_units``
    one unit id per frame (student) or None (image). ``epsilon=None`` trains without DP (the control:
    same clipping, no noise). ``randomness`` and ``clipping``: the trainer's draws and clipping path, as in
    :func:`run_white_box_audit` (the canaries and their coins come from ``seed`` either way).
    """
    import time as _time

    import torch

    from privacy.engine import sampling

    _check_audit_args(canaries=canaries, epochs=epochs, frames_per_canary=frames_per_unit, delta=delta, beta=beta,
                      max_grad_norm=max_grad_norm, lr=lr, epsilon=epsilon)
    _check_randomness_choice(randomness)
    _check_clipping_choice(clipping)
    started = _time.perf_counter()
    say = progress or (lambda s: None)
    images, labels, included = make_canaries(canaries, tuple(base_x.shape[1:]), num_classes, seed)
    cx, cy = torch.from_numpy(images), torch.from_numpy(labels).long()
    x, y, units, n_units = _with_random_canaries(base_x, base_y, base_units, cx, cy, included)
    n_inc = int(included.sum())
    q, per_epoch = sampling(n_units, units_per_batch)
    steps = epochs * per_epoch
    sigma, claimed = _black_box_noise(epsilon, delta, q, steps, say)
    torch.manual_seed(seed)
    model = model_builder()
    sources = _train_black_box(model, x, y, units, n_units, units_per_batch=units_per_batch,
                               frames_per_unit=frames_per_unit, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                               lr=lr, seed=seed, epochs=epochs, randomness=randomness, clipping=clipping, say=say)
    losses = _canary_losses(model, cx, cy)
    bounds = one_run_bounds(-losses, included, delta, beta)
    return BlackBoxAudit(
        dp=epsilon is not None, claimed_epsilon=claimed, delta=delta, bounds=bounds, noise_multiplier=sigma,
        sample_rate=q, steps=steps, epochs=epochs, canaries=canaries, included=n_inc, base_frames=len(base_y),
        units=n_units, canary_loss_in=float(losses[included].mean()) if n_inc else math.nan,
        canary_loss_out=float(losses[~included].mean()) if n_inc < canaries else math.nan,
        seconds=_time.perf_counter() - started, randomness=randomness,
        settings=dict(units_per_batch=units_per_batch, frames_per_unit=frames_per_unit,
                      max_grad_norm=max_grad_norm, lr=lr, beta=beta, seed=seed,
                      unit="student" if base_units is not None else "image", randomness_sources=sources["sources"],
                      clipping=sources["clipping"]),
    )


def _with_random_canaries(base_x, base_y, base_units, cx, cy, included: np.ndarray):
    """The school's frames plus the included canaries (each its own unit); unit ids (None for unit
    image) and how many units there are."""
    import torch

    inc = torch.from_numpy(included)
    x = torch.cat([base_x, cx[inc]])
    y = torch.cat([base_y.long(), cy[inc]])
    if base_units is None:
        return x, y, None, len(y)
    units = list(base_units) + [f"canary-{i}" for i in np.flatnonzero(included)]
    return x, y, units, len(set(units))


def _black_box_noise(epsilon: float | None, delta: float, q: float, steps: int,
                     say: Callable[[str], None]) -> tuple[float, float]:
    """(σ calibrated to ``epsilon``, the accountant's ε for that σ); (0, ∞) for the no-DP control."""
    from privacy.accounting import calibrate_noise, epsilon_of

    if epsilon is None:
        return 0.0, math.inf
    say(f"calibrating σ for ε={epsilon} (q={q:.4g}, {steps} steps)")
    sigma = calibrate_noise(epsilon, delta, q, steps)
    return sigma, epsilon_of([(sigma, q, steps)], delta)


def _train_black_box(model, x, y, units, n_units: int, *, units_per_batch: int, frames_per_unit: int,
                     noise_multiplier: float, max_grad_norm: float, lr: float, seed: int, epochs: int,
                     randomness: str, clipping: str, say: Callable[[str], None]) -> dict:
    """``epochs`` epochs of the clients' DP trainer on the school plus the included canaries; returns where
    the trainer drew from (``sources``, checked against ``randomness``) and the clipping path that ran."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    trainer = build_private_trainer(model, torch.optim.SGD(model.parameters(), lr=lr), TensorDataset(x, y), units,
                                    units_per_batch=units_per_batch, frames_per_unit=frames_per_unit,
                                    noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, seed=seed,
                                    declared_units=n_units, randomness=randomness, clipping=clipping)
    sources = check_trainer_randomness(trainer, randomness)

    def loss_fn(mdl, xb, yb):
        return nn.functional.cross_entropy(_logits(mdl(xb)), yb, reduction="none")

    for epoch in range(epochs):
        st = trainer.train_epoch(loss_fn)
        say(f"epoch {epoch + 1}/{epochs}: loss {st['loss']:.3f} ({st['steps']} steps)")
    trainer.close()
    return {"sources": sources, "clipping": trainer.clipping}


def _canary_losses(model, cx, cy) -> np.ndarray:
    """Every canary's loss under the final model: the outsider's only view."""
    import torch
    from torch import nn

    model.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(_logits(model(cx)), cy, reduction="none").numpy()


def _logits(out):
    """Models of the zoo return an output object with ``.logits``; plain modules return the tensor."""
    return getattr(out, "logits", out)


def tiny_model_builder(shape: tuple[int, int, int], num_classes: int = 7, hidden: int = 256):
    """A small MLP for the harness: enough capacity to memorise canaries without DP, fast on a CPU."""
    from torch import nn

    c, h, w = shape

    def build():
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    return build
