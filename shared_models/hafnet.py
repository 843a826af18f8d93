"""HAFNet (seed paper 000) = DAN's structure (yaoing/DAN networks/dan.py), made trainable under DP-SGD.

Parts and where they come from (research/model-facts.md section 1):

- **Backbone**: ResNet-18 without avgpool/fc (`backbones.resnet.ResNet18`), 512x7x7 at 224 px.
- **Feature Clustering Network (FCN)**: the affinity loss pulls GAP(backbone) features towards learnable
  class centres, normalised by the spread of the centres (DAN's AffinityLoss). The centres live INSIDE
  the model as `ClassCentres`, a module that maps a feature to its squared distance from every centre:
  DP-SGD then clips and noises their gradients like any other weight (outside the model they would be
  trained on raw private features, and Opacus' optimizer would refuse them).
- **Multi-head Attention Network (MAN)**: N cross-attention heads; each is a spatial unit (1x1 conv,
  then 3x3 + 1x3 + 3x1 convs summed, ReLU, summed over channels into a 1-channel map that scales the
  input; DAN has no sigmoid here) followed by a channel unit (GAP, Linear -> norm -> ReLU -> Linear ->
  sigmoid, scaling the pooled vector).
- **Attention Fusion Network (AFN)**: log-softmax across heads (per channel), sum over heads, Linear.
- **Losses** (`loss_terms`): cross-entropy + affinity_weight * affinity + partition_weight * partition.

Deliberate departures from DAN, all for differential privacy:

1. Every BatchNorm2d -> GroupNorm (`backbones.norm.group_norm`).
2. The channel unit's BatchNorm1d(32) -> LayerNorm(hidden). Opacus' fixer would turn it into
   GroupNorm(32, 32), which outputs ~0 and blocks the gradient.
3. DAN's final BatchNorm1d(num_class) on the logits is dropped (the fixer would make it a degenerate
   GroupNorm or a logit standardisation); the classifier is the Linear alone.
4. The partition loss is written per sample: log(1 + N / (mean_c var_heads(h_i) + eps)) for sample i.
   DAN averages the variance over the batch first, which couples samples: a sample's gradient would
   then depend on the other samples in the batch, breaking DP-SGD's per-sample sensitivity bound.
5. DAN's AffinityLoss defaults to 8 centres even for 7 classes; here there is one centre per class.
6. No in-place ops (DAN's channel unit uses ReLU(inplace=True)).
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.backbones.norm import group_norm
from shared_models.backbones.resnet import ResNet18
from shared_models.output import FEROutput


class ClassCentres(nn.Module):
    """Learnable class centres; forward(f) -> (B, K) squared distances ||f_i - c_k||^2 / spread.

    spread = sum_d Var_k(c_{k,d}) (unbiased variance over the K centres, as DAN), so the loss cannot be
    lowered by shrinking all centres together. Taking a single tensor and holding no buffers is what
    lets Opacus compute its per-sample gradient (functorch fallback).
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ClassCentres: the spread of the centres needs >= 2 classes, got {num_classes}")
        self.centres = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, features: Tensor) -> Tensor:
        diff = features.unsqueeze(1) - self.centres.unsqueeze(0)  # (B, K, D)
        dist = diff.pow(2).sum(dim=-1).clamp(1e-12, 1e12)  # DAN's clamp
        spread = self.centres.var(dim=0).sum()
        return dist / spread


class SpatialAttention(nn.Module):
    """DAN's spatial unit: 1x1 reduce, 3x3 + 1x3 + 3x1 expand (summed), ReLU, channel sum, scale x."""

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        mid = channels // reduction
        self.conv1x1 = nn.Sequential(nn.Conv2d(channels, mid, 1), group_norm(mid))
        self.conv_3x3 = nn.Sequential(nn.Conv2d(mid, channels, 3, padding=1), group_norm(channels))
        self.conv_1x3 = nn.Sequential(nn.Conv2d(mid, channels, (1, 3), padding=(0, 1)), group_norm(channels))
        self.conv_3x1 = nn.Sequential(nn.Conv2d(mid, channels, (3, 1), padding=(1, 0)), group_norm(channels))
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1x1(x)
        y = self.relu(self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y))
        y = y.sum(dim=1, keepdim=True)
        return x * y


