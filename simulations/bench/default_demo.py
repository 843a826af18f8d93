"""The default demo's wall time and accuracy: `fedfer simulate` with no settings of its own (only where the
run directory goes), its output timed line by line, then its run directory read back like
simulations/bench/federated.py does, and one result written with the command, the resolved config, the
machine's load average before and after, and the phases (data generation, pre-training, rounds).

    python -m simulations.bench.default_demo --cache fresh \\
        --out benchmarks/default-demo/first-run.json        # empty cache: data generation + pre-training
    python -m simulations.bench.default_demo --cache ~/.cache \\
        --out benchmarks/default-demo/cached.json           # the cache the first run filled

`--cache fresh` points XDG_CACHE_HOME (where the synthetic classroom and the pre-trained checkpoint are
cached: simulations/synth.py, simulations/pretrain.py) at a new empty folder; `--cache DIR` at DIR.
Extra key=value overrides are passed on (the result records them); a timing of *the default* has none.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from simulations.bench.federated import _final, _rounds, _schools, every_school_every_round
from simulations.bench.results import load_average, write_result

# Lines of `fedfer simulate`'s output that close a phase (the first match's time is the phase's end). A first
# run prints its run directory before pre-training (Flower starts meanwhile: fedfer/commands/simulate.py),
# a cached one after; "serverapp" is the ServerApp's first line, once it has loaded the start model.
_MARKS = {
    "data_ready": re.compile(r"^(synthetic classroom|pre-training |  pre-training |pre-trained model \(cached\))"),
    "pretrained": re.compile(r"^pre-trained model[ :]"),
    "run_dir": re.compile(r"^run directory: "),
    "serverapp": re.compile(r"^\s+pretrained: .*: loaded \d+ tensors"),
    "round_1": re.compile(r"round\s+1\b"),
    "summary": re.compile(r"^summary"),
}


def run_timed(command: list[str], env: dict[str, str], log: Path) -> tuple[int, float, dict[str, float]]:
    """Run `command`, echo and log its output; exit code, wall seconds and when each phase mark appeared."""
    marks: dict[str, float] = {}
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            now = round(time.perf_counter() - started, 1)
            out.write(f"{now:8.1f} {line}")
            sys.stdout.write(line)
            for name, pattern in _MARKS.items():
                if name not in marks and pattern.search(line):
                    marks[name] = now
        code = proc.wait()
    return code, round(time.perf_counter() - started, 1), marks


def _pretrained_seconds(log: Path) -> float | None:
    """The pre-training's own figure from `pre-trained model: PATH (S s)`; 0.0 for `pre-trained model (cached): PATH`."""
    for line in log.read_text(encoding="utf-8").splitlines():
        found = re.search(r"pre-trained model: \S+ \(([0-9.]+) s\)", line)
        if found:
            return float(found.group(1))
        if re.search(r"pre-trained model \(cached\): ", line):
            return 0.0
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="result JSON (benchmarks/...)")
    parser.add_argument("--cache", default="fresh", help="XDG_CACHE_HOME for the run: 'fresh' (a new empty folder) or a folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from server.report import load_run

    scratch = Path(tempfile.mkdtemp(prefix="fedfer-default-demo-"))
    cache = scratch / "cache" if args.cache == "fresh" else Path(args.cache).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    name = Path(args.out).stem
    command = [sys.executable, "-m", "fedfer", "simulate", f"run.root={scratch / 'runs'}", f"run.name={name}",
               *args.overrides]
    load_before = load_average()
    code, seconds, marks = run_timed(command, env, scratch / "output.log")
    load_after = load_average()
    if code != 0:
        print(f"fedfer simulate exited with {code}; output in {scratch / 'output.log'}", file=sys.stderr)
        return code
    data = load_run(scratch / "runs" / name)
    rounds = _rounds(data)
    write_result(args.out, {
        "note": ("`fedfer simulate` with the defaults (run.root/run.name only) timed from outside; machine shared "
                 "(other work niced or waiting on the timing lock); load average = 1/5/15 min"),
        "cache": "fresh (empty XDG_CACHE_HOME: data generation and pre-training included)" if args.cache == "fresh"
                 else "warm (XDG_CACHE_HOME holds the data and the pre-trained checkpoint)",
        "overrides": list(args.overrides), "seconds": seconds, "phases_seconds_since_start": marks,
        "pretraining_seconds": _pretrained_seconds(scratch / "output.log"),
        "load_average_before": load_before, "load_average_after": load_after,
        "environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""), "nice": os.nice(0)},
        "every_school_every_round": every_school_every_round(rounds),
        "final": _final(data), "schools": _schools(data), "rounds": rounds,
        "references": data.references,   # evaluation.references=central,alone (= --references): (b) and (c)
        "config": {k: data.config[k] for k in sorted(data.config)},
    }, module="simulations.bench.default_demo", argv=argv)
    shutil.rmtree(scratch / "runs", ignore_errors=True)
    if args.cache == "fresh":
        print(f"cache kept for a cached run: --cache {cache}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
