"""A school's own privacy policy, and the check of a coordinator's request against it.

The coordinator's run-config says how it would like schools to train; the school's policy says what
the school allows. DP is always on. The policy fixes:

==================  ================================================================================
``unit``            privacy unit, ``student`` (one student's frames are one unit) or ``image``
``delta``           δ every ε of this school is stated at (accounting δ); in (0, 1/declared size)
``budget``          lifetime ε budget at ``delta`` (required, finite, > 0, at most MAX_EPSILON)
``max-round-epsilon``  the largest ε one round may spend on its own, at ``delta``
``declared-students``  the public size the school declares (unit student); q = batch / this
``declared-images``    the same for unit image
``report-min-students``  (optional) k: the classroom report shows a class figure only for time windows
                       with at least k students in the room (default ``classroom.report_min_students``)
``per-student-figures``  (optional) ``true`` lets the classroom report show each student's own figures
                       (default ``classroom.per_student_figures``, false)
==================  ================================================================================

Deployed schools read these keys from their node-config (written by ``fedfer deploy add-school``);
simulated schools from ``<state_dir>/policy.json``, written by ``fedfer simulate`` before Flower
starts (same keys, same generator). Neither is ever taken from the run-config.

The coordinator may ask for *more* privacy (smaller δ, smaller target ε, smaller budget or per-round
ε), never less: :func:`agree_round` returns the round's terms or the name of the first run-config
setting that asks for less than the policy allows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from privacy.engine import PRIVACY_UNITS, DPPlan, plan_from_config
from shared_models.small_files import read_small_file

POLICY_FILE = "policy.json"
#: Largest policy.json read (a dozen keys are a few hundred bytes): a planted file costs at most this much memory.
MAX_POLICY_BYTES = 1024 * 1024
POLICY_KEYS = ("unit", "delta", "budget", "max-round-epsilon", "declared-students", "declared-images")
#: the classroom report's keys (`fedfer classroom report`): optional, read by `report_policy`
REPORT_KEYS = ("report-min-students", "per-student-figures")


def is_report_only(values: Mapping[str, Any]) -> bool:
    """A policy.json stating only the classroom report's keys (REPORT_KEYS), none of the training policy's: what a
    deployed school writes into its state folder for `fedfer classroom report` (docs/classroom.md). Its training
    policy is its node-config's, so such a file has no budget, δ or unit to audit against."""
    return bool(values) and set(values) <= set(REPORT_KEYS)


class PolicyError(ValueError):
    """A policy value that makes no sense, phrased as one line naming the key and where it came from."""


# ---------------------------------------------------------------------------- what an ε may be
#: The largest ε a lifetime budget, a per-round cap or a target may be: a limit that catches slips (a budget of
#: 1e300 was recorded), not a recommendation. The guarantee says no output becomes more than e^ε times likelier
#: because of one student: at ε 128, the largest the experiments run on purpose (simulations/bench/
#: epsilon_curve.py), that factor is already ~10^55, and from ε ≈ 709.8 on it is not even a finite double. A
#: budget beyond 1000 bounds nothing anyone can use, and every experiment keeps room below it.
MAX_EPSILON = 1000.0


