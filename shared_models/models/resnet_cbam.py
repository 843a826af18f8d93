"""ResNet-50 + CBAM with the average-pool down-sampling shortcut (seed paper 001, Aly et al., IEEE Access
2023), made trainable under DP-SGD.

What the paper specifies and where each part comes from:

- **Backbone**: ResNet-50 (torchvision's `Bottleneck`, [3, 4, 6, 3] blocks, stride on the 3x3 conv).
  The block here *is* torchvision's `Bottleneck` (subclassed: same construction, parameter names and
  widths); only its forward changes (below).
- **CBAM in every bottleneck** ("CBAM-Bottleneck", the paper's Fig. 4/5): channel attention, then
  spatial attention (Woo et al. 2018; reference code Jongchan/attention-module MODELS/cbam.py): a shared
  MLP C -> C/16 -> C on the global average- and max-pooled vectors, summed, sigmoid; then a 7x7 conv on
  [max_c, mean_c], sigmoid. As in the reference ResNet+CBAM it acts on the block's residual branch after
  the last norm and before the addition.
- **Modified down-sampling** (the paper's section III.A.2): the shortcut of a down-sampling block is a
  2x2 average pool with stride 2 followed by a stride-1 1x1 conv, instead of a stride-2 1x1 conv that
  ignores 3/4 of the input. This is ResNet-D's shortcut (He et al., "Bag of tricks", 2019; timm's
  `avg_down`); a block that keeps the resolution (layer1's 64 -> 256 projection) keeps the plain 1x1.
- **Head**: global average pool and a linear classifier.

Departures, all for differential privacy:

1. BatchNorm2d -> GroupNorm (`backbones.norm.group_norm`, same affine parameter count).
2. CBAM's spatial gate has BatchNorm2d(1) after its 7x7 conv. At inference that is an affine map of the
   one-channel logit map, so here the conv carries a bias instead (the scale folds into the conv
   weights): one parameter instead of two. Opacus' fixer would make it GroupNorm(1, 1), which
   standardises each sample's map over H x W and changes what the gate computes.
3. No in-place ops: torchvision's `out += identity` and `ReLU(inplace=True)` break Opacus' backward hooks.
4. A LayerNorm on the pooled feature before the classifier (as HAFNet's `fused_norm`). Without
   BatchNorm the pooled features of a freshly initialised GroupNorm network barely differ between
   images (across-sample spread 11-17 % of their size at the cpu/dp presets, measured on synthetic
   faces), and training sat at chance for several epochs before the classifier found the differences.
5. The classifier starts at zero (uniform predictions), as HAFNet's (a common choice for DP from scratch).

The paper gives no parameter or MAC count; the reference is torchvision's ResNet-50 (25.56 M parameters
with its 1000-class head, 23.51 M without, 4.09 GMACs at 224 px) plus CBAM's additions. The `paper`
preset has the same backbone parameter count as torchvision's ResNet-50 (tests/test_models_complexity.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

from shared_models.models.backbones.norm import group_norm
from shared_models.output import FEROutput


class ChannelGate(nn.Module):
    """CBAM channel attention: sigmoid(MLP(avgpool x) + MLP(maxpool x)) scales the channels.

    The two pooled vectors go through the shared MLP as one (B, 2, C) tensor: the same arithmetic as two
    calls, one Opacus hook per Linear."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(2, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.stack((x.mean(dim=(2, 3)), x.amax(dim=(2, 3))), dim=1)  # (B, 2, C)
        weights = torch.sigmoid(self.mlp(pooled).sum(dim=1))
        return x * weights[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM spatial attention: sigmoid(conv7x7([max_c x, mean_c x])) scales the positions.
    The conv has a bias where the reference has BatchNorm2d(1) (module doc, departure 2)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel gate, then spatial gate (Woo et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))


