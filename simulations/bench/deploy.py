"""Per-round overhead of a Flower deployment on this machine, before/after the warm executor.

A toy Flower app (written to a temp dir: a ClientApp that imports torch + opacus like the real one
and returns at once; a ServerApp that per round sends `train` to every node and then `evaluate` to
one node, as fedfer's ServerApp does with the schools and the evaluation node) runs on a real
deployment made by `fedfer deploy` (TLS + SuperNode authentication, loopback only). Because the
ClientApp computes nothing, a round's wall time *is* the deployment's overhead.

Modes:
  flower      Flower 1.41 defaults: SuperNode `--isolation subprocess` (a fresh `flwr-clientapp`
              process per message), SuperNode 3 s idle poll, ServerApp grid 3 s reply poll.
  warm        the school's warm executor (client/runtime/warm_executor.py: torch imported once, one fork
              per message); Flower's poll intervals unchanged.
  warm+poll   warm executor + SuperNode through client/runtime/supernode.py (0.5 s idle / 0.1 s reply
              poll, 0.05 s object-pull backoff) + ServerApp grid wrapped in
              server/transport.PollingGrid (0.1 s) + SuperLink through server/held_pulls.py (an empty
              pull waits up to `--hold` s, default 2, for a message; `--hold 0`: Flower's polling).
  warm+poll+packed  the same, with the model's 88 tensors sent as one array.
  flower+packed     Flower's defaults, model packed: what the warm executor + polls add alone.

Every message carries a model the size and shape of HAFNet's `cpu` preset (88 tensors, 315k floats).

    python -m simulations.bench.deploy [--nodes 3] [--rounds 5] [--modes flower,warm,warm+poll]

`--app fedfer` runs the real fedfer apps instead (`flwr run <repo>`: DP training at every school on
a tiny synthetic school, evaluation node on a tiny public benchmark; the ServerApp's PackedGrid +
PollingGrid, every school with its warm executor and short-poll SuperNode). Overhead per round =
the round's wall time (metrics.jsonl `timing.round_seconds`) minus the longest DP training a school
logged in its own `<state dir>/round-timing.jsonl` (replies carry no durations) minus the evaluation node's reported compute (`timing.evaluate_compute_s`). With
pipelined evaluation (round r−1's model is evaluated during round r's training exchange, metrics
line key `evaluated_in_round`) the two computes overlap, so the longer of the two is subtracted. `phases` (printed and in the JSON)
cuts the round of the school that replied last at its SuperNode's log lines (Receiving / Received /
Sending / Sent, ms timestamps) and its round-timing.jsonl: SuperNode pull, task start + FAB check + app
load, the handler's own phases, reply to the SuperNode, SuperNode push, and the rest of the round
(ServerApp push and pull, idle poll, validation, FedAvg, checkpoint).

`--max-load L` waits (60 s steps, up to 10 times) until the 1-minute load average is ≤ L before
each mode; the load average is recorded with every result.

Prints a table and writes benchmarks/deploy.json (with the command). Every process it starts is
stopped at the end (server/processes.py Supervisor), also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

TOY_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedfertoy"
version = "1.0.0"
description = "deployment overhead probe"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedfer"

[tool.flwr.app.components]
serverapp = "toyapp.server:app"
clientapp = "toyapp.client:app"

[tool.flwr.app.config]
rounds = 3
nodes = 2
out = ""
work-s = 0.0
poll-s = 0.0
arrays = 1
params = 1000
"""

TOY_CLIENT = '''"""Toy ClientApp: the real one's imports, no work (unless work-s > 0)."""
import os
import time

_T0 = time.perf_counter()
import numpy as np  # noqa: E402
import opacus  # noqa: E402,F401
import torch  # noqa: E402,F401
from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

IMPORT_S = time.perf_counter() - _T0
app = ClientApp()


def _reply(msg: Message, context: Context) -> Message:
    entered = time.time()
    start = time.perf_counter()
    work = float(context.run_config.get("work-s", 0.0))
    while time.perf_counter() - start < work:
        pass
    content = RecordDict({"metrics": MetricRecord({
        "num-examples": 1, "compute-s": time.perf_counter() - start, "import-s": IMPORT_S,
        "pid": os.getpid(), "t-enter": entered, "t-exit": time.time()})})
    if "arrays" in msg.content.array_records:
        content["arrays"] = msg.content.array_records["arrays"]
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context)
'''

