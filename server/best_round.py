"""Which round's global model is the best one: chosen on the public benchmarks only.

A federation's last round is not always its best (noise, a learning rate too large for small schools). The
evaluation node scores every round's global model on public benchmarks, so the run can keep the round that
scored best there as ``checkpoints/best.pt`` (server/round_writer.py writes it, server/run_dir.py stores it).

Why this costs no privacy: every global model is already a DP release (each school's update is noised before it
leaves the school; FedAvg and the server momentum are post-processing), and choosing one of them by a score
computed on public data only is post-processing too — it reads nothing of any school. Choosing by the schools'
faces would not be: that is school data, outside every ledger. The server cannot see what an evaluation node
holds — only the names it scores under — so which benchmarks may score is declared, not guessed:
`evaluation.public_benchmarks` lists them, and a benchmark not in it never counts (a deployed evaluation node
given the schools' own faces under a name nobody declared public cannot choose the round). The schools'
held-out faces (`synthetic-indomain`, `shared_models.datasets.SCHOOL_DATA_BENCHMARKS`) can never be declared
public: the config refuses them.

`evaluation.keep_best` says how a round is scored (`BestRoundRule` holds it with the declared public benchmarks):
- ``mean``: the mean accuracy over the declared-public benchmarks the round was scored on (the default);
- ``first``: the accuracy on the config's first declared-public benchmark (else the first the evaluation node
  scored);
- ``off``: no best round is kept.

Two rounds are compared on the benchmarks both were scored on (an evaluation node whose list changed mid-run
cannot make one round look better by a benchmark the other never saw); a tie keeps the earlier round. Round 0
(the start model, `model.pretrained`) is not a candidate: it is not the federation's output, the user already
has it, and as the public benchmarks come from pre-training's distribution it would often win on them while
the schools' own faces gained from the federation (the default demo: round 0 0.904 public, round 6 0.893
public but +3.6 points in-domain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from shared_models.config import RULES
from shared_models.datasets import canonical_name, is_school_data, split_benchmark_list

KEEP_BEST_CHOICES = RULES["evaluation.keep_best"].choices or ()


@dataclass(frozen=True)
class BestRoundRule:
    """How a round's model is scored for checkpoints/best.pt: `by` (`evaluation.keep_best`), the benchmark names
    declared public (`evaluation.public_benchmarks`, canonical), and `primary`, the config's first declared-public
    benchmark (what `first` scores)."""

    by: str
    public: frozenset[str]
    primary: str = ""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "BestRoundRule":
        public = declared_public(str(cfg["evaluation.public_benchmarks"]))
        return cls(str(cfg["evaluation.keep_best"]), public, first_public(str(cfg["evaluation.benchmarks"]), public))

    def counts(self, name: str) -> bool:
        """May a benchmark scored under `name` (``fer2013``, ``raf-db:test``) choose the best round?"""
        return is_declared_public(name, self.public)


def is_declared_public(name: str, public: frozenset[str]) -> bool:
    """Is the benchmark scored under `name` (any split, any alias) one of the `public` names? Never the schools'
    held-out faces, whatever a list says."""
    return not is_school_data(name) and canonical_name(name.split(":", 1)[0]) in public


def declared_public(value: str) -> frozenset[str]:
    """The canonical benchmark names of `evaluation.public_benchmarks` (comma-separated; the config checked them)."""
    return frozenset(canonical_name(part) for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class RoundScore:
    """One round's selection score: the public accuracies it counts, by benchmark."""

    round: int
    by: str
    accuracies: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The mean of the counted accuracies (with `first`, the one benchmark's)."""
        return sum(self.accuracies.values()) / len(self.accuracies)

    def on(self, benchmarks: Iterable[str]) -> float:
        chosen = [self.accuracies[name] for name in benchmarks]
        return sum(chosen) / len(chosen)

    def describe(self) -> str:
        """`0.889 on synthetic-fer2013` or `mean 0.712 over fer2013 0.701, rafdb 0.723`."""
        if len(self.accuracies) == 1:
            (name, value), = self.accuracies.items()
            return f"{value:.3f} on {name}"
        parts = ", ".join(f"{name} {value:.3f}" for name, value in sorted(self.accuracies.items()))
        return f"mean {self.score:.3f} over {parts}"

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "by": self.by, "score": self.score, "accuracies": dict(self.accuracies)}


def _accuracies(evaluation: Mapping[str, Any] | None) -> dict[str, float]:
    """benchmark -> accuracy of a round's evaluation: every finite accuracy in [0, 1], the schools' held-out faces
    (`is_school_data`) left out, in the evaluation's order."""
    out: dict[str, float] = {}
    for name, metrics in (evaluation or {}).items():
        if not isinstance(name, str) or is_school_data(name) or not isinstance(metrics, Mapping):
            continue
        accuracy = metrics.get("accuracy")
        if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and math.isfinite(accuracy) \
                and 0 <= accuracy <= 1:
            out[name] = float(accuracy)
    return out


def public_accuracies(evaluation: Mapping[str, Any] | None, rule: BestRoundRule) -> dict[str, float]:
    """benchmark -> accuracy of every benchmark of a round's evaluation that `rule` counts (declared public)."""
    return {name: accuracy for name, accuracy in _accuracies(evaluation).items() if rule.counts(name)}


