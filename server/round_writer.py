"""Writing each finished round to the run directory: checkpoint, metrics line, progress line.

Pipelined evaluation, in one place: with an evaluation node, round r's model is evaluated *during
round r+1* (its evaluate message rides with round r+1's train messages, server/strategy.py), so round
r's metrics and progress lines are written one round later, when that evaluation arrives; the final
round's model gets its own exchange. Round r's checkpoint does not wait: it is written as soon as the
released model exists, marked unevaluated (latest.json `"evaluated": false`) until its metrics line is
written. A coordinator that stops in between resumes after round r and has round r's model evaluated
first (server/run.py), so no school trains a round twice and metrics.jsonl ends with exactly one line
per round.

The best round: when a round's evaluation is settled, its global model replaces checkpoints/best.pt if it scored
higher on the public benchmarks than every round before (server/best_round.py says how, and why it costs no
privacy). best.pt is written before the round's metrics line: a coordinator that stops in between evaluates the
round again on resume and finds it already kept. A resumed run starts from the best.pt it finds.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord
from flwr.common.logger import log

from server.best_round import BestRoundRule, RoundScore, beats, best_of, round_score, undeclared
from server.run_dir import BEST_CHECKPOINT, BEST_JSON, CheckpointError, RunDirectory, _json_default, load_checkpoint_file
from server.strategy import RoundRecord
from shared_models.datasets import split_benchmark_list
from shared_models.evaluation import evaluate_benchmarks, spec_name
from shared_models.models import registry
from shared_models.wording import one_line


NAMED_IN_PROGRESS = 3   # schools named in a round's progress line when they did not train


def progress_line(record: RoundRecord, total_rounds: int, primary: str, seconds: float) -> str:
    """`round 3/12 | schools 6/6 ok | synthetic-rafdb acc 0.412 [0.389, 0.436] | ε max 3.10 | 14.2 s`"""
    ok = [s for s, o in record.train.items() if o.get("status") == "ok"]
    eps = [float(o["epsilon"]) for o in record.train.values() if o.get("status") == "ok" and "epsilon" in o]
    parts = [f"round {record.round}/{total_rounds}", f"schools {len(ok)}/{len(record.train)} ok"]
    refused = {school: str(o.get("status")) for school, o in sorted(record.train.items()) if o.get("status") != "ok"}
    if refused:   # the schools by name while they fit on the line (events.jsonl has the reasons)
        if len(refused) <= NAMED_IN_PROGRESS:
            parts[-1] += " (" + ", ".join(f"{school}: {status}" for school, status in refused.items()) + ")"
        else:
            counts = {status: list(refused.values()).count(status) for status in sorted(set(refused.values()))}
            parts[-1] += " (" + ", ".join(f"{n} {status}" for status, n in counts.items()) + ")"
    # the config's first benchmark, else the first the evaluation node scored (a deployed evaluator has its own list)
    shown = primary if primary in record.evaluation else next(iter(record.evaluation), primary)
    bench = record.evaluation.get(shown)
    if bench:
        ci = f" [{bench['accuracy_ci_low']:.3f}, {bench['accuracy_ci_high']:.3f}]" if bench.get("accuracy_ci_low") is not None else ""
        parts.append(f"{shown} acc {bench['accuracy']:.3f}{ci}")
    if eps:
        parts.append(f"ε max {max(eps):.2f}")
    parts.append(f"{seconds:.1f} s")
    return " | ".join(parts)


class RoundWriter:
    """Implements the strategy's RoundHooks: checkpoint when a round's model is released, metrics line
    and progress line when its evaluation is settled (evaluating in-process if no evaluation node
    answered), and the round's wall time."""

    def __init__(self, run: RunDirectory, cfg: Mapping[str, Any], round_offset: int = 0, federation_dp: Any = None,
                 public_added: tuple[str, ...] = ()) -> None:
        self.run, self.cfg, self.round_offset = run, cfg, round_offset
        self.model_info = registry.model_info(cfg)
        self.federation_dp = federation_dp
        self.total_rounds = int(cfg["federation.rounds"])
        self.primary = spec_name(split_benchmark_list(str(cfg["evaluation.benchmarks"]))[0])
        self.round_start = time.perf_counter()
        self.checkpointed: set[int] = set()
        self._model: Any = None             # built on first in-process evaluation
        self._benchmark_cache: dict = {}
        self.keep_best = str(cfg["evaluation.keep_best"])
        self.best_rule = BestRoundRule.from_config(cfg)
        self.named_undeclared: set[str] = set()   # benchmarks already named as not declared public (said once)
        #: False while the best round's weights are not in best.pt (it scored best before a resume declared its
        #: benchmark public, and its checkpoint was pruned): the run's end says so instead of naming best.pt
        self.best_kept = True
        self.best: RoundScore | None = (self._best_chosen_again(public_added) if public_added and self.keep_best != "off"
                                        else self._best_so_far())

    def _best_so_far(self) -> RoundScore | None:
        """The best round a resumed run kept before it stopped (None for a new run): best.pt's.

        If metrics.jsonl records a better round than best.pt holds (a run started before best.pt was kept, or a
        damaged best.pt, which is named in one warning), that round's checkpoint becomes best.pt while it is
        still on disk (the last two rounds are); if its weights were pruned, the best round still on disk does,
        and a warning names the round that was lost."""
        if self.keep_best == "off":
            return None
        try:
            kept = self.run.best_checkpoint()
        except CheckpointError as exc:
            reason = one_line(exc)[:200]
            log(WARNING, "[fedfer] %s; it is replaced", reason)
            self.run.event("best-unreadable", reason=reason)
            kept = None
        scored = {line["round"]: line.get("evaluation") for line in self.run.metrics()}
        recorded = best_of(scored, self.best_rule)
        if recorded is None or (kept is not None and not beats(recorded, kept)):
            return kept
        folder = self.run.path / "checkpoints"
        on_disk = {rnd: evaluation for rnd, evaluation in scored.items() if (folder / f"round-{rnd:04d}.pt").is_file()}
        if recorded.round not in on_disk:
            log(WARNING, "[fedfer] round %d scored best on the public benchmarks (%s) but its weights are no longer "
                "on disk; best.pt keeps the best round from those that are", recorded.round, recorded.describe())
            self.run.event("best-weights-gone", round=recorded.round)
            recorded = best_of(on_disk, self.best_rule)
            if recorded is None or (kept is not None and not beats(recorded, kept)):
                return kept
        try:
            checkpoint = load_checkpoint_file(folder / f"round-{recorded.round:04d}.pt")
        except CheckpointError:
            return kept   # the resume itself checks the latest checkpoint; an older damaged one is not best.pt's business
        self.run.save_best(recorded, checkpoint["state_dict"], checkpoint["model"], self.cfg,
                           list(checkpoint.get("strategy", {}).get("exhausted", [])))
        return recorded

    def _best_chosen_again(self, added: tuple[str, ...]) -> RoundScore | None:
        """The resume declared `added` public: the best round is chosen again from metrics.jsonl's scores under the
        run's new list, exactly as a run that declared them from the start chose it round by round (best_of), and
        best.pt (chosen on the old list, or none) is replaced by that round's checkpoint. Only the last two rounds'
        checkpoints are kept: if the best round's weights are gone, one line says so, the old best.pt (not the best
        under the new list) is removed, and the round stays the one a later round must beat, as in that run."""
        scored = {line["round"]: line.get("evaluation") for line in self.run.metrics()}
        best = best_of(scored, self.best_rule)
        folder = self.run.path / "checkpoints"
        if best is None:
            return None
        checkpoint = None
        # its round's checkpoint, or best.pt if the old list chose the same round (its round checkpoint may be pruned)
        for source in (folder / f"round-{best.round:04d}.pt", folder / BEST_CHECKPOINT):
            try:
                candidate = load_checkpoint_file(source)
            except CheckpointError:   # pruned (the usual case) or unreadable: not these weights
                continue
            if candidate.get("round") == best.round:
                checkpoint = candidate
                break
        if checkpoint is None:
            for stale in (BEST_CHECKPOINT, BEST_JSON):
                (folder / stale).unlink(missing_ok=True)
            log(WARNING, "[fedfer] with %s declared public, round %d scored best (%s), but its weights were not kept "
                "(a run keeps its last two rounds' checkpoints): no checkpoints/best.pt until a later round beats it",
                ", ".join(added), best.round, best.describe())
            self.run.event("best-weights-gone", round=best.round, score=best.to_json(), after_adding=list(added))
            self.best_kept = False
            return best
        self.run.save_best(best, checkpoint["state_dict"], checkpoint["model"], self.cfg,
                           list(checkpoint.get("strategy", {}).get("exhausted", [])))
        log(INFO, "[fedfer] with %s declared public, round %d scored best (%s): kept as %s", ", ".join(added),
            best.round, best.describe(), folder / BEST_CHECKPOINT)
        self.run.event("best-chosen-again", round=best.round, score=best.to_json(), after_adding=list(added))
        return best

    def round_started(self) -> None:
        if self.federation_dp is not None:
            self.federation_dp.round_started()

    def round_trained(self, record: RoundRecord, arrays: ArrayRecord, strategy_state: dict[str, Any]) -> None:
        """Round `record.round`'s released model exists: account the release (client-level DP) and write
        its checkpoint now, marked unevaluated, so a coordinator that stops from here on resumes after
        this round. The record (without its evaluation) is kept in the checkpoint so a resumed run can
        still write the round's metrics line."""
        if self.federation_dp is not None and record.aggregated and record.federation_epsilon is None:
            record.federation_epsilon = float(self.federation_dp.record_release(record.round)["epsilon"])
        saved = asdict(record)
        saved["timing"].setdefault("round_seconds", time.perf_counter() - self.round_start)
        # plain JSON types only: checkpoints are loaded with torch.load(weights_only=True)
        saved = json.loads(json.dumps(saved, default=_json_default))
        self.run.save_checkpoint(record.round, arrays.to_torch_state_dict(), self.model_info, self.cfg,
                                 {**strategy_state, "unevaluated": saved}, evaluated=False)
        self.checkpointed.add(record.round)

    def round_closed(self, record: RoundRecord) -> None:
        if "round_seconds" not in record.timing:   # waiting for its evaluation: the round's own time ends here
            self._stamp(record)

    def _stamp(self, record: RoundRecord) -> None:
        now = time.perf_counter()
        record.timing["round_seconds"] = now - self.round_start
        self.round_start = now

    def evaluate_in_process(self, arrays: ArrayRecord) -> dict[str, dict[str, Any]]:
        """The server scores the model itself (no evaluation node, or it did not answer): same code."""
        if self._model is None:
            self._model = registry.build_from_config(self.cfg)
        self._model.load_state_dict(arrays.to_torch_state_dict())
        root = Path(str(self.cfg["data.root"])) if self.cfg["data.root"] else None
        return evaluate_benchmarks(self._model, str(self.cfg["evaluation.benchmarks"]), root, self.cfg,
                                   cache=self._benchmark_cache)

    def round_settled(self, record: RoundRecord, arrays: ArrayRecord, strategy_state: dict[str, Any],
                      evaluator_expected: bool) -> None:
        if not record.evaluation:
            if evaluator_expected:
                log(WARNING, "[fedfer] round %d: the evaluation node did not answer; evaluating in-process", record.round)
            started = time.perf_counter()
            try:
                record.evaluation = self.evaluate_in_process(arrays)
                record.evaluated_by = "server-in-process"
            except (ValueError, OSError) as exc:
                # a deployed coordinator holds no benchmark data (the evaluation node does): the round's training
                # is recorded without scores rather than ending the federation
                reason = one_line(exc)[:200]
                log(WARNING, "[fedfer] round %d: not evaluated (%s); the round is recorded without scores", record.round, reason)
                self.run.event("not-evaluated", round=record.round, reason=reason)
                record.evaluated_by = "none"
            record.timing["evaluate_compute_s"] = time.perf_counter() - started
        if "round_seconds" not in record.timing:
            self._stamp(record)
        seconds = float(record.timing["round_seconds"])
        self.keep_if_best(record, arrays, strategy_state)
        self.run.append_metrics({
            "round": record.round, "aggregated": record.aggregated, "train": record.train,
            "evaluation": record.evaluation, "evaluated_by": record.evaluated_by,
            **({"evaluated_in_round": record.evaluated_in_round} if record.evaluated_in_round else {}),
            **({"federation_epsilon": record.federation_epsilon} if record.federation_epsilon is not None else {}),
            "timing": {"round_seconds": seconds, **record.timing},
        })
        if record.round in self.checkpointed or record.round == self.round_offset:
            self.run.mark_evaluated(record.round)
        else:   # not reached through configure_evaluate (should not happen): the checkpoint goes with its line
            self.run.save_checkpoint(record.round, arrays.to_torch_state_dict(), self.model_info, self.cfg, strategy_state)
            self.checkpointed.add(record.round)
        log(INFO, "[fedfer] %s", progress_line(record, self.total_rounds, self.primary, seconds))

    def keep_if_best(self, record: RoundRecord, arrays: ArrayRecord, strategy_state: Mapping[str, Any]) -> None:
        """Round `record.round`'s model becomes checkpoints/best.pt if it beats the best so far on the public
        benchmarks (`evaluation.keep_best`, `evaluation.public_benchmarks`; the schools' own faces never count)."""
        candidate = round_score(record.round, record.evaluation, self.best_rule)
        self._name_undeclared(record, chosen_on=candidate)
        if candidate is None or not beats(candidate, self.best):
            return
        self.run.save_best(candidate, arrays.to_torch_state_dict(), self.model_info, self.cfg,
                           list(strategy_state.get("exhausted", [])))
        self.best, self.best_kept = candidate, True

    def _name_undeclared(self, record: RoundRecord, chosen_on: RoundScore | None) -> None:
        """Say once, in one line (and in events.jsonl), which scored benchmarks cannot choose the best round
        because `evaluation.public_benchmarks` does not list them: a deployment whose evaluation node holds
        fer2013 keeps no best round until someone declares fer2013 public, and should hear why."""
        if self.keep_best == "off" or record.round < 1:
            return
        new = [name for name in undeclared(record.evaluation, self.best_rule) if name not in self.named_undeclared]
        if not new:
            return
        self.named_undeclared.update(new)
        names = ", ".join(new)
        if chosen_on is None and self.best is None:
            consequence = "no best round is kept"
        else:
            consequence = "the best round is chosen on " + ", ".join(sorted((chosen_on or self.best).accuracies))   # type: ignore[union-attr]
        log(WARNING, "[fedfer] %s: %s not declared public in evaluation.public_benchmarks, so %s; list a benchmark "
            "there only if it holds public data, never a school's faces (docs/privacy.md)", names,
            "is" if len(new) == 1 else "are", consequence)
        self.run.event("benchmarks-not-public", round=record.round, benchmarks=new)
