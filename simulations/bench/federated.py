"""A federated run as a benchmark result: `fedfer simulate` with the given overrides, then its run directory
read back (rounds, the evaluation node's WAR/UAR with their 95 % CI, each school's ε from its ledger) and
written through the one result writer with the command and the resolved config.

    python -m simulations.bench.federated --out benchmarks/federated-r2plus1d_sta-dp-fer7.json \\
        model.name=r2plus1d_sta model.preset=dp data.clips_per_student=1 evaluation.benchmarks=synthetic-clips ...

The run directory goes to a scratch folder (`--run-root`, default a temporary one, removed afterwards unless
`--keep`); the result is what the run recorded, nothing recomputed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from simulations.bench.results import write_result

_CHANCE = {"fer7": 1 / 7, "engagement": 1 / 4}


def _simulate(overrides: Sequence[str], run_root: Path, name: str) -> int:
    """`fedfer simulate` in its own process (Ray and the apps stay out of this one); its exit code."""
    command = [sys.executable, "-m", "fedfer", "simulate", f"run.root={run_root}", f"run.name={name}", *overrides]
    return subprocess.call(command, env=dict(os.environ))


def every_school_every_round(rounds: list[dict[str, Any]]) -> bool:
    """Every school asked in a training round replied ok, in every training round. Round 0 (the pre-trained
    start, evaluated before any school trains) asks no school and does not count."""
    trained = [r for r in rounds if r["round"] > 0]
    return bool(trained) and all(r["schools_ok"] == r["schools_asked"] > 0 for r in trained)


def _rounds(data: Any) -> list[dict[str, Any]]:
    """Per round: seconds, the largest ε spent so far, and each benchmark's figures (no confusion matrix)."""
    from shared_models.evaluation import LIST_METRICS

    rows = []
    for number in sorted(data.rounds):
        record = data.rounds[number]
        train = record.get("train") or {}
        row: dict[str, Any] = {"round": number, "schools_ok": sum(1 for o in train.values()
                                                                 if isinstance(o, dict) and o.get("status") == "ok"),
                               "schools_asked": len(train)}
        seconds = (record.get("timing") or {}).get("round_seconds")
        if seconds is not None:
            row["seconds"] = round(float(seconds), 1)
        for bench, figures in (record.get("evaluation") or {}).items():
            if isinstance(figures, dict):
                row[bench] = {k: v for k, v in figures.items() if k not in LIST_METRICS}
        rows.append(row)
    return rows


def _schools(data: Any) -> dict[str, dict[str, Any]]:
    """Each school's ledger at its last entry: ε spent, its (σ, q) and the rounds it trained."""
    out = {}
    for school, entries in sorted(data.ledger.items()):
        last = entries[-1]
        out[school] = {"epsilon": last.get("epsilon"), "rounds_trained": len(entries),
                       **{k: last[k] for k in ("noise_multiplier", "sample_rate", "steps", "delta", "privacy_unit", "declared_units")
                          if k in last}}
    return out


def _final(data: Any) -> dict[str, Any]:
    """The last evaluated round's figures per benchmark (WAR = accuracy with its CI, UAR, per-class recall)."""
    for number in sorted(data.rounds, reverse=True):
        evaluation = data.rounds[number].get("evaluation") or {}
        figures = {b: f for b, f in evaluation.items() if isinstance(f, dict) and "accuracy" in f}
        if figures:
            return {"round": number, **figures}
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="result JSON (benchmarks/...)")
    parser.add_argument("--run-root", default=None, help="folder for the run directory (default: a scratch one)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from server.report import load_run

    run_root = Path(args.run_root or tempfile.mkdtemp(prefix="fedfer-bench-fed-"))
    name = Path(args.out).stem
    started = time.perf_counter()
    code = _simulate(args.overrides, run_root, name)
    seconds = round(time.perf_counter() - started, 1)
    if code != 0:
        print(f"fedfer simulate exited with {code}; no result written", file=sys.stderr)
        return code
    data = load_run(run_root / name)
    task = str(data.config.get("model.task", "fer7"))
    rounds = _rounds(data)
    complete = every_school_every_round(rounds)
    if not complete:   # a school that failed (e.g. a worker killed for memory) leaves the global model behind
        print("warning: not every school trained every round (see rounds[].schools_ok)", file=sys.stderr)
    write_result(args.out, {
        "note": "federated run (fedfer simulate); data.root and run.root are scratch folders; machine shared",
        "overrides": list(args.overrides), "task": task, "chance": _CHANCE.get(task),
        "every_school_every_round": complete,
        "final": _final(data), "schools": _schools(data), "rounds": rounds, "seconds": seconds,
        "run_notes": data.notes, "config": {k: data.config[k] for k in sorted(data.config)},
    }, module="simulations.bench.federated", argv=argv)
    if not args.keep and args.run_root is None:
        shutil.rmtree(run_root, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