def round_score(server_round: int, evaluation: Mapping[str, Any] | None, rule: BestRoundRule) -> RoundScore | None:
    """The round's selection score under `rule`, or None: `off`, round 0 (the start model), or no declared-public
    benchmark scored."""
    if rule.by == "off" or server_round < 1:
        return None
    public = public_accuracies(evaluation, rule)
    if not public:
        return None
    if rule.by == "first":
        name = rule.primary if rule.primary in public else next(iter(public))
        public = {name: public[name]}
    return RoundScore(server_round, rule.by, public)


def undeclared(evaluation: Mapping[str, Any] | None, rule: BestRoundRule) -> list[str]:
    """The benchmarks a round was scored on that may not choose the best round because nobody declared them
    public (the schools' held-out faces, which never may, are not named)."""
    return [name for name in _accuracies(evaluation) if not rule.counts(name)]


def first_public(benchmarks: str, public: frozenset[str]) -> str:
    """The name of the first benchmark of `evaluation.benchmarks` declared public ("" if none is)."""
    names = [spec.split("=", 1)[0].strip() for spec in split_benchmark_list(benchmarks)]   # evaluation.spec_name
    return next((name for name in names if is_declared_public(name, public)), "")


def beats(candidate: RoundScore, best: RoundScore | None) -> bool:
    """Does `candidate` score strictly higher than `best` on the benchmarks both were scored on? (A tie
    keeps the earlier round; rounds with no benchmark in common are not compared: the best stays.)"""
    if best is None:
        return True
    common = sorted(set(candidate.accuracies) & set(best.accuracies))
    return bool(common) and candidate.on(common) > best.on(common)


def best_of(evaluations: Mapping[int, Mapping[str, Any] | None], rule: BestRoundRule) -> RoundScore | None:
    """The best round of {round: evaluation} (e.g. metrics.jsonl), chosen as the run chooses it."""
    best: RoundScore | None = None
    for server_round in sorted(evaluations):
        candidate = round_score(server_round, evaluations[server_round], rule)
        if candidate is not None and beats(candidate, best):
            best = candidate
    return best


def rounds_missing(benchmark: str, evaluations: Mapping[int, Mapping[str, Any] | None]) -> list[int]:
    """The rounds (>= 1) of {round: evaluation} that were scored but not on `benchmark` (a canonical name, any
    split): a benchmark may be declared public on a resume only if this is empty, for then the best round chosen
    again from the stored scores is the one a run that declared it from the start would have chosen. A round
    recorded without any score (its evaluation failed) is not missing: no run could have scored it."""
    declared = BestRoundRule("mean", frozenset({benchmark}))
    return [server_round for server_round in scored_rounds(evaluations)
            if not public_accuracies(evaluations[server_round], declared)]


def scored_rounds(evaluations: Mapping[int, Mapping[str, Any] | None]) -> list[int]:
    """The rounds (>= 1, in order) of {round: evaluation} with at least one accuracy (any benchmark)."""
    return [server_round for server_round in sorted(evaluations)
            if server_round >= 1 and _accuracies(evaluations[server_round])]


def score_from_json(value: Any) -> RoundScore | None:
    """A RoundScore from what `to_json` wrote (best.pt's "best" field, best.json), or None if it is not one."""
    if not isinstance(value, Mapping):
        return None
    server_round, by, accuracies = value.get("round"), value.get("by"), value.get("accuracies")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        return None
    if by not in KEEP_BEST_CHOICES or not isinstance(accuracies, Mapping) or not accuracies:
        return None
    checked = _accuracies({name: {"accuracy": acc} for name, acc in accuracies.items()})
    if len(checked) != len(accuracies):
        return None
    return RoundScore(server_round, str(by), checked)


def last_scored(evaluations: Mapping[int, Mapping[str, Any] | None]) -> RoundScore | None:
    """The last round (>= 1) with a score, every benchmark but the schools' held-out faces counted: for showing
    beside the best round only (`compare_line` compares the two on the benchmarks both were scored on, which
    are the best's declared-public ones)."""
    for server_round in sorted(evaluations, reverse=True):
        scored = _accuracies(evaluations[server_round])
        if server_round >= 1 and scored:
            return RoundScore(server_round, "mean", scored)
    return None


def compare_line(best: RoundScore, last: RoundScore | None, start: Mapping[str, Any] | None = None) -> str:
    """`best round 3 on the public benchmarks: 0.889 on synthetic-fer2013; last round 28: 0.540` — the last
    round scored on the benchmarks the best was, so the two numbers compare. `start`: round 0's evaluation (the
    start model, never a candidate); when it scored higher on those benchmarks than the best round, the line says
    so: best.pt is then the best *federated* model, not the best model the run saw."""
    text = f"best round {best.round} on the public benchmarks: {best.describe()}"
    if last is None or last.round == best.round:
        text = text + ", the last round" if last is not None else text
    else:
        common = sorted(set(last.accuracies) & set(best.accuracies))
        text += f"; last round {last.round}: " + (f"{last.on(common):.3f}" if common else last.describe())
    started = _accuracies(start)
    common = [name for name in best.accuracies if name in started]
    if common and len(common) == len(best.accuracies):
        start_score = RoundScore(0, best.by, {name: started[name] for name in common}).on(common)
        if start_score > best.on(common):
            text += f"; the start model (round 0) scored {start_score:.3f} there, higher than every round"
    return text