TOY_SERVER = '''"""Toy ServerApp: per round, train at every node, then evaluate at one node; time both."""
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _exchange(grid, nodes, kind, rnd, arrays):
    msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"round": rnd})}),
                    dst_node_id=nid, message_type=kind, group_id=str(rnd)) for nid in nodes]
    pushed = time.time()
    t0 = time.perf_counter()
    replies = list(grid.send_and_receive(msgs, timeout=600))
    wall = time.perf_counter() - t0
    mets = [dict(m.content.metric_records["metrics"]) for m in replies if m.has_content()]
    return {"wall_s": wall, "replies": len(mets), "errors": [str(m.error) for m in replies if not m.has_content()],
            "compute_s": [x["compute-s"] for x in mets], "import_s": [x["import-s"] for x in mets],
            "pids": [int(x["pid"]) for x in mets], "start_latency_s": [x["t-enter"] - pushed for x in mets]}


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    n, rounds, poll = int(rc["nodes"]), int(rc["rounds"]), float(rc["poll-s"])
    if poll > 0:
        from server.transport import PollingGrid  # fedfer is installed where the ServerApp runs
        grid = PollingGrid(grid, poll)
    while len(list(grid.get_node_ids())) < n:
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())[:n]
    count, params = int(rc["arrays"]), int(rc["params"])
    sizes = [params // count + (1 if i < params % count else 0) for i in range(count)]
    arrays = ArrayRecord([np.random.default_rng(i).standard_normal(size).astype(np.float32)
                          for i, size in enumerate(sizes)])
    rows = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        train = _exchange(grid, nodes, "train", rnd, arrays)
        evaluate = _exchange(grid, nodes[:1], "evaluate", rnd, arrays)
        rows.append({"round": rnd, "wall_s": time.perf_counter() - t0, "train": train, "evaluate": evaluate})
        print("TOYROUND " + json.dumps({"round": rnd, "wall_s": rows[-1]["wall_s"]}), flush=True)
    if rc["out"]:
        Path(str(rc["out"])).write_text(json.dumps({"rounds": rows}))
'''


def write_toy_app(directory: Path) -> Path:
    """The toy Flower app (pyproject + toyapp/{client,server}.py) in `directory`."""
    directory = Path(directory)
    (directory / "toyapp").mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(TOY_PYPROJECT)
    (directory / "toyapp" / "__init__.py").write_text("")
    (directory / "toyapp" / "client.py").write_text(TOY_CLIENT)
    (directory / "toyapp" / "server.py").write_text(TOY_SERVER)
    return directory


MODES = {
    # name: (deployment executor, SuperNode poll patch, ServerApp grid poll seconds (0 = Flower's 3 s), packed)
    "flower": ("flower", False, 0.0, False),
    "warm": ("warm", False, 0.0, False),
    "warm+poll": ("warm", True, 0.1, False),
    "warm+poll+packed": ("warm", True, 0.1, True),
    "flower+packed": ("flower", False, 0.0, True),
}
# The model a message carries: HAFNet `cpu` preset's state_dict (88 tensors, 314,943 floats).
# Flower sends every array as its own object (one authenticated HTTP request each), so the count
# matters as much as the size; "packed" sends the same floats as one array.
MODEL_ARRAYS, MODEL_PARAMS = 88, 314_943


IDLE_POLL_S = 0.5   # --idle-poll: the SuperNode's idle poll in the fast-poll modes
PULL_HOLD_S = 2.0   # --hold: the SuperLink holds an empty pull this long in the fast-poll modes (0: Flower's)


def make_deployment(root: Path, nodes: int, executor: str, fast_poll: bool, flwr_home: Path) -> Any:
    """A loopback TLS + node-auth deployment with `nodes` school nodes (toy data dirs)."""
    from server.deploy.commands import add_node, init_deployment
    from server.deploy.layout import Deployment
    from server.processes import free_ports

    ports = free_ports(nodes + 1)
    init_deployment(root, "localhost", port=ports[0], executor=executor, flwr_home=flwr_home, connection="bench")
    dep = Deployment.load(root)
    dep.idle_poll = IDLE_POLL_S if fast_poll else 0.0   # 0: plain flower-supernode, Flower's own 3 s / 0.5 s
    dep.pull_hold = PULL_HOLD_S if fast_poll else 0.0   # 0: plain flower-superlink
    dep.save()
    for i in range(nodes):
        add_node(root, f"school-{i}", "school", data_dir=root / "data" / f"school-{i}", runtime_port=ports[i + 1],
                 flwr_home=None, declared=100)
    return Deployment.load(root)


