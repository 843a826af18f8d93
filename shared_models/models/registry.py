"""The model zoo: build a model by name and preset; its per-sample training loss; partial checkpoint loads.

Server, clients and the evaluation node call only this module, so they agree on architectures:

    model = registry.build("hafnet", num_classes=7, preset="cpu")     # nn.Module, Opacus-valid
    out = model(x)                                                      # FEROutput(logits, aux)
    loss = registry.per_sample_loss(model, out, y).mean()              # (B,) -> DP-SGD's mean

Presets: `paper` reproduces the paper's input size and widths (parameter and MAC counts are checked in
tests/test_models_complexity.py); `cpu` is small enough to train under DP-SGD on two CPU cores.
Builder keyword arguments (e.g. num_heads, affinity_weight) override the preset.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from torch import Tensor, nn

from shared_models.output import FEROutput

if TYPE_CHECKING:
    from shared_models.models.pretrained import LoadReport


class ModelChoiceError(ValueError):
    """An unknown model, preset or option, or a bad class count: the user's choice, named in the message."""


@dataclass(frozen=True)
class Preset:
    """A named configuration of a model: input side S (input is (B, 3, S, S) in [-1, 1]) and the other
    constructor arguments that define it."""

    name: str
    input_size: int
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    clip_frames: int = 0  # > 0: the model reads clips (B, 3, T, S, S) of T = clip_frames frames


# name -> "module:Class"; imported on first build so `import registry` stays light.
_MODELS: dict[str, str] = {
    "hafnet": "shared_models.models.hafnet:HAFNet",
    "sfer_mdfae": "shared_models.models.sfer_mdfae:SFERMDFAE",
    "mafnet": "shared_models.models.mafnet:MAFNet",
    "resnet50_cbam": "shared_models.models.resnet_cbam:ResNetCBAM",
    "r2plus1d_sta": "shared_models.models.r2plus1d:R2Plus1DSTA",
}

