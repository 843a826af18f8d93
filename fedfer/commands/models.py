"""``fedfer models``: the model zoo as a table (or JSON): each model x preset with input size, params, MACs.

Heavy imports (torch, the models) happen inside the handler so `fedfer --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from fedfer.commands import UsageError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list the models and presets with input size, parameters and MACs",
        description="Every model x preset the registry builds (names for model.name / model.preset), with its "
                    "input size (TxSxS for clip models), trainable parameters (7 classes) and "
                    "multiply-accumulates per image or clip (conv + linear layers, the figure papers call "
                    "FLOPs). Building the paper presets takes a "
                    "few seconds.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--model", default=None, help="only this model")
    p.add_argument("--preset", default=None, help="only this preset")
    p.add_argument("--classes", type=int, default=7, help="number of classes (default 7)")
    p.set_defaults(func=_models)


def rows(model: str | None = None, preset: str | None = None, num_classes: int = 7) -> list[dict]:
    """One dict per model x preset: model, preset, input_size, clip_frames (0: images), params, macs (per
    image, or per clip of clip_frames frames), description."""
    import torch

    from shared_models.models import registry
    from shared_models.models.complexity import complexity

    names = registry.available() if model is None else [model]
    out = []
    for name in names:
        table = registry.presets(name)  # raises ValueError for an unknown model
        if preset is not None and preset not in table:
            raise UsageError(f"model '{name}': unknown preset '{preset}' (available: {', '.join(table)})")
        for pname, spec in table.items():
            if preset is not None and pname != preset:
                continue
            torch.manual_seed(0)
            c = complexity(registry.build(name, num_classes, pname))
            out.append({"model": name, "preset": pname, "input_size": spec.input_size,
                        "clip_frames": spec.clip_frames, "params": c.params, "macs": c.macs,
                        "description": spec.description})
    return out


def _models(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    if not 2 <= args.classes <= 1000:   # the head is classes x features: 10^9 classes would exhaust memory
        print(f"fedfer models: --classes must be in 2..1000, got {args.classes}", file=sys.stderr)
        return 2
    try:
        table = rows(args.model, args.preset, args.classes)
    except ValueError as exc:
        print(f"fedfer models: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    header = f"{'model':<13} {'preset':<6} {'input':>10} {'params':>9} {'MACs':>9}  description"
    print(header)
    print("-" * len(header))
    for r in table:
        size = f"{r['input_size']}x{r['input_size']}"
        if r["clip_frames"]:  # a clip model: T x S x S, MACs per clip
            size = f"{r['clip_frames']}x{size}"
        macs = f"{r['macs'] / 1e9:.3f} G" if r["macs"] >= 1e8 else f"{r['macs'] / 1e6:.1f} M"
        print(f"{r['model']:<13} {r['preset']:<6} {size:>10} {r['params'] / 1e6:>7.3f} M {macs:>9}  {r['description']}")
    return 0