def epsilon_problem(value: Any) -> str | None:
    """Why ``value`` cannot be an ε budget, per-round cap or target (finite, > 0, at most MAX_EPSILON), as the
    end of a sentence that starts with what it is ("key 'budget' ..."); None when it can. The one rule every
    place that reads or sets a budget applies: the policy, the node-config, ``fedfer deploy add-school`` and
    ``set-budget``, ``fedfer simulate``'s config and the audit."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        return f"must be a number, got {value!r}"
    if not (math.isfinite(number) and number > 0):
        return f"must be a finite ε > 0, got {value!r}"
    if number > MAX_EPSILON:
        return f"must be an ε of at most {MAX_EPSILON:g} (beyond it the guarantee bounds nothing), got {value!r}"
    return None


def check_epsilon(value: Any, what: str) -> float:
    """``value`` as an ε, or PolicyError "<what> <why not>" (`what` names the file/flag and key)."""
    if (problem := epsilon_problem(value)) is not None:
        raise PolicyError(f"{what} {problem}")
    return float(value)


#: The config keys `fedfer simulate` turns into each simulated school's policy or round ε.
CONFIG_EPSILON_KEYS = ("privacy.budget", "privacy.max_round_epsilon", "privacy.target_epsilon")


def check_config_epsilons(cfg: Mapping[str, Any], source: str) -> None:
    """The ε keys of a config that policies are generated from (``privacy.budget``, ``privacy.school_budgets``,
    ``privacy.max_round_epsilon``, ``privacy.target_epsilon``) against :func:`epsilon_problem`; PolicyError
    naming the file and key. (shared_models/config.py, which may not import this package, already refuses
    the non-finite and ≤ 0 ones; this adds the upper bound, before anything is generated or trained.)"""
    for key in CONFIG_EPSILON_KEYS:
        check_epsilon(cfg[key], f"{source}: key '{key}'")
    for item in filter(None, (part.strip() for part in str(cfg.get("privacy.school_budgets", "")).split(","))):
        name, _, value = item.partition("=")
        check_epsilon(value.strip(), f"{source}: key 'privacy.school_budgets' (school {name.strip()})")


@dataclass(frozen=True)
class SchoolPolicy:
    unit: str
    delta: float
    budget: float
    max_round_epsilon: float
    declared_units: int      # in the policy's unit: students, or images for unit image

    def to_mapping(self) -> dict[str, Any]:
        size_key = "declared-students" if self.unit == "student" else "declared-images"
        return {"unit": self.unit, "delta": self.delta, "budget": self.budget,
                "max-round-epsilon": self.max_round_epsilon, size_key: self.declared_units}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> "SchoolPolicy":
        """Strict parse of the policy keys (other keys of ``values`` are the caller's business)."""
        def get(key: str) -> Any:
            value = values.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise PolicyError(f"{source}: key '{key}' is required (the school's privacy policy)")
            return value

        def number(key: str) -> float:
            value = get(key)
            try:
                if isinstance(value, bool):
                    raise ValueError
                return float(value)
            except (TypeError, ValueError):
                raise PolicyError(f"{source}: key '{key}' must be a number, got {value!r}") from None

        unit = str(get("unit"))
        if unit not in PRIVACY_UNITS:
            raise PolicyError(f"{source}: key 'unit' must be one of {', '.join(PRIVACY_UNITS)}, got {unit!r}")
        size_key = "declared-students" if unit == "student" else "declared-images"
        size = number(size_key)
        if not (math.isfinite(size) and size >= 1 and size == int(size)):
            raise PolicyError(f"{source}: key '{size_key}' must be a whole number >= 1, got {values.get(size_key)!r}")
        return make_policy(unit=unit, delta=number("delta"), budget=number("budget"),
                           max_round_epsilon=number("max-round-epsilon"), declared_units=int(size), source=source)


def make_policy(*, unit: str, delta: float, budget: float, max_round_epsilon: float, declared_units: int,
                source: str) -> SchoolPolicy:
    """A validated policy; values that make no sense raise PolicyError naming the key."""
    size_key = "declared-students" if unit == "student" else "declared-images"
    if unit not in PRIVACY_UNITS:
        raise PolicyError(f"{source}: key 'unit' must be one of {', '.join(PRIVACY_UNITS)}, got {unit!r}")
    if not (isinstance(declared_units, int) and declared_units >= 1):
        raise PolicyError(f"{source}: key '{size_key}' must be a whole number >= 1, got {declared_units!r}")
    check_epsilon(budget, f"{source}: key 'budget'")
    check_epsilon(max_round_epsilon, f"{source}: key 'max-round-epsilon'")
    if not (0 < delta < 1):
        raise PolicyError(f"{source}: key 'delta' must be in (0, 1), got {delta!r}")
    if delta >= 1 / declared_units:
        # δ is the chance the guarantee fails; at δ >= 1/n a mechanism may publish one unit's data outright
        raise PolicyError(f"{source}: key 'delta' must be < 1/{size_key} = {1 / declared_units:.3g}, got {delta!r}")
    return SchoolPolicy(unit=unit, delta=float(delta), budget=float(budget),
                        max_round_epsilon=float(max_round_epsilon), declared_units=int(declared_units))


def declared_size_bucket(count: int) -> int:
    """The public size a school declares by default: its count rounded to two significant figures.

    It is fixed once, in the policy: later changes to the school's data never move it, so the rounds'
    q, steps and σ never depend on who is in the data today."""
    count = int(count)
    if count < 1:
        raise ValueError(f"a school needs at least one unit to declare a size, got {count}")
    digits = len(str(count))
    step = 10 ** max(0, digits - 2)
    return max(1, math.floor(count / step + 0.5) * step)


def policy_from_defaults(defaults: Mapping[str, Any], declared_units: int, *, budget: float | None = None,
                         source: str) -> SchoolPolicy:
    """The policy generator ``fedfer deploy add-school`` and ``fedfer simulate`` share: the unit, δ,
    budget and per-round cap from a config (``privacy.*``), and the declared size."""
    return make_policy(unit=str(defaults["privacy.unit"]), delta=float(defaults["privacy.delta"]),
                       budget=float(defaults["privacy.budget"] if budget is None else budget),
                       max_round_epsilon=float(defaults["privacy.max_round_epsilon"]),
                       declared_units=int(declared_units), source=source)


def write_policy_file(state_dir: Path, policy: SchoolPolicy) -> Path:
    from shared_models.atomic_files import atomic_write_text

    path = Path(state_dir) / POLICY_FILE
    atomic_write_text(path, json.dumps(policy.to_mapping(), indent=1) + "\n")
    return path


def read_policy_file(state_dir: Path) -> SchoolPolicy | None:
    """The policy in ``<state_dir>/policy.json``, or None when there is none."""
    path = Path(state_dir) / POLICY_FILE
    if not path.exists():
        return None
    return SchoolPolicy.from_mapping(_read_policy_json(path), str(path))


def _read_policy_json(path: Path) -> dict[str, Any]:
    """A policy.json's object of known keys; PolicyError (one line naming the file) otherwise."""
    from shared_models.datasets.base import special_file

    if why := special_file(path):
        raise PolicyError(f"{path}: unreadable policy ({why})")
    try:
        values = json.loads(read_small_file(path, MAX_POLICY_BYTES).decode("utf-8"))
    except RecursionError:
        raise PolicyError(f"{path}: unreadable policy (JSON nested too deeply)") from None
    except (OSError, ValueError) as exc:   # ValueError: not UTF-8, not JSON, an integer of 5,000 digits
        raise PolicyError(f"{path}: unreadable policy ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(values, dict):
        raise PolicyError(f"{path}: must be a JSON object of policy keys")
    unknown = sorted(set(values) - set(POLICY_KEYS) - set(REPORT_KEYS))
    if unknown:
        raise PolicyError(f"{path}: unknown key '{unknown[0]}' (policy keys: {', '.join(POLICY_KEYS + REPORT_KEYS)})")
    return values


# ---------------------------------------------------------------------------- the classroom report
@dataclass(frozen=True)
class ReportPolicy:
    """What the school lets its lesson reports show (k-anonymity-style: no class figure over fewer than
    `min_students` students; per-student figures only when `per_student_figures`)."""

    min_students: int
    per_student_figures: bool
    #: where the values came from, for the report's "policy applied" line: a policy.json path, or "defaults"
    source: str = "defaults"
    #: the keys the policy did not state (they took fedfer's installed default, or a stricter config value)
    defaulted: tuple[str, ...] = REPORT_KEYS
    #: with source "defaults": why no school policy was read
    why_defaults: str = "no school policy given"

    def describe(self) -> str:
        """One line saying which policy the report applied and what it allows."""
        values = (f"report-min-students {self.min_students}, per-student-figures "
                  f"{'true' if self.per_student_figures else 'false'}")
        if self.source == "defaults":
            return f"policy: fedfer's defaults ({self.why_defaults}): {values}"
        left = f"; not stated there, so the defaults: {', '.join(self.defaulted)}" if self.defaulted else ""
        return f"policy: {self.source}: {values}{left}"


def report_policy(values: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> ReportPolicy:
    """The report keys of a policy mapping. A key the policy does not state takes fedfer's installed
    default (``classroom.*`` of defaults.yaml), or the config's value where that asks for more privacy (a
    larger k, no per-student figures): the policies `fedfer simulate` and `deploy add-school` write state
    neither key, and a config handed to the report (a run's config.yaml, i.e. the coordinator's
    run-config) must not loosen what the school left to the defaults."""
    from shared_models.config import defaults as installed_defaults

    installed = installed_defaults()
    k = values.get("report-min-students", max(int(installed["classroom.report_min_students"]),
                                              int(defaults["classroom.report_min_students"])))
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or not 1 <= int(k) <= 10_000:
        raise PolicyError(f"{source}: key 'report-min-students' must be a whole number in 1..10000, got {k!r}")
    allowed = values.get("per-student-figures", bool(installed["classroom.per_student_figures"])
                         and bool(defaults["classroom.per_student_figures"]))
    if not isinstance(allowed, bool):
        raise PolicyError(f"{source}: key 'per-student-figures' must be true or false, got {allowed!r}")
    return ReportPolicy(min_students=int(k), per_student_figures=allowed, source=source,
                        defaulted=tuple(key for key in REPORT_KEYS if key not in values))


def read_report_policy(path: Path | None, defaults: Mapping[str, Any], state_dir: Path | None = None) -> ReportPolicy:
    """The report policy of a school's policy.json: `path` (a file, or a state dir holding one) when given;
    else `state_dir`'s policy.json when it has one; else the defaults. A deployed school's state dir has no
    policy.json until the school writes one (its training policy is its node-config's), so a state dir
    without one means "the defaults" -- the report says so -- while a `path` given explicitly must exist."""
    if path is None and state_dir is not None:
        state_dir = Path(state_dir)
        if not state_dir.is_dir():
            raise PolicyError(f"{state_dir}: not a directory (--state-dir is the school's state folder, the "
                              f"node-config's state-dir)")
        if os.path.lexists(state_dir / POLICY_FILE):   # a dangling link or a pipe is refused, not "no policy"
            path = state_dir / POLICY_FILE
    if path is None:
        policy = report_policy({}, defaults, "defaults")
        if state_dir is not None:
            policy = dataclasses.replace(policy, why_defaults=f"{state_dir} has no {POLICY_FILE}")
        return policy
    path = Path(path)
    if path.is_dir():
        path = path / POLICY_FILE
    if not os.path.lexists(path):
        raise PolicyError(f"{path}: no such policy file (--policy names a school's policy.json or its state dir; "
                          f"--state-dir DIR uses the defaults when DIR has none)")
    return report_policy(_read_policy_json(path), defaults, str(path))


# ---------------------------------------------------------------------------- the request check
def requested_budget(cfg: Mapping[str, Any], school_id: str) -> tuple[float, str]:
    """The budget the run-config asks of this school, and the key it came from."""
    for item in filter(None, (part.strip() for part in str(cfg.get("privacy.school_budgets", "")).split(","))):
        name, _, value = item.partition("=")
        if name.strip() == school_id:
            try:
                return float(value), "privacy.school_budgets"
            except ValueError:
                return math.nan, "privacy.school_budgets"
    return float(cfg["privacy.budget"]), "privacy.budget"


@dataclass(frozen=True)
class RoundTerms:
    """What the school agrees to train this round: all functions of its policy and public settings."""

    plan: DPPlan
    delta: float            # the accounting δ: always the policy's
    budget: float           # the tighter of the policy's and the coordinator's
    budget_source: str      # which one: "the school's policy" or the run-config key that asked for less
    round_epsilon: float    # ε of this round on its own at ``delta``
    accountant: str


@dataclass(frozen=True)
class PolicyViolation:
    setting: str            # the run-config key that asks for less privacy than the policy allows


def _within(value: float, limit: float) -> bool:
    """value <= limit, and False for NaN (a NaN request is never within a policy)."""
    return bool(value <= limit)


def agree_round(policy: SchoolPolicy, cfg: Mapping[str, Any], school_id: str) -> RoundTerms | PolicyViolation:
    """Check the run-config against the policy; on agreement, the round's plan (engine rule: q from the
    declared size), accounting δ, budget and this round's ε. Nothing here reads the school's data."""
    from privacy.accounting import AccountingError, epsilon_of

    if not bool(cfg["privacy.enabled"]):
        return PolicyViolation("privacy.enabled")
    if str(cfg["privacy.unit"]) != policy.unit:
        return PolicyViolation("privacy.unit")
    asked_delta = float(cfg["privacy.delta"])
    if not (asked_delta > 0 and _within(asked_delta, policy.delta)):
        return PolicyViolation("privacy.delta")
    asked_budget, budget_key = requested_budget(cfg, school_id)
    if not (asked_budget > 0 and _within(asked_budget, policy.budget)):
        return PolicyViolation(budget_key)
    asked_cap = float(cfg["privacy.max_round_epsilon"])
    if not (asked_cap > 0 and _within(asked_cap, policy.max_round_epsilon)):
        return PolicyViolation("privacy.max_round_epsilon")
    # a fixed σ (anything but 0, NaN included) is the coordinator's ask; 0 means "calibrate to the target ε"
    sigma_key = "privacy.noise_multiplier" if float(cfg["privacy.noise_multiplier"]) != 0 else "privacy.target_epsilon"
    sigma_value = float(cfg[sigma_key])
    if not math.isfinite(sigma_value) or sigma_value < 0:
        return PolicyViolation(sigma_key)
    accountant = str(cfg["privacy.accountant"])
    try:
        # a smaller δ asked by the coordinator buys more noise; the school still accounts at its own δ
        plan = plan_from_config(cfg, policy.declared_units, delta=asked_delta, unit=policy.unit)
        round_eps = epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.steps)], policy.delta, accountant)
    except (AccountingError, ValueError):
        return PolicyViolation(sigma_key)
    if not _within(round_eps, min(policy.max_round_epsilon, asked_cap)):
        return PolicyViolation(sigma_key)
    source = "the school's policy" if policy.budget <= asked_budget else f"the run's {budget_key}"
    return RoundTerms(plan=plan, delta=policy.delta, budget=min(policy.budget, asked_budget), budget_source=source,
                      round_epsilon=round_eps, accountant=accountant)
