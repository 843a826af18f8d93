"""Parameter and multiply-accumulate (MAC) counts, the figures papers print as "Params" and "FLOPs".

MACs are counted with forward hooks on convolution and linear layers, which is where thop (the counter
behind most FER papers' tables) puts nearly all of a CNN's cost:

    Conv:   output elements x (in_channels / groups) x kernel area      (bias not counted, as thop)
    Linear: output elements x in_features

Pooling, normalisation, activations and the attention matmuls of SFER-MDFAE's routing attention
(<1 % of its total at 112 px) and of R(2+1)D's spatio-temporal attention (<0.1 % at 16x112x112) are not
counted. Counts are per image (batch of one), or per clip for a clip model (`clip_frames` T > 0: the
input is (1, 3, T, S, S)).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import nn


@dataclass(frozen=True)
class Complexity:
    params: int          # trainable parameters
    macs: int            # multiply-accumulates per image or clip (conv + linear)
    input_size: int
    clip_frames: int = 0  # > 0: counted on a clip of this many frames

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_size: int, clip_frames: int | None = None) -> int:
    """MACs of one forward pass of a (1, 3, S, S) input (a clip model: (1, 3, T, S, S), T = `clip_frames` or
    the model's own) through `model`'s conv and linear layers (an Opacus DPLSTM is made of Linear cells, so
    its gates are counted)."""
    from shared_models.models.registry import clip_frames as model_clip_frames

    frames = model_clip_frames(model) if clip_frames is None else clip_frames
    total = 0

    def conv_hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        per_output = (module.in_channels // module.groups) * prod(module.kernel_size)
        total += output.numel() * per_output

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            shape = (1, 3, frames, input_size, input_size) if frames else (1, 3, input_size, input_size)
            quiet = getattr(model, "quiet", None)
            if quiet is not None:
                model.quiet = True
            model(torch.zeros(*shape, dtype=param.dtype, device=param.device))
            if quiet is not None:
                model.quiet = quiet
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total


def complexity(model: nn.Module, input_size: int | None = None, clip_frames: int | None = None) -> Complexity:
    """Params and MACs of `model` at its own `input_size` and `clip_frames` (or the ones given)."""
    size = int(input_size if input_size is not None else model.input_size)
    from shared_models.models.registry import clip_frames as model_clip_frames

    frames = int(clip_frames if clip_frames is not None else model_clip_frames(model))
    return Complexity(params=count_params(model), macs=count_macs(model, size, frames), input_size=size,
                      clip_frames=frames)
