"""ResNet-18 that Opacus can train: torchvision's layout and parameter names, DP-safe internals.

Why not torchvision's `resnet18` plus `ModuleValidator.fix`? Its BasicBlock does `out += identity`
and uses `ReLU(inplace=True)`, both of which break Opacus' backward hooks ("Output 0 of
BackwardHookFunction is a view and is being modified inplace"), and the fixer's GroupNorm choice
degenerates on narrow layers. So the block is written here with:

- GroupNorm (see `norm.group_norm`) where torchvision has BatchNorm2d; the modules keep the names
  `bn1`, `bn2`, `downsample.1` so a torchvision/MS-Celeb ResNet-18 checkpoint loads name-matched
  (weight and bias map onto GroupNorm's affine parameters; running statistics have nowhere to go);
- `out = out + identity` and non-in-place ReLUs.

Widths, stem and stage strides are parameters so the `cpu` preset can shrink the network for 48-64 px
faces while the `paper` preset is exactly ResNet-18 (11,176,512 parameters without `fc`).
"""

from __future__ import annotations

from typing import Sequence

from math import prod

from torch import Tensor, nn

from shared_models.models.backbones.norm import group_norm


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; torchvision's BasicBlock without in-place ops."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = group_norm(channels)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = group_norm(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                group_norm(channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity  # not `+=`: the GroupNorm output is a hooked view under Opacus
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18 feature extractor (no avgpool/fc): (B, 3, S, S) -> (B, widths[-1], S/r, S/r).

    stem="imagenet": 7x7 stride-2 conv + 3x3 stride-2 max-pool (torchvision; reduction 4).
    stem="small":    3x3 stride-2 conv, no pool (reduction 2) for small faces, where the 7x7 conv and
                     the pool would throw away most of a 48-64 px image before the first block.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        stem: str = "imagenet",
        strides: Sequence[int] = (1, 2, 2, 2),
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4 or len(strides) != 4:
            raise ValueError("ResNet18: widths, blocks and strides need 4 entries (one per stage)")
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "small":
            self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"ResNet18: unknown stem {stem!r} (use 'imagenet' or 'small')")
        self.bn1 = group_norm(widths[0])
        self.relu = nn.ReLU(inplace=False)
        self.out_channels = int(widths[-1])
        self.reduction = (4 if stem == "imagenet" else 2) * prod(strides)
        in_channels = widths[0]
        for i, (width, count, stride) in enumerate(zip(widths, blocks, strides), start=1):
            layer = [BasicBlock(in_channels, width, stride)]
            layer += [BasicBlock(width, width, 1) for _ in range(count - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
            in_channels = width
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's ResNet initialisation (kaiming fan_out for convs, unit/zero affine norms).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)