_PRESETS: dict[str, dict[str, Preset]] = {
    "hafnet": {
        "paper": Preset(
            "paper", 224,
            "224 px; ResNet-18 widths 64/128/256/512, 7x7 stem + max-pool, 512x7x7 map; 4 heads (as DAN)",
            dict(widths=(64, 128, 256, 512), stem="imagenet", strides=(1, 2, 2, 2),
                 ca_hidden=32),
        ),
        "cpu": Preset(
            "cpu", 64,
            "64 px; ResNet-18 widths 8/16/32/64, 3x3 stride-2 stem (no max-pool), stage strides 2/2/2/1 "
            "-> 64x4x4 map; 4 heads, channel-unit hidden 8",
            dict(widths=(8, 16, 32, 64), stem="small", strides=(2, 2, 2, 1), ca_hidden=8),
        ),
        "dp": Preset(
            "dp", 64,
            "64 px; the cpu preset at widths 8/8/16/16 (~33 k params): DP-SGD noise grows with the square "
            "root of the parameter count, and from scratch at student level only a small model learns",
            dict(widths=(8, 8, 16, 16), stem="small", strides=(2, 2, 2, 1), ca_hidden=4),
        ),
    },
    "sfer_mdfae": {
        "paper": Preset(
            "paper", 112,
            "112 px (the IR50 input); IR50 widths 64/128/256/512, units 3/4/14/3; L4 512x7x7, "
            "7x7 regions, topn 15",
            dict(widths=(64, 128, 256, 512), units=(3, 4, 14, 3), regions=7, topn=15),
        ),
        "cpu": Preset(
            "cpu", 64,
            "64 px; IR50 widths 16/32/64/128, units 1/2/2/1, stride-2 input conv, stage strides 2/2/2/1; "
            "L4 128x4x4 -> 4x4 one-token regions (as the paper's 7x7 at 112 px), topn 5 (~15/49 of them)",
            dict(widths=(16, 32, 64, 128), units=(1, 2, 2, 1), stem_stride=2, stage_strides=(2, 2, 2, 1),
                 regions=4, topn=5),
        ),
        "dp": Preset(
            "dp", 64,
            "64 px; the cpu preset at widths 8/16/16/32 (~40 k params), for DP-SGD from scratch (noise grows "
            "with the square root of the parameter count)",
            dict(widths=(8, 16, 16, 32), units=(1, 2, 2, 1), stem_stride=2, stage_strides=(2, 2, 2, 1),
                 regions=4, topn=5),
        ),
    },
    "resnet50_cbam": {
        "paper": Preset(
            "paper", 224,
            "224 px; ResNet-50 (planes 64/128/256/512, blocks 3/4/6/3, 7x7 stem + max-pool), CBAM (r 16, "
            "7x7) in every bottleneck, 2x2 avg-pool before the stride-1 1x1 down-sampling shortcut",
            dict(planes=(64, 128, 256, 512), blocks=(3, 4, 6, 3), stem="imagenet", strides=(1, 2, 2, 2),
                 stem_width=64, cbam_reduction=16),
        ),
        "cpu": Preset(
            "cpu", 64,
            "64 px; the paper's blocks at planes 8/16/32/64 (outputs 32..256), 3x3 stride-2 stem (no max-pool), "
            "CBAM r 8; 256x4x4 map",
            dict(planes=(8, 16, 32, 64), blocks=(3, 4, 6, 3), stem="small", strides=(1, 2, 2, 2),
                 stem_width=16, cbam_reduction=8),
        ),
        "dp": Preset(
            "dp", 64,
            "64 px; one bottleneck per stage at planes 4/8/8/16 (outputs 16..64), CBAM r 4: small enough to "
            "learn from scratch under student-level DP",
            dict(planes=(4, 8, 8, 16), blocks=(1, 1, 1, 1), stem="small", strides=(1, 2, 2, 2),
                 stem_width=8, cbam_reduction=4),
        ),
    },
    "r2plus1d_sta": {
        "paper": Preset(
            "paper", 112,
            "16x112x112 clips; R(2+1)D-18 (torchvision's, widths 64..512, blocks 2/2/2/2), spatio-temporal "
            "attention on the 512x2x7x7 map, DACL attention + sparse centre loss",
            dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), strides=(1, 2, 2, 2), stem_width=45,
                 stem_kernel=7, stem_stride=2),
            clip_frames=16,
        ),
        "cpu": Preset(
            "cpu", 32,
            "8x32x32 clips; R(2+1)D-18 at widths 16/32/64/96, 3x3 stride-2 stem, stage strides 1/2/2/1 "
            "(space and time) -> 96x2x4x4 map, so the attention still sees 2 frames",
            dict(widths=(16, 32, 64, 96), blocks=(2, 2, 2, 2), strides=(1, 2, 2, 1), stem_width=12,
                 stem_kernel=3, stem_stride=2),
            clip_frames=8,
        ),
        "dp": Preset(
            "dp", 32,
            "2x32x32 clips (the onset and apex frames); one block per stage at widths 8/8/16/16 (~32 k params), "
            "strides as cpu (16x1x4x4 map: time is folded by stage 2, so the temporal attention sees one step): "
            "small enough to learn from scratch under student-level DP",
            dict(widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1), strides=(1, 2, 2, 1), stem_width=6,
                 stem_kernel=3, stem_stride=2),
            clip_frames=2,
        ),
    },
}


_MAFNET_CPU_LAYERS = ((16, 5, 2, 2, True), (32, 3, 1, 1, True), (64, 3, 1, 1, False), (64, 3, 1, 1, True))
_MAFNET_DP_LAYERS = ((8, 5, 2, 2, True), (16, 3, 1, 1, True), (32, 3, 1, 1, True))
_PRESETS["mafnet"] = {
    "paper": Preset(
        "paper", 96,
        "96 px gray-level faces as the paper (read as 3 channels), 16 frames; deep stream = AlexNet's five convs "
        "(64/192/384/256/256, 11x11 s4 stem, 3 max-pools, no norm) per frame; shallow stream 38 distances + "
        "7x10 LBP bins -> self-attention (key 64) -> BiLSTM 2x128 -> weight attention (64). The paper gives no "
        "LSTM/attention widths (these are this preset's), and omits dropout/FC-4096 sizes (not built)",
        dict(clip_frames=16, deep_norm=False, key_dim=64, lstm_hidden=128, attention_hidden=64),
        clip_frames=16,
    ),
    "cpu": Preset(
        "cpu", 48,
        "48 px, 8 frames; deep convs 16/32/64/64 (5x5 s2 stem, GroupNorm), BiLSTM 2x32, key 32, attention 32",
        dict(clip_frames=8, deep_layers=_MAFNET_CPU_LAYERS, deep_norm=True, key_dim=32, lstm_hidden=32,
             attention_hidden=32),
        clip_frames=8,
    ),
    "dp": Preset(
        "dp", 48,
        "48 px, 8 frames; deep convs 8/16/32 (GroupNorm), BiLSTM 2x16, key 16, attention 16 (~30 k params: DP "
        "noise grows with the square root of the parameter count)",
        dict(clip_frames=8, deep_layers=_MAFNET_DP_LAYERS, deep_norm=True, key_dim=16, lstm_hidden=16,
             attention_hidden=16),
        clip_frames=8,
    ),
}


