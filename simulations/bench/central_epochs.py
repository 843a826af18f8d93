"""How far the non-private pooled reference (b) is from converged: its learning curve.

(b) is the ceiling the federation is judged against (issue 14: "within 5 points of (b)"), so it must be
trained until it stops rising, not for a fixed small number of epochs. This trains (b) once, exactly as
`fedfer simulate --references` does (simulations/references.train_central: every layer, Adam, batch 64,
from the same pre-trained start), and scores it on the public test split and the schools' held-out
students after each of the listed epochs:

    python -m simulations.bench.central_epochs --epochs 2,4,8,12,16,24,32 \\
        --out benchmarks/central-epochs.json [key=value …]

The data and the pre-trained checkpoint come from the cache (generated first if missing), as for
`fedfer simulate`. Accuracy only; the seconds are not timings unless the machine was otherwise idle.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from shared_models.config import ConfigError, load_config
from shared_models.datasets.school_folder import load_school
from simulations import synth
from simulations.bench.results import load_average, write_result
from simulations.pretrain import ensure_pretrained
from simulations.references import INDOMAIN, PUBLIC, Scorer, start_state, model_from, train_central


def learning_curve(cfg: dict[str, Any], checkpoints: list[int]) -> list[dict[str, Any]]:
    """(b)'s public and in-domain accuracy [95 % CI] after each epoch count in `checkpoints`."""
    root = synth.ensure_for_config(cfg, echo=print)
    if cfg.get("model.pretrain") == "auto" and not cfg.get("model.pretrained"):
        cfg["model.pretrained"] = str(ensure_pretrained(cfg, root))
    start, _ = start_state(cfg)
    schools = [load_school(Path(root) / "schools" / synth.school_id(i)) for i in range(int(cfg["federation.schools"]))]
    score = Scorer(Path(root), int(model_from(cfg, start).input_size), int(cfg["evaluation.bootstrap"]))
    curve: list[dict[str, Any]] = []
    started = time.perf_counter()

    def after_epoch(epoch: int, model: torch.nn.Module) -> None:
        if epoch not in checkpoints:
            return
        scores = score(model)
        curve.append({"epochs": epoch, "seconds": round(time.perf_counter() - started, 1),
                      **{name: {k: round(float(v), 4) for k, v in scores[name].items()} for name in (PUBLIC, INDOMAIN)}})
        row = curve[-1]
        print(f"{epoch:>6}  {row[PUBLIC]['accuracy']:.3f}   {row[INDOMAIN]['accuracy']:.3f} "
              f"[{row[INDOMAIN]['accuracy_ci_low']:.3f}, {row[INDOMAIN]['accuracy_ci_high']:.3f}]", flush=True)

    print("epochs  public  in-domain [95 % CI]", flush=True)
    train_central(cfg, schools, start, max(checkpoints), seed=int(cfg["run.seed"]), after_epoch=after_epoch)
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", default="2,4,8,12,16,24,32", help="comma-separated epoch counts to score at")
    parser.add_argument("--out", default="", help="result JSON (default: print only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        checkpoints = sorted({int(e) for e in args.epochs.split(",") if e.strip()})
    except ValueError:
        parser.error(f"--epochs: not a comma-separated list of epoch counts: {args.epochs!r}")
    if not checkpoints or checkpoints[0] < 1:
        parser.error("--epochs needs positive epoch counts")
    try:
        cfg = load_config(overrides=args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(int(cfg["train.threads"]) or 1)
    before = load_average()
    curve = learning_curve(cfg, checkpoints)
    if args.out:
        write_result(args.out, {"what": "(b) pooled non-private reference, scored after each listed epoch",
                                "load_average_before": before, "load_average_after": load_average(),
                                "curve": curve, "config": cfg}, module="simulations.bench.central_epochs", argv=argv)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
