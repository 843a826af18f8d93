"""IR-50 (ArcFace "improved residual" backbone, face.evoLVe / POSTER layout) for DP training.

The four stages return their maps L1..L4, which SFER-MDFAE aggregates at every scale. Names follow
face.evoLVe (`input_layer.0/1/2`, `body.N.res_layer.K`, `body.N.shortcut_layer`) so an `ir50.pth`
checkpoint loads name-matched. Changes for Opacus, made by hand:

- BatchNorm2d -> GroupNorm (`norm.group_norm`); same parameter count, no running statistics.
- PReLU has no Opacus grad sampler (Opacus would fall back to functorch, slow on full-resolution
  maps); `dp_layers.PReLU` is nn.PReLU with a registered one-einsum sampler.
- `res + shortcut` is already out-of-place in the original unit; kept.

At 112x112 with widths 64..512 and units (3, 4, 14, 3) the stage maps are 56, 28, 14 and 7 px and the
body has 30,727,360 parameters (the `output_layer` head of face.evoLVe is not used by SFER-MDFAE).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from shared_models.models.backbones.norm import group_norm
from shared_models.models.dp_layers import PReLU


class BottleneckIR(nn.Module):
    """GN -> 3x3 conv -> PReLU -> 3x3 conv (stride) -> GN, plus a max-pool(1)/1x1-conv shortcut."""

    def __init__(self, in_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)  # plain subsampling
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                group_norm(depth),
            )
        self.res_layer = nn.Sequential(
            group_norm(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            group_norm(depth),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IR50(nn.Module):
    """IR backbone returning the four stage maps [L1, L2, L3, L4].

    `stem_stride` is the stride of the 3x3 input conv (1 in the original; every stage then halves).
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 512),
        units: Sequence[int] = (3, 4, 14, 3),
        stem_stride: int = 1,
        stage_strides: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(units) != 4 or len(stage_strides) != 4:
            raise ValueError("IR50: widths, units and stage_strides need 4 entries (one per stage)")
        if min(units) < 1:
            raise ValueError(f"IR50: every stage needs at least one unit, got {tuple(units)}")
        self.widths = tuple(int(w) for w in widths)
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stem_stride, 1, bias=False),
            group_norm(widths[0]),
            PReLU(widths[0]),
        )
        modules: list[nn.Module] = []
        ends: list[int] = []
        in_channels = widths[0]
        for depth, count, stride in zip(widths, units, stage_strides):
            modules.append(BottleneckIR(in_channels, depth, stride))
            modules += [BottleneckIR(depth, depth, 1) for _ in range(count - 1)]
            in_channels = depth
            ends.append(len(modules))
        self.body = nn.Sequential(*modules)
        self._stage_ends = tuple(ends)
        self.reduction = stem_stride
        for s in stage_strides:
            self.reduction *= s

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.input_layer(x)
        stages: list[Tensor] = []
        start = 0
        for end in self._stage_ends:
            for unit in self.body[start:end]:
                x = unit(x)
            stages.append(x)
            start = end
        return stages
