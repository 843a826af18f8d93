"""`fedfer pretrain`: train the federation's model on public faces (no school data, no privacy cost) and
write a checkpoint with its provenance; `fedfer simulate model.pretrained=PATH` (or a deployment run's `-c model.pretrained=…`) starts from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared_models.config import ConfigError, check_paths, load_config

EPILOG = """\
examples:
  fedfer pretrain                                     # the synthetic classroom's public training split
  fedfer pretrain --benchmark fer2013:train=/data/fer2013.csv --out fer2013-hafnet.pt
  fedfer simulate model.pretrained=fer2013-hafnet.pt  # federate from it
  fedfer simulate model.pretrain=auto                 # pre-train (cached) and federate in one command
  fedfer pretrain --for deploy --out "$PWD/data/pretrained.pt"   # for a deployment's runs (docs/deployment.md)
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("pretrain", help="pre-train the model on public FER data (no privacy cost)",
                         description="Pre-train the federation's model (model.name, model.preset) on public faces "
                                     "and write a checkpoint with its provenance.",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("--benchmark", action="append", metavar="NAME[:SPLIT]=PATH",
                     help="public training data, repeatable (default: pretrain.benchmarks); any reader "
                          "`fedfer evaluate --help` lists, e.g. fer2013:train=/data/fer2013.csv, rafdb:train=DIR")
    cmd.add_argument("--out", type=Path, default=None,
                     help="checkpoint file (default: the cache that model.pretrain=auto reads)")
    cmd.add_argument("--data-root", type=Path, default=None,
                     help="synthetic classroom for synthetic-* benchmarks (default: data.root or its cache; built if absent)")
    cmd.add_argument("--epochs", type=int, default=None, help="passes over the data (default: pretrain.epochs)")
    cmd.add_argument("--no-evaluate", action="store_true", help="skip scoring the result on evaluation.benchmarks")
    cmd.add_argument("--retrain", action="store_true",
                     help="train even when the cache holds a checkpoint pre-trained from the same inputs "
                          "(default: copy that one)")
    cmd.add_argument("--for", dest="next_step_for", choices=("simulate", "deploy"), default=None,
                     help="what the checkpoint is for, which decides the closing 'next:' line: a `fedfer simulate` "
                          "or a deployment's `flwr run` (default: deploy if this folder holds a deployment, "
                          f"{DEPLOYMENT_MANIFEST}, else simulate)")
    cmd.add_argument("--config", type=Path, help="YAML config (defaults: shared_models/defaults.yaml)")
    cmd.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.preset=cpu pretrain.lr=0.001")
    cmd.set_defaults(func=cmd_pretrain)


#: the manifest `fedfer deploy init` writes (its default --dir, deploy/): a folder that holds one is a deployment's
DEPLOYMENT_MANIFEST = "deploy/deployment.json"


def next_step(checkpoint: Path, purpose: str | None, folder: Path) -> str:
    """The closing `next:` line: how the checkpoint is used next. A simulation names it with a
    `fedfer simulate` override; a deployment names it in `flwr run`'s run-config, where the ServerApp runs in
    the coordinator's folder, so the path is given absolute. `purpose` None: a deployment if `folder` holds
    one (deploy/deployment.json), else a simulation."""
    if purpose is None:
        purpose = "deploy" if (folder / DEPLOYMENT_MANIFEST).is_file() else "simulate"
    if purpose == "simulate":
        return f"next: fedfer simulate model.pretrained={checkpoint}"
    pretrained = f'model.pretrained="{Path(checkpoint).expanduser().resolve()}"'
    if not (folder / DEPLOYMENT_MANIFEST).is_file():
        return (f"next: fedfer deploy init --coordinator HOST, add the schools and the evaluator, then give every run "
                f"-c '{pretrained}' (docs/deployment.md)")
    keyring = (folder / DEPLOYMENT_MANIFEST).parent / "keys"
    return (f"next: flwr run . fedfer --stream -c 'privacy.keyring=\"{keyring.resolve()}\" {pretrained}' with the run's "
            "other settings (docs/deployment.md §3)")


def _needs_synthetic(specs: str) -> bool:
    from shared_models.datasets import SYNTHETIC, split_benchmark_list

    return any(spec.split("=", 1)[0].split(":", 1)[0].strip().lower() in SYNTHETIC and "=" not in spec
               for spec in split_benchmark_list(specs))


def _unwritable(out: Path) -> str | None:
    """Why the checkpoint cannot be written to `out` (its folder is made if missing), or None."""
    import os

    out = out.expanduser()
    if out.is_dir():
        return "a directory (give the checkpoint's file name)"
    folder = out.parent
    while not folder.exists() and folder != folder.parent:   # the first folder that exists is where it is made
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable by this user"
    return None


def cmd_pretrain(args: argparse.Namespace) -> int:
    try:
        overrides = list(args.overrides)
        if args.benchmark:
            overrides.append("pretrain.benchmarks=" + ",".join(args.benchmark))
        if args.epochs is not None:
            overrides.append(f"pretrain.epochs={args.epochs}")
        cfg = load_config(args.config, overrides)
        check_paths(cfg, source=str(args.config or "override"))
    except ConfigError as exc:
        print(f"fedfer: {exc}", file=sys.stderr)
        return 2
    if args.out is not None and (problem := _unwritable(args.out)):   # before minutes of training, not after
        print(f"fedfer: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    from simulations import pretrain, synth

    evaluate = not args.no_evaluate
    try:   # before any data is built for it
        pretrain.check_model_reads_stills(cfg)
    except pretrain.PretrainError as exc:
        print(f"fedfer: {exc}", file=sys.stderr)
        return 2
    data_root: Path | None = args.data_root.expanduser().resolve() if args.data_root else None
    if data_root is not None:
        cfg["data.root"] = str(data_root)
    if _needs_synthetic(str(cfg["pretrain.benchmarks"])) or (evaluate and _needs_synthetic(str(cfg["evaluation.benchmarks"]))):
        differ = synth.other_settings(data_root, synth.params_from_config(cfg)) if data_root is not None else []
        if differ:   # rebuilding it would replace the schools a deployment or another run reads from there
            print(f"fedfer: --data-root {data_root} holds a synthetic classroom made with other settings "
                  f"({'; '.join(differ[:3])}{'; …' if len(differ) > 3 else ''}): give pretrain the settings "
                  "`fedfer data synth` used there, or another folder", file=sys.stderr)
            return 2
        data_root = synth.ensure_for_config(cfg, echo=lambda line: print(line, flush=True))
    echo = lambda line: print("  " + line, flush=True)  # noqa: E731
    try:
        data = pretrain.data_specs(cfg, data_root)
        cached = pretrain.cached_checkpoint(cfg, data_root, data)
        out = args.out or cached
        reused = None if args.retrain else pretrain.reuse_cached(cfg, data_root, Path(out), evaluate=evaluate,
                                                                 data=data)
        provenance = reused or pretrain.pretrain(cfg, data_root, Path(out), evaluate=evaluate, echo=echo, data=data)
    except pretrain.PretrainError as exc:
        print(f"fedfer: {exc}", file=sys.stderr)
        return 2
    print(f"pre-trained checkpoint: {out}")
    if reused is not None:   # its seconds are the first training's: say it was not trained now
        print(f"  the cached checkpoint pre-trained from the same inputs ({cached}), not trained again; "
              "--retrain trains it anew")
    print(f"  {provenance['images']} public faces x {provenance['epochs']} epochs, {provenance['steps']} steps, "
          f"final loss {provenance['final_loss']:.3f}, {provenance['seconds']:.0f} s"
          f"{' when first trained' if reused is not None else ''}; inputs {provenance['inputs_hash']}")
    for bench, m in provenance.get("evaluation", {}).items():
        ci = f" [95% CI {m['accuracy_ci_low']:.3f}-{m['accuracy_ci_high']:.3f}]" if m.get("accuracy_ci_low") is not None else ""
        print(f"  {bench:<20} accuracy {m['accuracy']:.3f}{ci} (n={m['n']})")
    print(next_step(Path(out), args.next_step_for, Path.cwd()))
    return 0