class CBAMBottleneck(TorchvisionBottleneck):
    """torchvision's Bottleneck (GroupNorm, non-in-place) with CBAM on the residual branch before the add."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 reduction: int = 16) -> None:
        super().__init__(inplanes, planes, stride, downsample, norm_layer=group_norm)
        self.relu = nn.ReLU(inplace=False)
        self.cbam = CBAM(planes * self.expansion, reduction)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.cbam(self.bn3(self.conv3(out)))
        return self.relu(out + identity)  # not `+=`: a hooked output must not change in place


def avg_down_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """The paper's down-sampling shortcut: 2x2 average pool (stride 2) before a stride-1 1x1 conv; a
    stride-1 projection keeps the plain 1x1 conv (no pool), as ResNet-D / timm's avg_down."""
    pool: nn.Module = nn.Identity()
    if stride != 1:
        pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False),
                         group_norm(out_channels))


class ResNetCBAM(nn.Module):
    """ResNet-50 + CBAM for DP training. forward(x) -> FEROutput(logits, {}) (cross-entropy only).

    planes: the bottleneck widths per stage (outputs are 4x); blocks: bottlenecks per stage.
    stem="imagenet": 7x7 stride-2 conv + 3x3 stride-2 max-pool (torchvision); stem="small": 3x3 stride-2
    conv without pool, for 48-64 px faces (as HAFNet's cpu preset).
    """

    loss_names = ("ce",)

    def __init__(
        self,
        num_classes: int = 7,
        *,
        input_size: int = 224,
        planes: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (3, 4, 6, 3),
        stem: str = "imagenet",
        strides: Sequence[int] = (1, 2, 2, 2),
        stem_width: int = 64,
        cbam_reduction: int = 16,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ResNetCBAM: num_classes must be >= 2, got {num_classes}")
        if len(planes) != 4 or len(blocks) != 4 or len(strides) != 4 or min(blocks) < 1:
            raise ValueError("ResNetCBAM: planes, blocks and strides need 4 entries, every stage >= 1 block")
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.backbone = _Backbone(planes, blocks, stem, strides, stem_width, cbam_reduction)
        self.feature_norm = nn.LayerNorm(self.backbone.out_channels)
        self.fc = nn.Linear(self.backbone.out_channels, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> FEROutput:
        return FEROutput(self.fc(self.feature_norm(self.backbone(x).mean(dim=(2, 3)))), {})

    def loss_terms(self, out: FEROutput, y: Tensor) -> dict[str, Tensor]:
        """Unweighted per-sample loss terms, each (B,): the paper trains with cross-entropy alone."""
        return {"ce": F.cross_entropy(out.logits, y, reduction="none")}

    def per_sample_loss(self, out: FEROutput, y: Tensor) -> Tensor:
        return self.loss_terms(out, y)["ce"]

    @staticmethod
    def pretrained_aliases() -> list[tuple[str, str]]:
        """A bare torchvision ResNet-50 checkpoint (`conv1`, `layer1`, ...) loads into the backbone; its
        shortcut conv sits at `downsample.0` where this one has the pool, so those stay unmatched."""
        return [("", "backbone.")]


class _Backbone(nn.Module):
    """Stem + four stages of CBAM bottlenecks (torchvision names `conv1`, `bn1`, `layerN`)."""

    def __init__(self, planes: Sequence[int], blocks: Sequence[int], stem: str, strides: Sequence[int],
                 stem_width: int, reduction: int) -> None:
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "small":
            self.conv1 = nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"ResNetCBAM: unknown stem {stem!r} (use 'imagenet' or 'small')")
        self.bn1 = group_norm(stem_width)
        self.relu = nn.ReLU(inplace=False)
        inplanes = stem_width
        for i, (width, count, stride) in enumerate(zip(planes, blocks, strides), start=1):
            out = width * CBAMBottleneck.expansion
            down = avg_down_shortcut(inplanes, out, stride) if stride != 1 or inplanes != out else None
            layer = [CBAMBottleneck(inplanes, width, stride, down, reduction)]
            layer += [CBAMBottleneck(out, width, 1, None, reduction) for _ in range(count - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
            inplanes = out
        self.out_channels = inplanes
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d) and m.out_channels > 1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