def clip_frames(model: nn.Module) -> int:
    """T for a clip model (its input is (B, 3, T, S, S)), 0 for an image model (input (B, 3, S, S))."""
    inner = unwrap(model)
    own = getattr(inner, "clip_frames", None)
    if isinstance(own, int):
        return own
    table = _PRESETS.get(str(getattr(inner, "model_name", "")), {})
    preset = table.get(str(getattr(inner, "preset", "")))
    return int(preset.clip_frames) if preset is not None else 0


def available() -> list[str]:
    """Model names `build` accepts."""
    return list(_MODELS)


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ModelChoiceError(f"unknown model '{name}' (available: {', '.join(available())})")


def presets(name: str) -> dict[str, Preset]:
    """The presets of model `name`, by preset name."""
    _check_name(name)
    return dict(_PRESETS[name])


def build(name: str, num_classes: int = 7, preset: str = "cpu", **kwargs: Any) -> nn.Module:
    """Build model `name` at `preset`; keyword arguments override the preset (unknown ones are an error).

    The model has `.input_size` (the input side S), `.per_sample_loss(out, y)` and `.loss_terms(out, y)`.
    """
    _check_name(name)
    table = _PRESETS[name]
    if preset not in table:
        raise ModelChoiceError(f"model '{name}': unknown preset '{preset}' (available: {', '.join(table)})")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelChoiceError(f"model '{name}': num_classes must be an int >= 2, got {num_classes!r}")
    module_name, cls_name = _MODELS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ModelChoiceError(f"model '{name}': unknown option(s) {', '.join(unknown)} "
                         f"(accepted: {', '.join(sorted(accepted))})")
    options = {"input_size": table[preset].input_size, **table[preset].kwargs, **kwargs}
    model = cls(num_classes, **options)
    model.preset = preset  # type: ignore[attr-defined]
    model.model_name = name  # type: ignore[attr-defined]
    model.clip_frames = int(table[preset].clip_frames)  # type: ignore[attr-defined]
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus wrappers (GradSampleModule and friends keep it in `_module`)."""
    while hasattr(model, "_module") and isinstance(model._module, nn.Module):
        model = model._module
    return model


def _check_targets(out: FEROutput, y: Tensor) -> None:
    logits = out.logits
    if y.ndim != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}, got {int(y.min())}..{int(y.max())}")


def per_sample_loss(model: nn.Module, out: FEROutput, y: Tensor) -> Tensor:
    """The full training loss of each sample, shape (B,): cross-entropy plus the model's auxiliary terms
    with its configured weights. Average it (`.mean()`) for Opacus' loss_reduction="mean"."""
    _check_targets(out, y)
    return unwrap(model).per_sample_loss(out, y)


def scale_aux_losses(model: nn.Module, scale: float) -> nn.Module:
    """Multiply the weights of the model's auxiliary loss terms (everything but cross-entropy) by `scale`.

    Under DP-SGD each student's whole gradient is clipped to one norm, so auxiliary terms compete with
    cross-entropy for that budget; `model.aux_loss_weight` in the config sets this (1 = the paper)."""
    if scale < 0:
        raise ValueError(f"aux loss scale must be >= 0, got {scale}")
    inner = unwrap(model)
    for name in getattr(inner, "loss_names", ("ce",))[1:]:
        setattr(inner, f"{name}_weight", float(getattr(inner, f"{name}_weight")) * float(scale))
    return model


def loss_terms(model: nn.Module, out: FEROutput, y: Tensor) -> dict[str, Tensor]:
    """The unweighted per-sample loss terms by name (e.g. ce, affinity, partition), each (B,); for logging."""
    _check_targets(out, y)
    return unwrap(model).loss_terms(out, y)


def load_pretrained(model: nn.Module, path: str | Path) -> "LoadReport":
    """Partial, name- and shape-matched load of a user checkpoint into `model` (in place); never downloads.

    Returns a `pretrained.LoadReport` (matched / missing / shape_mismatched / unused keys, `.summary()`);
    raises `pretrained.PretrainedError` (a ValueError) naming the file when it cannot be used at all."""
    from shared_models.models.pretrained import load_pretrained as _load

    return _load(unwrap(model), path)


