"""Layers whose Opacus per-sample gradients are computed by samplers written for them.

Both are plain subclasses of torch layers (same parameters, same state_dict names, same forward); the
samplers are registered through Opacus' own `register_grad_sampler` extension point for these
subclasses only, so nothing in Opacus or in other code's `nn.Conv2d` / `nn.PReLU` changes. Both are
exact: tests/test_models_dp.py compares every model's per-sample gradients with per-sample autograd.

- `GroupedConv2d` (`groups` > 1: HAFNet's stacked heads, SFER-MDFAE's depthwise LePE). Opacus' stock
  Conv2d sampler computes the full (out x in*k) outer product for every sample and then keeps the
  block diagonal, i.e. `groups` times the work and memory needed (128x for a 128-channel depthwise
  conv; ~600 MB of temporaries per HAFNet head layer at the paper preset and batch 32). Here each
  group is contracted with its own input block only.
- `PReLU` (IR50). Opacus has no sampler for PReLU and falls back to functorch (vmap of a replayed
  forward), which on the full-resolution IR50 maps was the slowest layer of SFER-MDFAE. The gradient
  of PReLU's slope is sum over positions of grad_out * min(x, 0), one einsum.

Two one-parameter modules hold bare parameters that would otherwise sit in a bigger module and send all
of it to the functorch fallback:

- `Scale` (the learnable gamma of R(2+1)D's spatio-temporal attention): y = gamma * x.
- `CentreOffsets` (class centres of a centre loss): f -> f - c_k for every class k; the loss built on
  the offsets stays outside, so any centre loss (DACL's sparse one in r2plus1d.py) can use it.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import Tensor, nn


class GroupedConv2d(nn.Conv2d):
    """nn.Conv2d (usually with `groups` > 1) with an efficient Opacus per-sample gradient."""


class PReLU(nn.PReLU):
    """nn.PReLU with an Opacus per-sample gradient (no functorch fallback)."""


@register_grad_sampler(GroupedConv2d)
def grouped_conv_grad_sample(layer: GroupedConv2d, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a grouped conv: for each sample and group, backprops_g @ unfold(x_g)^T."""
    x = activations[0].to(backprops.dtype)
    n, groups = x.shape[0], layer.groups
    if isinstance(layer.padding, str):
        raise ValueError("GroupedConv2d: string padding is not supported by its grad sampler; give numbers")
    # unfold2d reads its input through as_strided with NCHW strides, so it must be NCHW-contiguous.
    cols = unfold2d(x.contiguous(), kernel_size=layer.kernel_size, padding=layer.padding,
                    stride=layer.stride, dilation=layer.dilation)  # (n, C_in*kh*kw, q), rows channel-major
    q = cols.shape[-1]
    cols = cols.view(n, groups, -1, q)
    grads = backprops.reshape(n, groups, layer.out_channels // groups, q)
    ret: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.einsum("ngoq,ngpq->ngop", grads, cols).reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(dim=2)
    return ret


@register_grad_sampler(PReLU)
def prelu_grad_sample(layer: PReLU, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """d out / d slope = min(x, 0) per element; the slope is per channel (dim 1) or a single one."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    contrib = backprops * x.clamp(max=0)
    if not layer.weight.requires_grad:
        return {}
    if layer.num_parameters == 1:
        return {layer.weight: contrib.reshape(n, -1).sum(dim=1, keepdim=True)}
    return {layer.weight: contrib.reshape(n, layer.num_parameters, -1).sum(dim=2)}


class Scale(nn.Module):
    """y = gamma * x with one learnable scalar gamma (initialised to `init`)."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x


class CentreOffsets(nn.Module):
    """Learnable class centres c (K, D); forward(f: (B, D)) -> f - c_k for every k, shape (B, K, D).

    Centres start as DACL's (kaiming-normal over the feature dimension)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.kaiming_normal_(self.centres)

    def forward(self, features: Tensor) -> Tensor:
        return features.unsqueeze(1) - self.centres.unsqueeze(0)


@register_grad_sampler(Scale)
def scale_grad_sample(layer: Scale, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """d y / d gamma = x, so the per-sample gradient is sum over every non-batch position of grad_out * x."""
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    return {layer.weight: (backprops * x).reshape(x.shape[0], -1).sum(dim=1, keepdim=True)}


@register_grad_sampler(CentreOffsets)
def centre_offsets_grad_sample(layer: CentreOffsets, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """d (f - c_k) / d c_k = -1: each sample's centre gradient is minus its gradient of the offsets."""
    if not layer.centres.requires_grad:
        return {}
    return {layer.centres: -backprops}
