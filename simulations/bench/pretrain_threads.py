"""Public pre-training's time by torch thread count (`pretrain.threads`), data cached, runs interleaved:

    python -m simulations.bench.pretrain_threads --threads 1,2 --repeats 2 \\
        --out benchmarks/default-demo/pretrain-threads.json

Each run is `fedfer pretrain --no-evaluate` in its own process (the demo's pre-training: same data, epochs
and settings) writing to a scratch file; the result holds each run's wall seconds, the training's own
seconds from the checkpoint's provenance, and the load average before and after.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from simulations.bench.default_demo import load_average
from simulations.bench.results import write_result


def one_run(threads: int, out: Path, overrides: Sequence[str]) -> dict[str, Any]:
    load_before = load_average()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedfer", "pretrain", "--no-evaluate", "--out", str(out),
                    f"pretrain.threads={threads}", *overrides], check=True, stdout=subprocess.DEVNULL)
    wall = round(time.perf_counter() - started, 1)
    provenance = torch.load(out, weights_only=False)["provenance"]
    out.unlink()
    return {"threads": threads, "wall_seconds": wall, "training_seconds": provenance["seconds"],
            "threads_used": provenance.get("threads"), "load_average_before": load_before,
            "load_average_after": load_average()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, interleaved")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    from shared_models.config import load_config

    counts = [int(t) for t in args.threads.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="fedfer-pretrain-threads-")) / "pt.pt"
    runs = [one_run(t, scratch, args.overrides) for _ in range(args.repeats) for t in counts]
    for row in runs:
        print(f"threads {row['threads']}: wall {row['wall_seconds']} s, training {row['training_seconds']} s, "
              f"load {row['load_average_before'][:1]} -> {row['load_average_after'][:1]}")
    cfg = load_config(None, list(args.overrides))
    write_result(args.out, {"note": "fedfer pretrain --no-evaluate per thread count, data cached; machine shared",
                            "runs": runs, "config": {k: cfg[k] for k in sorted(cfg)}},
                 module="simulations.bench.pretrain_threads", argv=argv)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