FINETUNE_MODES = ("all", "last", "norms+head")
_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)


def _last_stage(backbone: nn.Module) -> nn.Module:
    """The backbone's last stage: ResNet's highest `layerN`, or IR50's last run of units."""
    ends = getattr(backbone, "_stage_ends", None)
    body = getattr(backbone, "body", None)
    if ends and isinstance(body, nn.Sequential):
        start = ends[-2] if len(ends) > 1 else 0
        return nn.ModuleList(list(body[start:ends[-1]]))
    stages = sorted((int(name[5:]), module) for name, module in backbone.named_children()
                    if name.startswith("layer") and name[5:].isdigit())
    if stages:
        return stages[-1][1]
    raise ValueError(f"{type(backbone).__name__}: no stages found (train.trainable=last needs layerN or an IR body)")


def freeze_for_finetuning(model: nn.Module, mode: str) -> dict[str, int]:
    """Choose what trains when fine-tuning a pre-trained model: `all`; `last` (the backbone's last stage and
    everything outside the backbone: attention heads, norms after it, classifier); `norms+head` (every
    normalisation layer's affine parameters and everything outside the backbone). The rest gets
    requires_grad=False, so under DP-SGD its coordinates are neither clipped nor noised (call this before
    the DP engine wraps the model). Returns {"trainable": n, "frozen": n} parameter counts."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"train.trainable must be one of {', '.join(FINETUNE_MODES)}; got {mode!r}")
    inner = unwrap(model)
    backbone = getattr(inner, "backbone", None)
    if mode != "all" and not isinstance(backbone, nn.Module):
        raise ValueError(f"{type(inner).__name__}: no `backbone` to freeze (train.trainable={mode})")
    keep: set[int] = set()
    if mode == "all":
        keep = {id(p) for p in inner.parameters()}
    else:
        in_backbone = {id(p) for p in backbone.parameters()}
        keep = {id(p) for p in inner.parameters() if id(p) not in in_backbone}
        if mode == "last":
            keep |= {id(p) for p in _last_stage(backbone).parameters()}
        else:
            keep |= {id(p) for module in inner.modules() if isinstance(module, _NORM_TYPES)
                     for p in module.parameters(recurse=False)}
    counts = {"trainable": 0, "frozen": 0}
    for p in inner.parameters():
        p.requires_grad_(id(p) in keep)
        counts["trainable" if id(p) in keep else "frozen"] += p.numel()
    return counts


def pretrained_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance a fedfer pre-trained checkpoint carries (`fedfer pretrain`), or None for any other
    checkpoint; raises `pretrained.PretrainedError` naming the file when it cannot be read."""
    from shared_models.models.pretrained import read_provenance

    return read_provenance(path)


TASK_CLASSES = {"fer7": 7, "engagement": 4}   # model.task -> outputs (FER7; DAiSEE's four engagement levels)


def task_classes(cfg: Mapping[str, Any]) -> int:
    """The federation's number of outputs: 7 for `model.task` fer7 (the default), 4 for engagement."""
    task = str(cfg.get("model.task", "fer7"))
    if task not in TASK_CLASSES:
        raise ValueError(f"model.task must be one of {', '.join(TASK_CLASSES)}; got {task!r}")
    return TASK_CLASSES[task]


def config_clip_frames(cfg: Mapping[str, Any]) -> int:
    """T of the configured model's preset (0: an image model), without building it."""
    table = _PRESETS.get(str(cfg["model.name"]), {})
    preset = table.get(str(cfg["model.preset"]))
    return int(preset.clip_frames) if preset is not None else 0


def build_from_config(cfg: Mapping[str, Any]) -> nn.Module:
    """The federation's model as a config describes it (`model.name`, `model.preset`, `model.task`'s outputs,
    `model.aux_loss_weight`, `train.trainable`): the one place the server, the schools and the harnesses
    build it. Frozen parameters (train.trainable) are frozen here, before any DP engine sees the model."""
    model = build(str(cfg["model.name"]), num_classes=task_classes(cfg), preset=str(cfg["model.preset"]))
    freeze_for_finetuning(model, str(cfg.get("train.trainable", "all")))
    return scale_aux_losses(model, float(cfg["model.aux_loss_weight"]))


def model_info(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records about its model, enough to rebuild it."""
    return {"name": str(cfg["model.name"]), "preset": str(cfg["model.preset"]), "num_classes": task_classes(cfg)}
