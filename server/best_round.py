"""Which round's global model is the best one: chosen on the public benchmarks only.

A federation's last round is not always its best (noise, a learning rate too large for small schools). The
evaluation node scores every round's global model on public benchmarks, so the run can keep the round that
scored best there as ``checkpoints/best.pt`` (server/round_writer.py writes it, server/run_dir.py stores it).

Why this costs no privacy: every global model is already a DP release (each school's update is noised before it
leaves the school; FedAvg and the server momentum are post-processing), and choosing one of them by a score
computed on public data only is post-processing too — it reads nothing of any school. Choosing by the schools'
held-out faces (`synthetic-indomain`) would not be: that is school data, and it does not exist in a deployment.
So those benchmarks (`shared_models.datasets.SCHOOL_DATA_BENCHMARKS`) never enter the score.

`evaluation.keep_best` says how a round is scored:
- ``mean``: the mean accuracy over the public benchmarks the round was scored on (the default);
- ``first``: the accuracy on the config's first public benchmark (else the first the evaluation node scored);
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
from shared_models.datasets import is_school_data, split_benchmark_list

KEEP_BEST_CHOICES = RULES["evaluation.keep_best"].choices or ()


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


def public_accuracies(evaluation: Mapping[str, Any] | None) -> dict[str, float]:
    """benchmark -> accuracy of every public benchmark in a round's evaluation (school-data benchmarks and
    anything without a finite accuracy in [0, 1] left out), in the evaluation's order."""
    out: dict[str, float] = {}
    for name, metrics in (evaluation or {}).items():
        if not isinstance(name, str) or is_school_data(name) or not isinstance(metrics, Mapping):
            continue
        accuracy = metrics.get("accuracy")
        if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and math.isfinite(accuracy) \
                and 0 <= accuracy <= 1:
            out[name] = float(accuracy)
    return out


def round_score(server_round: int, evaluation: Mapping[str, Any] | None, by: str, primary: str) -> RoundScore | None:
    """The round's selection score under `by` (`evaluation.keep_best`), or None: `off`, round 0 (the start
    model), or no public benchmark scored. `primary` is the config's first benchmark (used by `first`)."""
    if by == "off" or server_round < 1:
        return None
    public = public_accuracies(evaluation)
    if not public:
        return None
    if by == "first":
        name = primary if primary in public else next(iter(public))
        public = {name: public[name]}
    return RoundScore(server_round, by, public)


def first_public(benchmarks: str) -> str:
    """The name of the first public benchmark of `evaluation.benchmarks` ("" if it lists none)."""
    names = [spec.split("=", 1)[0].strip() for spec in split_benchmark_list(benchmarks)]   # evaluation.spec_name
    return next((name for name in names if not is_school_data(name)), "")


def beats(candidate: RoundScore, best: RoundScore | None) -> bool:
    """Does `candidate` score strictly higher than `best` on the benchmarks both were scored on? (A tie
    keeps the earlier round; rounds with no benchmark in common are not compared: the best stays.)"""
    if best is None:
        return True
    common = sorted(set(candidate.accuracies) & set(best.accuracies))
    return bool(common) and candidate.on(common) > best.on(common)


def best_of(evaluations: Mapping[int, Mapping[str, Any] | None], by: str, primary: str) -> RoundScore | None:
    """The best round of {round: evaluation} (e.g. metrics.jsonl), chosen as the run chooses it."""
    best: RoundScore | None = None
    for server_round in sorted(evaluations):
        candidate = round_score(server_round, evaluations[server_round], by, primary)
        if candidate is not None and beats(candidate, best):
            best = candidate
    return best


def score_from_json(value: Any) -> RoundScore | None:
    """A RoundScore from what `to_json` wrote (best.pt's "best" field, best.json), or None if it is not one."""
    if not isinstance(value, Mapping):
        return None
    server_round, by, accuracies = value.get("round"), value.get("by"), value.get("accuracies")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        return None
    if by not in KEEP_BEST_CHOICES or not isinstance(accuracies, Mapping) or not accuracies:
        return None
    checked = public_accuracies({name: {"accuracy": acc} for name, acc in accuracies.items()})
    if len(checked) != len(accuracies):
        return None
    return RoundScore(server_round, str(by), checked)


def last_scored(evaluations: Mapping[int, Mapping[str, Any] | None]) -> RoundScore | None:
    """The last round (>= 1) with a public score, all its public benchmarks counted (`compare_line` then
    compares it with the best on the benchmarks both were scored on)."""
    for server_round in sorted(evaluations, reverse=True):
        score = round_score(server_round, evaluations[server_round], "mean", "")
        if score is not None:
            return score
    return None


def compare_line(best: RoundScore, last: RoundScore | None) -> str:
    """`best round 3 on the public benchmarks: 0.889 on synthetic-fer2013; last round 28: 0.540` — the last
    round scored on the benchmarks the best was, so the two numbers compare."""
    text = f"best round {best.round} on the public benchmarks: {best.describe()}"
    if last is None or last.round == best.round:
        return text + " (the last round)" if last is not None else text
    common = sorted(set(last.accuracies) & set(best.accuracies))
    return text + f"; last round {last.round}: " + (f"{last.on(common):.3f}" if common else last.describe())
