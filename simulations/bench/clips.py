"""Centralised references for clip models on the synthetic classroom's clips: plain and under student-level
DP-SGD, on either task (FER7 or DAiSEE-style engagement), written through the one result writer.

    python -m simulations.bench.clips --out benchmarks/central-mafnet-cpu-fer7-nodp.json --epochs 10 \\
        model.name=mafnet model.preset=cpu model.task=fer7 data.clips_per_student=4 ...
    python -m simulations.bench.clips --dp --out ... model.preset=dp model.task=engagement ...

Overrides are fedfer config keys (as `fedfer train-central`); the result carries them and the resolved
config, and the `final` block holds WAR (= accuracy) and UAR per benchmark.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from simulations.bench.results import write_result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="result JSON (benchmarks/...)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--dp", action="store_true", help="student-level DP-SGD at privacy.target_epsilon")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from shared_models.config import load_config, parse_overrides
    from simulations.central import train_central
    from simulations.synth import ensure_for_config

    overrides = parse_overrides(args.overrides)
    cfg = load_config(None, overrides)
    root = ensure_for_config(cfg)
    result = train_central(cfg, root, epochs=args.epochs, dp=args.dp, echo=lambda s: print("  " + s, flush=True))
    result.pop("command", None)
    write_result(args.out, {"task": cfg["model.task"], "overrides": overrides, **result,
                            "config": {k: cfg[k] for k in sorted(cfg)}},
                 module="simulations.bench.clips", argv=argv)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
