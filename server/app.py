"""fedfer ServerApp: build the model, run SchoolFedAvg round by round, keep the run directory.

Each round: schools train (DP) -> replies validated -> FedAvg -> the evaluation node scores the new
global model (or the server does, in-process, when the federation has no evaluation node) -> one
metrics line, ledger copies and a checkpoint are written -> one progress line is logged.

With an evaluation node, round r's model is evaluated *during round r+1* (its evaluate message rides
with round r+1's train messages, see server/strategy.py), so round r's metrics line and progress line
are written one round later, when that evaluation arrives; the final round's model is evaluated right
after the final round, as before. Round r's checkpoint does not wait: it is written as soon as round r's
released model exists, marked unevaluated (latest.json `"evaluated": false`, the round's record in the
checkpoint's strategy state) until its metrics line is written. If the coordinator stops in between,
`run.resume` continues after round r and gets round r's model evaluated first: in the resumed run's
first exchange, or in an evaluate-only exchange when no round is left. So no school trains a round twice
and metrics.jsonl still ends with exactly one line per round.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.array_packing import PackedGrid
from server.polling_grid import PollingGrid
from server.run_dir import RunDirectory, _json_default, check_resume_dir
from server.strategy import RoundRecord, SchoolFedAvg
from shared_models import registry
from shared_models.config import from_run_config

app = ServerApp()


def progress_line(record: RoundRecord, total_rounds: int, primary: str, seconds: float) -> str:
    """`round 3/12 | schools 6/6 ok | synthetic-rafdb acc 0.412 [0.389, 0.436] | ε max 3.10 | 14.2 s`"""
    ok = [s for s, o in record.train.items() if o.get("status") == "ok"]
    eps = [float(o["epsilon"]) for o in record.train.values() if o.get("status") == "ok" and "epsilon" in o]
    parts = [f"round {record.round}/{total_rounds}", f"schools {len(ok)}/{len(record.train)} ok"]
    refused = sorted({o["status"] for o in record.train.values() if o.get("status") != "ok"})
    if refused:
        parts[-1] += f" ({', '.join(refused)})"
    bench = record.evaluation.get(primary)
    if bench:
        ci = f" [{bench['accuracy_ci_low']:.3f}, {bench['accuracy_ci_high']:.3f}]" if bench.get("accuracy_ci_low") is not None else ""
        parts.append(f"{primary} acc {bench['accuracy']:.3f}{ci}")
    if eps:
        parts.append(f"ε max {max(eps):.2f}")
    parts.append(f"{seconds:.1f} s")
    return " | ".join(parts)


class RoundWriter:
    """Writes each finished round: checkpoint, then metrics line and progress line.

    `checkpoint` is the strategy's `on_round_trained`, called once per trained round with the released
    model, before any evaluation of it. `finish_round` is Flower's `evaluate_fn` (called after every
    round); `write` is the strategy's `on_round_end`, called once per round when that round's evaluation
    is settled: right away without an evaluation node or after the final round, else during the next
    round's training exchange.
    """

    def __init__(self, run: RunDirectory, strategy: SchoolFedAvg, cfg: Mapping[str, Any], model_info: Mapping[str, Any],
                 evaluate_in_process: Callable[[ArrayRecord], dict[str, dict[str, Any]]], federation_dp: Any = None) -> None:
        self.run, self.strategy, self.cfg, self.model_info = run, strategy, cfg, model_info
        self.evaluate_in_process = evaluate_in_process
        self.federation_dp = federation_dp
        self.total_rounds = int(cfg["federation.rounds"])
        self.primary = str(cfg["evaluation.benchmarks"]).split(",")[0].split("=")[0].strip()
        self.round_start = time.perf_counter()
        strategy.on_round_end = self.write
        strategy.on_round_trained = self.checkpoint
        self.checkpointed: set[int] = set()

    def checkpoint(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """Round `record.round`'s released model exists: account the release (client-level DP) and write
        its checkpoint now, marked unevaluated, so a coordinator that stops from here on resumes after
        this round. The record (without its evaluation) is kept in the checkpoint so a resumed run can
        still write the round's metrics line."""
        if self.federation_dp is not None and record.aggregated and record.federation_epsilon is None:
            record.federation_epsilon = float(self.federation_dp.record_release(record.round)["epsilon"])
        saved = asdict(record)
        saved["timing"].setdefault("round_seconds", time.perf_counter() - self.round_start)
        # plain JSON types only: `fedfer evaluate` loads checkpoints with torch.load(weights_only=True)
        saved = json.loads(json.dumps(saved, default=_json_default))
        self.run.save_checkpoint(record.round, arrays.to_torch_state_dict(), self.model_info, self.cfg,
                                 {**self.strategy.state(), "unevaluated": saved}, evaluated=False)
        self.checkpointed.add(record.round)

    def finish_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Flower after each round's training (and the final round's evaluation)."""
        strategy, record = self.strategy, self.strategy.record
        if server_round == 0 or record is None:
            return None
        if strategy.finished and not record.train:
            strategy.round_done(None, arrays, pipeline=False)   # the last trained round, if still waiting
            return None
        strategy.round_done(record, arrays, pipeline=not strategy.is_final_round(server_round))
        if "round_seconds" not in record.timing:   # waiting for its evaluation: the round's own time ends here
            self._stamp(record)
        return None

    def _stamp(self, record: RoundRecord) -> None:
        now = time.perf_counter()
        record.timing["round_seconds"] = now - self.round_start
        self.round_start = now

    def write(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        if not record.evaluation:
            if self.strategy.evaluator_nodes():
                log(WARNING, "[fedfer] round %d: the evaluation node did not answer; evaluating in-process", record.round)
            started = time.perf_counter()
            record.evaluation = self.evaluate_in_process(arrays)
            record.evaluated_by = "server-in-process"
            record.timing["evaluate_compute_s"] = time.perf_counter() - started
        if "round_seconds" not in record.timing:
            self._stamp(record)
        seconds = float(record.timing["round_seconds"])
        self.run.append_metrics({
            "round": record.round, "aggregated": record.aggregated, "train": record.train,
            "evaluation": record.evaluation, "evaluated_by": record.evaluated_by,
            **({"evaluated_in_round": record.evaluated_in_round} if record.evaluated_in_round else {}),
            **({"federation_epsilon": record.federation_epsilon} if record.federation_epsilon is not None else {}),
            "timing": {"round_seconds": seconds, **record.timing},
        })
        if record.round in self.checkpointed or record.round == self.strategy.round_offset:
            self.run.mark_evaluated(record.round)
        else:   # not reached through configure_evaluate (should not happen): the checkpoint goes with its line
            self.run.save_checkpoint(record.round, arrays.to_torch_state_dict(), self.model_info, self.cfg, self.strategy.state())
            self.checkpointed.add(record.round)
        log(INFO, "[fedfer] %s", progress_line(record, self.total_rounds, self.primary, seconds))


def unevaluated_round(run: RunDirectory, checkpoint: Mapping[str, Any]) -> RoundRecord | None:
    """The checkpoint's round record if its metrics line was never written (the coordinator stopped
    while that round's model waited for its evaluation), else None."""
    saved = checkpoint.get("strategy", {}).get("unevaluated")
    if not saved or int(saved.get("round", -1)) != int(checkpoint["round"]):
        return None
    if any(int(line.get("round", -1)) == int(checkpoint["round"]) for line in run.metrics()):
        return None
    return RoundRecord(**saved)