def run_mode(mode: str, nodes: int, rounds: int, work: Path, app_dir: Path) -> dict[str, Any]:
    from server.deploy.local import LocalFederation
    from server.processes import DeploymentError, run_flwr

    executor, fast_poll, server_poll, packed = MODES[mode]
    arrays = 1 if packed else MODEL_ARRAYS
    root = work / mode.replace("+", "_")
    home = root / "cli_home"
    dep = make_deployment(root / "deploy", nodes, executor, fast_poll, home)
    out = root / "toy.json"
    with LocalFederation(dep, root / "logs", home) as fed:
        fed.start_all()
        started = time.perf_counter()
        result = run_flwr(["run", str(app_dir), "bench", "--stream", "-c",
                           f'rounds={rounds} nodes={nodes} poll-s={server_poll} arrays={arrays} '
                           f'params={MODEL_PARAMS} out="{out}"'],
                          flwr_home=home, timeout=1800)
        total = time.perf_counter() - started
        if not out.exists():
            raise DeploymentError(f"{mode}: the toy run wrote no results (flwr exit {result.returncode})\n"
                                  f"{result.stdout[-3000:]}")
    rows = json.loads(out.read_text())["rounds"]
    return summarize(mode, rows, total)


def summarize(mode: str, rows: list[dict[str, Any]], total: float) -> dict[str, Any]:
    def overhead(row: dict[str, Any]) -> float:
        compute = max(row["train"]["compute_s"] or [0.0]) + max(row["evaluate"]["compute_s"] or [0.0])
        return row["wall_s"] - compute

    steady = rows[1:] or rows   # round 1 also installs the FAB at every node
    imports = [s for row in steady for s in row["train"]["import_s"]]
    pids = [p for row in rows for p in row["train"]["pids"]]
    return {
        "mode": mode,
        "round1_s": round(rows[0]["wall_s"], 2),
        "steady_overhead_median_s": round(statistics.median(overhead(r) for r in steady), 2),
        "steady_overhead_max_s": round(max(overhead(r) for r in steady), 2),
        "train_exchange_median_s": round(statistics.median(r["train"]["wall_s"] for r in steady), 2),
        "evaluate_exchange_median_s": round(statistics.median(r["evaluate"]["wall_s"] for r in steady), 2),
        "clientapp_import_median_s": round(statistics.median(imports), 3) if imports else None,
        "fresh_process_per_message": len(set(pids)) == len(pids),
        "errors": sum(len(r["train"]["errors"]) + len(r["evaluate"]["errors"]) for r in rows),
        "run_wall_s": round(total, 1),
        "rounds": [{"round": r["round"], "wall_s": round(r["wall_s"], 2), "overhead_s": round(overhead(r), 2),
                    "train_s": round(r["train"]["wall_s"], 2), "evaluate_s": round(r["evaluate"]["wall_s"], 2),
                    "import_s": [round(x, 3) for x in r["train"]["import_s"]],
                    "start_latency_s": [round(x, 2) for x in r["train"]["start_latency_s"]]} for r in rows],
    }


# -- the real fedfer apps ---------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
REAL_BENCHMARK = "synthetic-fer2013"
REAL_TINY: dict[str, Any] = {   # tiny schools and benchmark: the round is mostly overhead, compute is reported
    "federation.min_train_schools": 2, "federation.round_timeout": 600,
    "data.students_per_school": 6, "data.frames_per_student": 6, "data.public_students": 6, "data.image_size": 32,
    "train.local_epochs": 1, "train.batch_size": 3, "evaluation.bootstrap": 50, "evaluation.benchmarks": REAL_BENCHMARK,
}


def real_overrides(nodes: int, rounds: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**REAL_TINY, "federation.rounds": rounds, "federation.schools": nodes, **(extra or {})}


