"""fedfer ServerApp: config -> run (new or resumed) -> strategy -> rounds -> report.

Each round: schools train under DP -> replies validated -> FedAvg(M) -> the evaluation node scores the
new global model -> checkpoint, metrics line, ledger copies (server/strategy.py, server/round_writer.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.best_round import compare_line
from server.round_writer import RoundWriter
from server.run_dir import BEST_CHECKPOINT, RunDirectory, last_public_score, start_evaluation
from server.run import check_keyring, resume_pending, start_is_scored, start_or_resume, trace_benchmark_opens
from server.simulation_cluster import check_ray_cluster
from server.strategy import RoundRecord, SchoolFedAvg, run_rounds
from server.transport import fast_grid
from shared_models.config import from_run_config
from shared_models.wording import counted, one_line

# Opacus configures the root logger when it is imported (`logging.basicConfig` in opacus/utils/module_utils.py),
# so every Flower record reached the console twice: through Flower's own handler and the root's.
logging.getLogger("flwr").propagate = False

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_federation(grid, context)
    except ValueError as exc:   # ConfigError, CheckpointError, ResumeRefused, …: the admin's input, named
        # one line first: Flower follows a ServerApp's exception with its traceback and exit code 201
        log(ERROR, "[fedfer] refused: %s", one_line(exc))
        raise


def run_federation(grid: Grid, context: Context) -> None:
    if os.environ.get("FEDFER_TRACE_OPENS"):   # tests: prove the coordinator never reads benchmark files
        trace_benchmark_opens(os.environ["FEDFER_TRACE_OPENS"])
    requested = from_run_config(context.run_config)
    check_keyring(requested)
    cluster = check_ray_cluster(grid, str(requested["federation.ray_address"]))
    if cluster:
        log(INFO, "[fedfer] simulated schools run on the Ray cluster at %s", cluster)
    if requested["run.resume"]:   # refused before anything is read or written if another ServerApp runs it
        RunDirectory(Path(str(requested["run.resume"])).expanduser().resolve()).check_not_busy()
    start = start_or_resume(requested)
    with start.run.hold():
        _run_rounds(grid, start)


def _run_rounds(grid: Grid, start) -> None:  # noqa: ANN001 - server.run.RunStart
    cfg, run = start.cfg, start.run
    log(INFO, "[fedfer] run directory %s", run.path)
    if start.finished:
        log(INFO, "[fedfer] %s already finished %s", run.path, counted(start.round_offset, "round"))
        # a run stopped after its last round, while its report was drawn, still gets one (rebuilt from the run dir)
        _write_report(run.path)
        return

    federation_dp = None
    if bool(cfg["federation.client_dp"]):
        from server.client_dp import FederationAccountant

        federation_dp = FederationAccountant.from_config(cfg, run)
    writer = RoundWriter(run, cfg, start.round_offset, federation_dp, public_added=start.public_added)
    strategy = SchoolFedAvg(cfg, run, round_offset=start.round_offset, rounds=writer,
                            exhausted=start.strategy_state.get("exhausted", []),
                            left_out=start.strategy_state.get("left_out", {}),
                            momentum=start.strategy_state.get("momentum"))
    runner = federation_dp.wrap(strategy) if federation_dp is not None else strategy

    initial = ArrayRecord(start.model.state_dict())
    if start.round_offset == 0 and cfg["model.pretrained"] and not start_is_scored(run):
        # the pre-trained model is round 0: the evaluation node scores it alongside round 1's training
        strategy.pending = (RoundRecord(0, timing={"round_seconds": 0.0}), initial)
    run_rounds(
        runner, strategy,
        # replies are validated as they arrive, except under client-level DP (Flower's wrapper clips them first)
        grid=fast_grid(grid, on_replies=strategy.replies_arrived if federation_dp is None else None),
        initial_arrays=initial,
        num_rounds=resume_pending(strategy, start.unevaluated, initial, start.remaining),
        timeout=float(cfg["federation.round_timeout"]),
    )
    if writer.best is not None and writer.best_kept:   # the last round is not always the best: say which one best.pt holds
        line = compare_line(writer.best, last_public_score(run.path), start_evaluation(run.path))
        log(INFO, "[fedfer] %s — kept as %s", line,
            run.path / "checkpoints" / BEST_CHECKPOINT)
    elif writer.best is not None:   # chosen again after a resume declared its benchmark, its checkpoint long pruned
        log(WARNING, "[fedfer] %s — its weights were not kept, so there is no checkpoints/best.pt",
            compare_line(writer.best, last_public_score(run.path), start_evaluation(run.path)))
    _write_report(run.path)


def _write_report(run_path) -> None:  # noqa: ANN001
    from server.report import write_report

    try:
        log(INFO, "[fedfer] report %s", write_report(run_path))
    except Exception as exc:  # the run's results are already on disk; a plotting problem must not hide them
        log(WARNING, "[fedfer] report not written: %s", exc)
    log(INFO, "[fedfer] finished: %s", run_path)
