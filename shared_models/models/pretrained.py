"""Partial loading of a user-supplied checkpoint into a fedfer model. Never downloads anything.

A school or the server may start from weights the user has (an MS-Celeb ResNet-18 or IR-50, a DAN or
POSTER checkpoint, or a fedfer checkpoint). The file is a state_dict, or a dict holding one under
"state_dict" or "model". Each checkpoint key is matched to a model parameter by name, first as is, then
with the model's prefix rewrites (`pretrained_aliases`, e.g. a bare ResNet key `layer1.0.conv1.weight`
-> `backbone.layer1.0.conv1.weight`); it is loaded only when the shapes agree. The report lists what
was loaded, what kept its initial value, what did not fit, and what in the file was not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn


class PretrainedError(ValueError):
    """The checkpoint cannot be used at all (missing, unreadable, no tensors); one line naming the file."""


@dataclass
class LoadReport:
    path: str
    matched: list[str] = field(default_factory=list)            # model keys loaded from the file
    missing: list[str] = field(default_factory=list)            # model keys the file did not provide
    shape_mismatched: list[dict[str, Any]] = field(default_factory=list)  # {key, checkpoint, model}
    unused: list[str] = field(default_factory=list)             # checkpoint keys that matched nothing

    def summary(self) -> str:
        """One line for logs."""
        return (f"{self.path}: loaded {len(self.matched)} tensors, {len(self.missing)} kept their initial "
                f"value, {len(self.shape_mismatched)} shape mismatches, {len(self.unused)} unused in the file")


def _strip(key: str) -> str:
    for prefix in ("module.", "_module."):  # DataParallel / Opacus wrappers
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file (a state_dict or a dict with "state_dict" / "model")."""
    path = Path(path)
    if path.is_dir():   # a run directory: which of its rounds is the user's choice, so none is picked for them
        raise PretrainedError(f"{path}: a folder, not a checkpoint file; from a run directory give "
                              f"{path / 'checkpoints' / 'best.pt'} (the round that scored best on the public "
                              "benchmarks) or checkpoints/round-NNNN.pt")
    if not path.is_file():
        raise PretrainedError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise PretrainedError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise PretrainedError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    state = {_strip(str(k)): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise PretrainedError(f"{path}: no tensors found (expected a state_dict, or one under 'state_dict' or 'model')")
    return state


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The "provenance" entry of a checkpoint written by `fedfer pretrain` (data, epochs, seed, config,
    hashes), or None when the file has none (a plain state_dict, a server checkpoint)."""
    read_state_dict(path)   # the same checks and one-line errors as loading it
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    provenance = obj.get("provenance") if isinstance(obj, Mapping) else None
    return dict(provenance) if isinstance(provenance, Mapping) else None


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load the name- and shape-matched tensors of `path` into `model` (in place); return the report."""
    state = read_state_dict(path)
    if hasattr(model, "convert_checkpoint"):
        state = model.convert_checkpoint(state)
    aliases: list[tuple[str, str]] = list(getattr(model, "pretrained_aliases", lambda: [])())
    own = model.state_dict()
    report = LoadReport(path=str(path))
    to_load: dict[str, Tensor] = {}
    for key, tensor in state.items():
        candidates = [key] + [new + key[len(old):] for old, new in aliases if key.startswith(old)]
        target = next((c for c in candidates if c in own), None)
        if target is None or target in to_load:
            report.unused.append(key)
        elif tuple(own[target].shape) != tuple(tensor.shape):
            report.shape_mismatched.append(
                {"key": target, "checkpoint": list(tensor.shape), "model": list(own[target].shape)})
        else:
            to_load[target] = tensor.to(own[target].dtype)
    model.load_state_dict(to_load, strict=False)
    report.matched = sorted(to_load)
    mismatched = {m["key"] for m in report.shape_mismatched}
    report.missing = sorted(k for k in own if k not in to_load and k not in mismatched)
    return report