def run_real(mode: str, nodes: int, rounds: int, work: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fedfer apps on a loopback TLS + auth deployment: `nodes` schools + one evaluation node."""
    from server.deploy.commands import add_node, init_deployment
    from server.deploy.layout import Deployment
    from server.deploy.local import LocalFederation
    from server.processes import DeploymentError, free_ports, run_flwr
    from shared_models.config import load_config
    from simulations import synth

    executor, fast_poll, _, _ = MODES[mode]
    root = work / ("real_" + mode.replace("+", "_"))
    home = root / "cli_home"
    data = root / "data"
    overrides = real_overrides(nodes, rounds, extra)
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    params = synth.params_from_config(cfg)
    for i in range(nodes):
        synth.ensure_school(data, params, i)
    synth.ensure_public(data, params)

    ports = free_ports(nodes + 2)
    init_deployment(root / "deploy", "localhost", port=ports[0], executor=executor, flwr_home=home, connection="bench")
    dep = Deployment.load(root / "deploy")
    dep.idle_poll = IDLE_POLL_S if fast_poll else 0.0
    dep.pull_hold = PULL_HOLD_S if fast_poll else 0.0
    dep.save()
    for i in range(nodes):
        add_node(dep.root, f"school-{i:02d}", "school", data_dir=data / "schools" / f"school-{i:02d}",
                 runtime_port=ports[i + 1], flwr_home=None)
    add_node(dep.root, "evaluator", "evaluator", benchmarks=[REAL_BENCHMARK], data_dir=data,
             runtime_port=ports[nodes + 1], flwr_home=None)
    dep = Deployment.load(dep.root)
    runs = root / "runs"
    run_config = {k: v for k, v in overrides.items() if k != "federation.schools"}
    run_config.update({"run.root": str(runs), "run.name": "bench", "data.root": str(data),
                       "privacy.keyring": str(dep.keyring)})
    with LocalFederation(dep, root / "logs", home) as fed:
        fed.start_all()
        started = time.perf_counter()
        result = run_flwr(["run", str(ROOT), "bench", "--stream", "-c",
                           " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())],
                          flwr_home=home, cwd=ROOT, timeout=3600)
        total = time.perf_counter() - started
        metrics = runs / "bench" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if len(rows) < rounds:
            raise DeploymentError(f"real app, {mode}: {len(rows)} of {rounds} rounds in {metrics} "
                                  f"(flwr exit {result.returncode})\n{result.stdout[-3000:]}")
    out = summarize_real(f"fedfer:{mode}", rows, total, school_timings(root))
    out["phases"] = round_phases(rows, root / "logs", school_timings(root))
    out["run_config"] = run_config | {"run.root": "<tmp>", "data.root": "<tmp>", "privacy.keyring": "<tmp>"}
    out["model"] = model_summary(cfg)
    return out


def model_summary(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model as it was in the working tree when the FAB was built (what every message carried)."""
    from shared_models.models import registry

    state = registry.build_from_config(cfg).state_dict()
    return {"name": str(cfg["model.name"]), "preset": str(cfg["model.preset"]), "tensors": len(state),
            "values": int(sum(v.numel() for v in state.values())),
            "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in state.values()})}


def school_timings(runs: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(school, round) -> the school's own timing line (client/school_round.PhaseClock; replies carry no
    durations, so the bench reads them from the schools' state directories on this machine)."""
    lines: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted(runs.rglob("round-timing.jsonl")):
        for text in path.read_text().splitlines():
            if text.strip():
                line = json.loads(text)
                lines[(str(line["school"]), int(line["round"]))] = line
    return lines


_SUPERNODE_EVENTS = {"Receiving: train": "receiving", "Received successfully": "received",
                     "Sending: train": "sending", "Sent successfully": "sent"}


def supernode_events(log: Path) -> list[tuple[float, str]]:
    """(unix time, event) of a SuperNode log's train-message lines (Flower logs them with ms timestamps)."""
    from datetime import datetime

    events = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        for text, name in _SUPERNODE_EVENTS.items():
            if text in line:
                stamp = " ".join(line.split()[1:3]).rstrip(":")
                try:
                    events.append((datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(), name))
                except ValueError:
                    pass
    return events


def _exchange_segments(events: list[tuple[float, str]], line: dict[str, Any]) -> dict[str, float] | None:
    """One school's train exchange, cut at the SuperNode's log lines and the school's own timing line."""
    start, done = float(line["received_unix"]), float(line["done_unix"])
    before = [i for i, (t, e) in enumerate(events) if e == "receiving" and t <= start]
    after = [i for i, (t, e) in enumerate(events) if e == "sending" and t >= done]
    if not before or not after or before[-1] + 1 >= len(events) or after[0] + 1 >= len(events):
        return None
    (t_in, _), (t_got, got) = events[before[-1]], events[before[-1] + 1]
    (t_out, _), (t_sent, sent) = events[after[0]], events[after[0] + 1]
    if got != "received" or sent != "sent":
        return None
    return {"supernode_pull": t_got - t_in, "task_start_and_app_load": start - t_got,
            **{f"handler_{k}": float(v) for k, v in line["seconds"].items()},
            "reply_to_supernode": t_out - done, "supernode_push": t_sent - t_out, "_span": t_sent - t_in, "_sent": t_sent}


def round_phases(rows: list[dict[str, Any]], logs: Path, timings: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """Where a round's seconds go: the school that replied last in each round, cut into phases (SuperNode
    log lines + its round-timing.jsonl); `server_and_polls` = the round's wall time minus that school's
    span from the SuperNode taking the message to the reply pushed (the ServerApp's push, the idle poll,
    the ServerApp's pull of the replies, validation, FedAvg, checkpoint). Median over rounds 2..N."""
    per_round: list[dict[str, float]] = []
    for row in rows[1:]:
        cut = []
        for school in row["train"]:
            line = timings.get((school, int(row["round"])))
            segments = _exchange_segments(supernode_events(logs / f"{school}-supernode.log"), line) if line else None
            if segments is not None:
                cut.append(segments)
        if cut:
            last = max(cut, key=lambda c: c["_sent"])
            last.pop("_sent")
            last["server_and_polls"] = float(row["timing"]["round_seconds"]) - last.pop("_span")
            per_round.append(last)
    if not per_round:
        return {}
    return {k: round(statistics.median(r.get(k, 0.0) for r in per_round), 3) for k in per_round[0]}


def _school_side(row: dict[str, Any], ok: dict[str, Any], timings: dict[tuple[str, int], dict[str, Any]]) -> dict:
    """The schools' own seconds for this round: DP training (compute) and the whole handler."""
    lines = [timings[(s, int(row["round"]))] for s in ok if (s, int(row["round"])) in timings]
    if not lines:
        return {"train": 0.0, "handler": 0.0, "phases": {}}
    phases: dict[str, float] = {}
    for line in lines:
        for name, sec in line["seconds"].items():
            phases[name] = max(phases.get(name, 0.0), float(sec))
    return {"train": max(float(ln["seconds"].get("train", 0.0)) for ln in lines),
            "handler": max(float(ln["done_unix"]) - float(ln["received_unix"]) for ln in lines),
            "phases": {k: round(v, 3) for k, v in phases.items()}}


def real_round(row: dict[str, Any], concurrent_eval: float = 0.0,
               timings: dict[tuple[str, int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One metrics.jsonl line → round wall time, reported compute and the overhead left.

    With pipelined evaluation (`evaluated_in_round` in a line) the evaluation of round r−1's model runs
    during round r's training exchange, at the same time as the schools (`concurrent_eval`), so the
    compute on the critical path is the longer of the two; a round whose own model was evaluated inside
    its wall time (the final round, or runs before pipelining) also pays that evaluation's compute.
    """
    timing = row.get("timing") or {}
    ok = {s: o for s, o in row["train"].items() if o.get("status") == "ok"}
    school = _school_side(row, ok, timings or {})
    train_compute = school["train"]
    eval_compute = float(timing.get("evaluate_compute_s", 0.0))
    own_eval = 0.0 if row.get("evaluated_in_round") else eval_compute
    wall = float(timing["round_seconds"])
    overhead = wall - max(train_compute, concurrent_eval) - own_eval
    return {"round": row["round"], "wall_s": round(wall, 2), "overhead_s": round(overhead, 2),
            "train_compute_max_s": round(train_compute, 2), "evaluate_compute_s": round(eval_compute, 2),
            "evaluated_in_round": row.get("evaluated_in_round"),
            "train_exchange_s": round(float(timing.get("train_exchange_s", float("nan"))), 2),
            "evaluate_exchange_s": round(float(timing.get("evaluate_exchange_s", float("nan"))), 2),
            "schools_ok": len(ok), "schools": len(row["train"]), "evaluated_by": row.get("evaluated_by", ""),
            "school_handler_max_s": round(school["handler"], 2), "school_phases_max_s": school["phases"],
            "train_transport_s": round(float(timing.get("train_exchange_s", float("nan"))) - school["handler"], 2)}


def _median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v == v]
    return round(statistics.median(values), 2) if values else None


def summarize_real(mode: str, rows: list[dict[str, Any]], total: float,
                   timings: dict[tuple[str, int], dict[str, Any]] | None = None) -> dict[str, Any]:
    during = {int(r["evaluated_in_round"]): float((r.get("timing") or {}).get("evaluate_compute_s", 0.0))
              for r in rows if r.get("evaluated_in_round")}
    rounds = [real_round(r, during.get(int(r["round"]), 0.0), timings) for r in rows]
    steady = rounds[1:] or rounds   # round 1 also installs the FAB and asks every node for its role
    return {
        "mode": mode,
        "round1_s": rounds[0]["wall_s"],
        "steady_overhead_median_s": round(statistics.median(r["overhead_s"] for r in steady), 2),
        "steady_overhead_max_s": round(max(r["overhead_s"] for r in steady), 2),
        "steady_round_median_s": round(statistics.median(r["wall_s"] for r in steady), 2),
        "train_compute_median_s": round(statistics.median(r["train_compute_max_s"] for r in steady), 2),
        "train_exchange_median_s": round(statistics.median(r["train_exchange_s"] for r in steady), 2),
        "evaluate_exchange_median_s": _median(r["evaluate_exchange_s"] for r in steady),
        "evaluation_pipelined": any(r["evaluated_in_round"] for r in rounds),
        "school_handler_median_s": round(statistics.median(r["school_handler_max_s"] for r in steady), 2),
        "train_transport_median_s": _median(r["train_transport_s"] for r in steady),
        "clientapp_import_median_s": None,
        "errors": sum(r["schools"] - r["schools_ok"] for r in rounds)
                  + sum(1 for r in rounds if not r["evaluated_by"].startswith("evaluator-node")),
        "run_wall_s": round(total, 1),
        "rounds": rounds,
    }


def wait_for_quiet(max_load: float, wait_s: float = 60.0, tries: int = 10) -> float:
    """Sleep `wait_s` at a time (at most `tries` times) while the 1-min load average is above `max_load`."""
    load = os.getloadavg()[0]
    for attempt in range(tries):
        if load <= max_load:
            break
        print(f"[bench_deploy] load average {load:.2f} > {max_load}: waiting {wait_s:.0f} s ({attempt + 1}/{tries})",
              flush=True)
        time.sleep(wait_s)
        load = os.getloadavg()[0]
    return load


def print_table(results: list[dict[str, Any]]) -> None:
    head = f"{'mode':<17} {'round 1':>8} {'overhead/round':>15} {'(max)':>7} {'train':>7} {'evaluate':>9} {'import/msg':>11} {'errors':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        imp = "-" if r["clientapp_import_median_s"] is None else f"{r['clientapp_import_median_s']:.3f}"
        ev = "pipelined" if r["evaluate_exchange_median_s"] is None else f"{r['evaluate_exchange_median_s']:.2f}s"
        print(f"{r['mode']:<17} {r['round1_s']:>7.1f}s {r['steady_overhead_median_s']:>14.2f}s {r['steady_overhead_max_s']:>6.1f}s "
              f"{r['train_exchange_median_s']:>6.2f}s {ev:>9} {imp:>10}s {r['errors']:>7}")
    print("overhead/round: median over rounds 2.. of (round wall time - ClientApp compute), "
          "one round = train at every node + evaluate at one node")
    for r in results:
        if r.get("phases"):
            print(f"{r['mode']}: seconds per phase of the school that replied last, median of rounds 2..: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="flower,warm,warm+poll,warm+poll+packed")
    parser.add_argument("--out", default="benchmarks/deploy.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for inspection")
    parser.add_argument("--append", action="store_true", help="add this run to the runs already in --out")
    parser.add_argument("--idle-poll", type=float, default=0.5, help="SuperNode idle poll in the +poll modes")
    parser.add_argument("--hold", type=float, default=2.0,
                        help="+poll modes: seconds the SuperLink holds a pull that finds nothing (0: Flower's polling)")
    parser.add_argument("--app", choices=("toy", "fedfer"), default="toy",
                        help="toy: the no-compute probe app; fedfer: the real apps with tiny DP training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--app fedfer: extra run-config (e.g. train.local_epochs=1)")
    parser.add_argument("--max-load", type=float, default=None,
                        help="before each mode wait (60 s steps, 10 at most) for the 1-min load average to drop to this")
    return parser


def _extra_run_config(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a run-config dict (values parsed as JSON where they are JSON)."""
    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        extra[key.strip()] = json.loads(value) if _is_json(value) else value
    return extra


def _measure_modes(args: argparse.Namespace, modes: list[str], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One deployment per mode in a temp dir (removed afterwards unless --keep), with the load around it."""
    work = Path(tempfile.mkdtemp(prefix="fedfer-bench-deploy-"))
    results = []
    try:
        app_dir = write_toy_app(work / "app")
        for mode in modes:
            load = os.getloadavg()[0] if args.max_load is None else wait_for_quiet(args.max_load)
            print(f"[bench_deploy] {args.app} {mode}: {args.nodes} nodes, {args.rounds} rounds (load avg {load:.2f}) …",
                  flush=True)
            if args.app == "fedfer":
                res = run_real(mode, args.nodes, args.rounds, work, extra)
            else:
                res = run_mode(mode, args.nodes, args.rounds, work, app_dir)
            res["load_avg_before"] = round(load, 2)
            res["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
            results.append(res)
    finally:
        if args.keep:
            print(f"[bench_deploy] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


def _run_entry(args: argparse.Namespace, argv: list[str] | None, results: list[dict[str, Any]],
               extra: dict[str, Any]) -> dict[str, Any]:
    """This invocation as one entry of the result file's `runs`: command, date, results (and the real
    apps' setup, which differs from the toy setup at the top of the file)."""
    run: dict[str, Any] = {
        "command": "python -m simulations.bench.deploy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "idle_poll_s": args.idle_poll,
        "pull_hold_s": args.hold,
        "niceness": os.nice(0),
        "results": results,
    }
    if args.app == "fedfer":
        run["app"] = "fedfer"
        run["setup"] = {"nodes": args.nodes, "evaluator": 1, "rounds": args.rounds, "tls": True, "supernode_auth": True,
                        "network": "loopback",
                        "round": "DP training at every school; the evaluation node scores the previous round's model "
                                 "in the same exchange (pipelined; the final model after the last round)",
                        "overhead": "timing.round_seconds - max(max school DP-training seconds (round-timing.jsonl), compute of the evaluation "
                                    "running concurrently) - compute of an evaluation not run concurrently",
                        "run_config": real_overrides(args.nodes, args.rounds, extra)}
    return run


def _write_record(args: argparse.Namespace, run: dict[str, Any]) -> Path:
    """Write --out: machine, toy setup and runs (with --append, after the runs already there)."""
    import flwr

    record = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "flwr": flwr.__version__,
                    "note": "shared 2-core machine; other jobs running (see load_avg_before per mode)"},
        "setup": {"nodes": args.nodes, "rounds": args.rounds, "tls": True, "supernode_auth": True,
                  "message": f"{MODEL_ARRAYS} float32 arrays, {MODEL_PARAMS} values (HAFNet cpu preset); packed: 1 array",
                  "network": "loopback", "round": "train at every node, then evaluate at one node",
                  "clientapp": "imports numpy, torch, opacus, flwr; no compute"},
        "runs": [],
    }
    out = Path(args.out)
    if args.append and out.exists():
        previous = json.loads(out.read_text())
        record["runs"] = previous.get("runs", [])
        if args.app != "toy":   # the top-level setup describes the toy runs; a fedfer run carries its own
            record["setup"] = previous.get("setup", record["setup"])
    record["runs"].append(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    global IDLE_POLL_S, PULL_HOLD_S
    IDLE_POLL_S, PULL_HOLD_S = args.idle_poll, args.hold
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    extra = _extra_run_config(parser, args.set)
    results = _measure_modes(args, modes, extra)
    print_table(results)
    out = _write_record(args, _run_entry(args, argv, results, extra))
    print(f"[bench_deploy] wrote {out}")
    return 0


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
