"""`fedfer evaluate` (score a checkpoint on public benchmarks) and `fedfer report` (rebuild a run's
report). Heavy imports (torch, matplotlib) happen inside the handlers so `fedfer --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfer.commands import UsageError

if TYPE_CHECKING:   # torch is imported inside the handlers, so that `fedfer --help` stays fast
    from torch import nn

EVALUATE_EPILOG = """\
benchmarks (NAME=PATH, or NAME:SPLIT=PATH; the synthetic ones are bare names found under --data-root):
  fer2013=fer2013.csv          splits train|val|test|all (default test = PrivateTest)
  ferplus=DIR                  fer2013new.csv + fer2013.csv or FER2013Train/Valid/Test folders (default test)
  rafdb=RAF-DB/basic           EmoLabel/list_patition_label.txt + Image/aligned (default test)
  affectnet7=DIR, affectnet8=DIR   Manually_Annotated_file_lists/*.csv (default val)
  ckplus=DIR                   cohn-kanade-images/ + Emotion/ (last 3 frames of each labelled sequence)
  kdef=DIR                     AF01ANS.JPG-style names (all | frontal)
  daisee=DIR                   DataSet/ + Labels/ (engagement levels 0-3; default test)
  dfew=DIR                     EmoLabel_DataSplit/ + Clip/jpg_256/ (test1..test5, train1..train5)
  afew=DIR, clipfolder=DIR     class folders of clips (frame folders; videos need PyAV)
  imagefolder=DIR              <class name>/<image> folders
  synthetic-fer2013, synthetic-rafdb   the synthetic classroom's public split (its PublicTest and PrivateTest rows, 'val+test'; :train = its training split)
  synthetic-indomain           every simulated school's held-out students (simulation only)
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "evaluate", help="score a checkpoint on public FER benchmarks",
        description="Score a checkpoint on public FER benchmarks: accuracy with a bootstrap 95% CI, UAR, macro-F1.",
        epilog=EVALUATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--checkpoint", required=True, type=Path, metavar="C",
                          help="a checkpoint .pt written by the server, or a run directory (its latest round; "
                               "RUN/checkpoints/best.pt is the round that scored best on the public benchmarks)")
    evaluate.add_argument("--benchmark", required=True, action="append", metavar="NAME=PATH",
                          help="a benchmark to score (repeatable); see the list below")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object, keyed by benchmark, instead of a table")
    evaluate.add_argument("--data-root", type=Path, default=None,
                          help="synthetic classroom root for synthetic-* benchmarks (default: the one the "
                               "checkpoint's config names: data.root, else its parameters' cache folder)")
    evaluate.add_argument("--batch-size", type=int, default=128)
    evaluate.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the CI (0: none)")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    evaluate.add_argument("--input-size", type=int, default=None,
                          help="input side in pixels (default: the model preset's)")
    evaluate.add_argument("--threads", type=int, default=1, help="torch CPU threads (1..1024)")
    evaluate.set_defaults(func=cmd_evaluate)

    report = subparsers.add_parser(
        "report", help="(re)build a run's report.md and plots",
        description="Rebuild RUN_DIR/report.md and RUN_DIR/plots/*.png from config.yaml, metrics.jsonl and "
                    "ledger/*.jsonl. Works on a finished, crashed or still-running run.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.set_defaults(func=cmd_report)


# -- evaluate ----------------------------------------------------------------------------------
def _fail(command: str, message: str) -> int:
    print(f"fedfer {command}: {message}", file=sys.stderr)
    return 2


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a server checkpoint (or a run directory's latest one) and check its fields.

    A run directory means its latest round, as it always has; when that is not the round that scored best on
    the public benchmarks, one line on stderr says so and names checkpoints/best.pt, the file that holds the
    best one (a file path is used as given). Loaded with torch.load(weights_only=True) through server.run_dir:
    a checkpoint is data and must not be able to run code when loaded."""
    from server.run_dir import CHECKPOINT_NAME, latest_is_not_best, load_checkpoint_file

    path = Path(path)
    run_path: Path | None = None
    if path.is_dir():
        latest = path / "checkpoints" / "latest.json"
        if not latest.is_file():
            if (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file():
                # a run directory whose first round has not ended yet (or that stopped before it did)
                raise UsageError(f"{path}: no checkpoint yet (checkpoints/latest.json is written when a round "
                                 f"ends); wait for the run's first round, or give a checkpoint file")
            raise UsageError(f"{path}: a directory without checkpoints/latest.json (not a run directory?)")
        try:
            name = json.loads(latest.read_text(encoding="utf-8"))["file"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise UsageError(f"{latest}: unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
        if not isinstance(name, str) or not CHECKPOINT_NAME.match(name):
            raise UsageError(f"{latest}: field 'file' must name a checkpoint like round-0003.pt; got {name!r:.60}")
        run_path, path = path, path / "checkpoints" / name
    checkpoint = load_checkpoint_file(path)   # raises CheckpointError (a ValueError) naming the file
    if run_path is not None:
        notice = latest_is_not_best(run_path, int(checkpoint.get("round", -1)))
        if notice:
            print(f"fedfer: {notice}", file=sys.stderr)
    checkpoint["_path"] = str(path)
    return checkpoint


def build_model(checkpoint: dict[str, Any]) -> nn.Module:
    """The checkpoint's model through the registry, with its weights loaded (one-line errors name the file)."""
    from server.run_dir import model_from_checkpoint

    return model_from_checkpoint(checkpoint, Path(checkpoint["_path"]))


def _input_size(model: Any, checkpoint: dict[str, Any], override: int | None) -> int:
    if override:
        return int(override)
    size = getattr(model, "input_size", None)
    if isinstance(size, int) and size > 0:
        return size
    from shared_models.models import registry

    info = checkpoint["model"]
    try:
        return int(registry.presets(str(info["name"]))[str(info["preset"])].input_size)
    except Exception:  # noqa: BLE001 - any failure here means: ask the user
        raise UsageError("cannot tell the model's input size; pass --input-size") from None


def _configured_data_root(cfg: dict[str, Any]) -> Path | None:
    """The synthetic classroom root the run used: data.root, else the cache folder of its parameters."""
    if cfg.get("data.root"):
        return Path(str(cfg["data.root"])).expanduser()
    try:
        from simulations.synth import root_from_config

        return root_from_config(cfg)
    except (ImportError, ValueError):
        return None


def evaluate_checkpoint(checkpoint_path: Path, specs: list[str], *, data_root: Path | None = None,
                        batch_size: int = 128, n_boot: int = 1000, seed: int = 0,
                        input_size: int | None = None) -> dict[str, dict[str, Any]]:
    """{benchmark name: metric dict} for a checkpoint — the work behind `fedfer evaluate`."""
    from shared_models.datasets import open_benchmark
    from shared_models.evaluation import benchmark_dataset, evaluate_model

    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint)
    size = _input_size(model, checkpoint, input_size)
    if data_root is None:
        data_root = _configured_data_root(checkpoint.get("config") or {})
    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        bench = open_benchmark(spec, data_root=data_root)
        key = bench.name if bench.name not in results else f"{bench.name}:{bench.split}"
        metrics = evaluate_model(model, benchmark_dataset(model, bench, size), batch_size=batch_size,
                                 n_boot=n_boot, seed=seed)
        metrics.update({"benchmark": bench.name, "split": bench.split, "path": str(bench.path),
                        "checkpoint": checkpoint["_path"], "round": checkpoint.get("round"),
                        "model": f"{checkpoint['model']['name']}/{checkpoint['model']['preset']}"})
        results[key] = metrics
    return results


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("benchmark", "split", "n", "accuracy % [95% CI]", "UAR %", "macro-F1 %", "skipped")]
    for name, m in results.items():
        ci = ""
        if m.get("accuracy_ci_low") is not None:
            ci = f" [{_fmt(m['accuracy_ci_low'])}, {_fmt(m['accuracy_ci_high'])}]"
        rows.append((name, str(m.get("split", "")), str(m["n"]), _fmt(m["accuracy"]) + ci, _fmt(m["uar"]),
                     _fmt(m["macro_f1"]), str(m.get("skipped", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: Most torch CPU threads `evaluate` starts (train.threads' maximum in the config schema).
MAX_THREADS = 1024


def cmd_evaluate(args: argparse.Namespace) -> int:
    import logging

    import torch

    from shared_models.datasets import BenchmarkError

    logging.basicConfig(level=logging.WARNING, format="fedfer evaluate: %(message)s")
    if not 1 <= args.threads <= MAX_THREADS:   # 100,000 crashed the process (OpenBLAS could not start them)
        return _fail("evaluate", f"--threads must be in 1..{MAX_THREADS}, got {args.threads}")
    if args.seed < 0:   # numpy's own message named no flag
        return _fail("evaluate", f"--seed must be >= 0, got {args.seed}")
    torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        return _fail("evaluate", f"--batch-size must be >= 1, got {args.batch_size}")
    if args.bootstrap < 0 or args.bootstrap > 1_000_000:
        return _fail("evaluate", f"--bootstrap must be in 0..1000000, got {args.bootstrap}")
    if args.input_size is not None and not 16 <= args.input_size <= 1024:
        return _fail("evaluate", f"--input-size must be in 16..1024, got {args.input_size}")
    if args.batch_size > 100_000:
        return _fail("evaluate", f"--batch-size must be <= 100000, got {args.batch_size}")
    try:
        results = evaluate_checkpoint(args.checkpoint, args.benchmark, data_root=args.data_root,
                                      batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed,
                                      input_size=args.input_size)
    except (BenchmarkError, ValueError, FileNotFoundError) as exc:
        return _fail("evaluate", str(exc))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        first = next(iter(results.values()))
        print(f"checkpoint {first['checkpoint']} (round {first.get('round')}, model {first['model']})")
        print(format_table(results))
        for line in class_mismatch_notes(results):
            print(line)
    return 0


def class_mismatch_notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """A benchmark with more classes than the model (FERPlus's contempt beside a FER7 model): why those faces
    count as errors, said under the table rather than only in --json's `model_classes`."""
    notes = []
    for name, result in results.items():
        labels, model_classes = list(result.get("labels") or []), int(result.get("model_classes") or 0)
        if 0 < model_classes < len(labels):
            notes.append(f"note: {name} has {len(labels)} classes and the model {model_classes}: its faces of "
                         f"{', '.join(labels[model_classes:])} count as errors, and UAR averages over {len(labels)}")
    return notes


# -- report ------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from server.report import build_report
    from server.run_dir import RunBusy, RunDirectory

    try:
        path = build_report(args.run_dir)
    except ValueError as exc:
        return _fail("report", str(exc))
    # the folder is a run (build_report checked): a preparation gate a killed `fedfer simulate` left goes now,
    # one a live `fedfer simulate` holds stays, and so does one this user may not remove (the report is written)
    with contextlib.suppress(RunBusy, OSError):
        RunDirectory(Path(args.run_dir)).remove_stale_gate()
    print(path)
    from server.best_round import compare_line
    from server.run_dir import BEST_CHECKPOINT, last_public_score, read_best_json, start_evaluation

    best = read_best_json(Path(args.run_dir))
    if best is not None:   # the README promises the command names it, not only the report it writes
        run_dir = Path(args.run_dir)
        print(f"  {compare_line(best, last_public_score(run_dir), start_evaluation(run_dir))} — kept as "
              f"{Path(args.run_dir) / 'checkpoints' / BEST_CHECKPOINT}")
    return 0