def resume_pending(strategy: SchoolFedAvg, record: RoundRecord | None, arrays: ArrayRecord, remaining: int) -> int:
    """Queue a resumed checkpoint's unevaluated round for evaluation; returns the number of rounds to run.

    With rounds left, the record becomes the strategy's pending round: its evaluate message rides with
    the first train exchange (or it is evaluated in-process if no evaluation node answers). With none
    left, one round with no training runs, so the model gets an evaluate-only exchange."""
    if record is None:
        return remaining
    strategy.pending = (record, arrays)
    if remaining <= 0:
        strategy.finished = True
        return 1
    return remaining


def trace_benchmark_opens(trace_file: str) -> None:
    """Record every file this (server) process opens under a `public/` benchmark folder.

    Used by the tests to show that with an evaluation node the coordinator never reads benchmark data.
    """
    import sys

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            path = args[0].decode() if isinstance(args[0], bytes) else args[0]
            if "/public/" in path and not path.startswith(trace_file):
                with open(trace_file, "a", encoding="utf-8") as handle:
                    handle.write(path + "\n")

    sys.addaudithook(hook)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_run_config(context.run_config)
    if os.environ.get("FEDFER_TRACE_OPENS"):
        trace_benchmark_opens(os.environ["FEDFER_TRACE_OPENS"])
    round_offset, exhausted, momentum, unevaluated = 0, [], None, None
    if cfg["run.resume"]:
        run = RunDirectory(Path(str(cfg["run.resume"])).expanduser().resolve())
        # loaded with weights_only=True and checked field by field (the CLI ran the same check before Flower)
        _, checkpoint, checkpoint_cfg = check_resume_dir(run.path)
        cfg = {**checkpoint_cfg, "run.resume": str(run.path)}
        round_offset, exhausted = int(checkpoint["round"]), checkpoint["strategy"].get("exhausted", [])
        momentum = checkpoint["strategy"].get("momentum")
        state_dict = checkpoint["state_dict"]
        unevaluated = unevaluated_round(run, checkpoint)
        run.event("resumed", round=round_offset, **({"unevaluated": round_offset} if unevaluated else {}))
    else:
        run = RunDirectory.create(cfg)
        state_dict = None
    log(INFO, "[fedfer] run directory %s", run.path)

    model_info = {"name": str(cfg["model.name"]), "preset": str(cfg["model.preset"]), "num_classes": 7}
    model = registry.build(model_info["name"], num_classes=7, preset=model_info["preset"])
    if state_dict is not None:
        model.load_state_dict(state_dict)
    elif cfg["model.pretrained"]:
        report = registry.load_pretrained(model, str(cfg["model.pretrained"]))
        log(INFO, "[fedfer] pretrained: %s", report)

    total_rounds = int(cfg["federation.rounds"])
    remaining = total_rounds - round_offset
    if remaining <= 0 and unevaluated is None:
        log(INFO, "[fedfer] %s already finished %d rounds", run.path, round_offset)
        return
    in_process_cache: dict = {}

    # The model travels packed (one array per dtype): Flower moves every array as its own object, one
    # request per hop. PackedGrid unpacks each reply before the strategy, validation and FedAvg see it.
    # PollingGrid: replies are collected every 0.1 s instead of Flower's fixed 3 s (deployment's HttpGrid).
    grid = PackedGrid(PollingGrid(grid))
    strategy = SchoolFedAvg(cfg, run, round_offset=round_offset, exhausted=exhausted, momentum=momentum)
    runner = strategy
    federation_dp = None
    if bool(cfg["federation.client_dp"]):
        from server.client_dp import FederationAccountant

        sampled = max(int(round(int(cfg["federation.schools"]) * float(cfg["federation.fraction_train"]))),
                      int(cfg["federation.min_train_schools"]))
        federation_dp = FederationAccountant(cfg, run, sampled)
        runner = federation_dp.wrap(strategy)
        strategy.weighted_by_key = "unit-weight"
        strategy.on_round_start = federation_dp.round_started

    def evaluate_in_process(arrays: ArrayRecord) -> dict[str, dict[str, Any]]:
        from shared_models.benchmark_suite import evaluate_benchmarks
        from client.node import _synthetic_root

        model.load_state_dict(arrays.to_torch_state_dict())
        root = _synthetic_root(cfg)
        return evaluate_benchmarks(model, str(cfg["evaluation.benchmarks"]), root, cfg, cache=in_process_cache,
                                   ensure_synthetic=True)

    writer = RoundWriter(run, strategy, cfg, model_info, evaluate_in_process, federation_dp)
    if unevaluated is not None:
        log(INFO, "[fedfer] round %d's model has no metrics line yet: it is evaluated first", round_offset)
    num_rounds = resume_pending(strategy, unevaluated, ArrayRecord(model.state_dict()), remaining)
    runner.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=num_rounds,
        timeout=float(cfg["federation.round_timeout"]),
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=writer.finish_round,
    )
    try:
        from server.report import write_report

        report = write_report(run.path)
        log(INFO, "[fedfer] report %s", report)
    except Exception as exc:  # the run's results are already on disk; a plotting problem must not hide them
        log(WARNING, "[fedfer] report not written: %s", exc)
    log(INFO, "[fedfer] finished: %s", run.path)