class ChannelAttention(nn.Module):
    """DAN's channel unit on the pooled vector, with LayerNorm where DAN has BatchNorm1d (see module doc)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled * self.attention(pooled)


class CrossAttentionHead(nn.Module):
    """One MAN head: spatial unit then channel unit -> (B, C). DAN's head initialisation."""

    def __init__(self, channels: int, hidden: int, sa_reduction: int = 2) -> None:
        super().__init__()
        self.sa = SpatialAttention(channels, sa_reduction)
        self.ca = ChannelAttention(channels, hidden)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.ca(self.sa(x))


def partition_per_sample(heads: Tensor) -> Tensor:
    """Per-sample partition loss from (B, N, C) head vectors: log(1 + N / (mean_c var_n + eps)).

    0 when N = 1 (nothing to partition). eps is DAN's (machine epsilon).
    """
    num_heads = heads.shape[1]
    if num_heads == 1:
        return heads.new_zeros(heads.shape[0])
    variance = heads.var(dim=1).mean(dim=1)  # unbiased over heads, mean over channels: (B,)
    return torch.log1p(num_heads / (variance + sys.float_info.epsilon))


class HAFNet(nn.Module):
    """HAFNet / DAN for DP training. forward(x) -> FEROutput(logits, aux) with
    aux = {"centre_distance": (B, K) normalised squared distances, "partition": (B,)}."""

    loss_names = ("ce", "affinity", "partition")

    def __init__(
        self,
        num_classes: int = 7,
        *,
        input_size: int = 224,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        stem: str = "imagenet",
        strides: Sequence[int] = (1, 2, 2, 2),
        num_heads: int = 4,
        ca_hidden: int = 32,
        sa_reduction: int = 2,
        affinity_weight: float = 1.0,
        partition_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"HAFNet: num_classes must be >= 2, got {num_classes}")
        if num_heads < 1:
            raise ValueError(f"HAFNet: num_heads must be >= 1, got {num_heads}")
        if affinity_weight < 0 or partition_weight < 0:
            raise ValueError("HAFNet: loss weights must be >= 0")
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.num_heads = int(num_heads)
        self.affinity_weight = float(affinity_weight)
        self.partition_weight = float(partition_weight)
        self.backbone = ResNet18(widths, blocks, stem, strides)
        channels = self.backbone.out_channels
        self.clustering = ClassCentres(num_classes, channels)
        self.heads = nn.ModuleList(CrossAttentionHead(channels, ca_hidden, sa_reduction) for _ in range(num_heads))
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> FEROutput:
        features = self.backbone(x)
        pooled = features.mean(dim=(2, 3))  # FCN feature: GAP of the backbone map
        centre_distance = self.clustering(pooled)
        heads = torch.stack([head(features) for head in self.heads], dim=1)  # (B, N, C)
        if self.num_heads > 1:
            heads = F.log_softmax(heads, dim=1)
        logits = self.fc(heads.sum(dim=1))
        return FEROutput(logits, {"centre_distance": centre_distance, "partition": partition_per_sample(heads)})

    def loss_terms(self, out: FEROutput, y: Tensor) -> dict[str, Tensor]:
        """Unweighted per-sample loss terms, each (B,)."""
        return {
            "ce": F.cross_entropy(out.logits, y, reduction="none"),
            "affinity": out.aux["centre_distance"].gather(1, y.unsqueeze(1)).squeeze(1),
            "partition": out.aux["partition"],
        }

    def per_sample_loss(self, out: FEROutput, y: Tensor) -> Tensor:
        """CE + affinity_weight * affinity + partition_weight * partition, per sample (B,)."""
        terms = self.loss_terms(out, y)
        return terms["ce"] + self.affinity_weight * terms["affinity"] + self.partition_weight * terms["partition"]

    @staticmethod
    def pretrained_aliases() -> list[tuple[str, str]]:
        """Key-prefix rewrites tried by `load_pretrained`: DAN checkpoints (`features.N`, `cat_headI`)
        and bare torchvision / MS-Celeb ResNet-18 checkpoints (`conv1`, `layer1`, ...)."""
        aliases = [(f"features.{i}.", f"backbone.{name}.") for i, name in
                   ((0, "conv1"), (1, "bn1"), (4, "layer1"), (5, "layer2"), (6, "layer3"), (7, "layer4"))]
        aliases += [(f"cat_head{i}.", f"heads.{i}.") for i in range(16)]
        aliases += [("", "backbone.")]
        return aliases
