"""HAFNet (seed paper 000) = DAN's structure (yaoing/DAN networks/dan.py), made trainable under DP-SGD.

Parts and where they come from (DAN: Wen et al., arXiv 2109.07270; code yaoing/DAN networks/dan.py):

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
3. DAN's final BatchNorm1d(num_class) on the logits is replaced by a LayerNorm on the fused vector
   before the classifier (Opacus' fixer would make the BatchNorm1d a degenerate GroupNorm). Some
   normalisation is needed there: the fused vector is a sum of N log-softmax outputs, about -N log N in
   every channel, and without it the initial logits have std ~4 and cross-entropy ~6 instead of log 7.
   The classifier starts at zero (uniform predictions), a common choice for DP-SGD from scratch.
4. The partition loss is written per sample: log(1 + N / (mean_c var_heads(h_i) + eps)) for sample i.
   DAN averages the variance over the batch first, which couples samples: a sample's gradient would
   then depend on the other samples in the batch, breaking DP-SGD's per-sample sensitivity bound.
5. DAN's AffinityLoss defaults to 8 centres even for 7 classes; here there is one centre per class.
6. No in-place ops (DAN's channel unit uses ReLU(inplace=True)).

Not a departure but an implementation choice: the N heads are computed side by side as grouped layers
(`AttentionHeads`), the same arithmetic as N separate heads with N-fold fewer Opacus hooks; a DAN
checkpoint's `cat_head{i}` tensors are stacked into them on load (`convert_checkpoint`).
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from shared_models.models.backbones.norm import group_norm
from shared_models.models.backbones.resnet import ResNet18
from shared_models.models.dp_layers import GroupedConv2d
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


def _group_norm_per_head(channels: int, heads: int) -> nn.GroupNorm:
    """Per-head `group_norm(channels)` for `heads` heads stacked along the channel axis: the groups never
    straddle two heads, so this is exactly one GroupNorm per head."""
    return nn.GroupNorm(group_norm(channels).num_groups * heads, channels * heads)


class SpatialAttention(nn.Module):
    """DAN's spatial unit for N heads at once: 1x1 reduce, 3x3 + 1x3 + 3x1 expand (summed), ReLU,
    channel sum per head -> (B, N, h, w) maps (no sigmoid, as DAN)."""

    def __init__(self, channels: int, heads: int, reduction: int = 2) -> None:
        super().__init__()
        mid = channels // reduction
        self.heads = heads
        # One input feeds every head, so N 1x1 convs are one conv with N*mid outputs.
        self.conv1x1 = nn.Sequential(nn.Conv2d(channels, heads * mid, 1), _group_norm_per_head(mid, heads))
        self.conv_3x3 = nn.Sequential(GroupedConv2d(heads * mid, heads * channels, 3, padding=1, groups=heads),
                                      _group_norm_per_head(channels, heads))
        self.conv_1x3 = nn.Sequential(GroupedConv2d(heads * mid, heads * channels, (1, 3), padding=(0, 1), groups=heads),
                                      _group_norm_per_head(channels, heads))
        self.conv_3x1 = nn.Sequential(GroupedConv2d(heads * mid, heads * channels, (3, 1), padding=(1, 0), groups=heads),
                                      _group_norm_per_head(channels, heads))
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1x1(x)
        y = self.relu(self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y))  # (B, N*C, h, w)
        b, _, h, w = y.shape
        return y.view(b, self.heads, -1, h, w).sum(dim=2)  # (B, N, h, w)


class ChannelAttention(nn.Module):
    """DAN's channel unit for N heads at once on the pooled vectors (B, N, C) -> (B, N, C).

    Per head: Linear(C, hidden) -> LayerNorm(hidden) -> ReLU -> Linear(hidden, C) -> sigmoid, scaling the
    pooled vector. The N Linears are grouped 1x1 convs and the N LayerNorms one GroupNorm with N groups
    (LayerNorm over a head's `hidden` values == GroupNorm over that head's group of a 1x1 map).
    LayerNorm stands where DAN has BatchNorm1d (see module doc).
    """

    def __init__(self, channels: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            GroupedConv2d(heads * channels, heads * hidden, 1, groups=heads),
            nn.GroupNorm(heads, heads * hidden),
            nn.ReLU(inplace=False),
            GroupedConv2d(heads * hidden, heads * channels, 1, groups=heads),
            nn.Sigmoid(),
        )

    def forward(self, pooled: Tensor) -> Tensor:
        b, n, c = pooled.shape
        weights = self.attention(pooled.reshape(b, n * c, 1, 1)).view(b, n, c)
        return pooled * weights


class AttentionHeads(nn.Module):
    """MAN: N cross-attention heads (spatial unit then channel unit), computed side by side.

    The arithmetic is that of N separate DAN `CrossAttentionHead`s; stacking them as grouped layers
    makes one Opacus hook per layer instead of N (see `dp_layers`). Returns (B, N, C).
    Initialisation is DAN's, per head: kaiming-normal (fan_out of one head) convs with zero bias,
    unit/zero norms, N(0, 0.001) weights in the channel unit.
    """

    def __init__(self, channels: int, heads: int, hidden: int, sa_reduction: int = 2) -> None:
        super().__init__()
        self.num_heads = heads
        self.sa = SpatialAttention(channels, heads, sa_reduction)
        self.ca = ChannelAttention(channels, heads, hidden)
        for m in self.sa.modules():
            if isinstance(m, nn.Conv2d):
                per_head_fan_out = m.out_channels // m.groups if isinstance(m, GroupedConv2d) else m.out_channels // heads
                std = (2.0 / (per_head_fan_out * m.kernel_size[0] * m.kernel_size[1])) ** 0.5
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        for m in self.ca.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        maps = self.sa(x)  # (B, N, h, w)
        # GAP(x * map_n) for every head n, without materialising the (B, N, C, h, w) product.
        pooled = torch.einsum("bchw,bnhw->bnc", x, maps) / (x.shape[2] * x.shape[3])
        return self.ca(pooled)


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
        self.heads = AttentionHeads(channels, num_heads, ca_hidden, sa_reduction)
        self.fused_norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> FEROutput:
        features = self.backbone(x)
        pooled = features.mean(dim=(2, 3))  # FCN feature: GAP of the backbone map
        centre_distance = self.clustering(pooled)
        heads = self.heads(features)  # (B, N, C)
        if self.num_heads > 1:
            heads = F.log_softmax(heads, dim=1)
        logits = self.fc(self.fused_norm(heads.sum(dim=1)))
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
        """Key-prefix rewrites tried by `load_pretrained`: DAN checkpoints (`features.N` = the ResNet
        children) and bare torchvision / MS-Celeb ResNet-18 checkpoints (`conv1`, `layer1`, ...)."""
        aliases = [(f"features.{i}.", f"backbone.{name}.") for i, name in
                   ((0, "conv1"), (1, "bn1"), (4, "layer1"), (5, "layer2"), (6, "layer3"), (7, "layer4"))]
        return aliases + [("", "backbone.")]

    def convert_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stack DAN's per-head tensors `cat_head{i}.<key>` (i < N) into this model's `heads.<key>`.

        The stacked layers hold head i's rows at block i (see `AttentionHeads`), so concatenating along
        dim 0 and reshaping (a DAN Linear becomes a 1x1 conv) gives the same heads. Heads beyond N and
        incomplete sets are left alone (reported as unused by `load_pretrained`).
        """
        out = dict(state)
        own = self.state_dict()
        rests = {k.split(".", 1)[1] for k in state if k.startswith("cat_head0.")}
        for rest in rests:
            parts = [state.get(f"cat_head{i}.{rest}") for i in range(self.num_heads)]
            target = own.get(f"heads.{rest}")
            if target is None or any(p is None for p in parts):
                continue
            stacked = torch.cat([p.reshape(p.shape[0], -1) if p.ndim > 1 else p for p in parts], dim=0)
            if stacked.numel() != target.numel():
                continue
            out[f"heads.{rest}"] = stacked.reshape(target.shape)
            for i in range(self.num_heads):
                del out[f"cat_head{i}.{rest}"]
        return out


@register_grad_sampler(ClassCentres)
def class_centres_grad_sample(layer: ClassCentres, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient of the centres in closed form (Opacus would replay the layer under functorch).

    out_ik = clamp(||f_i - c_k||^2) / s with s = sum_d Var_k(c_kd) (unbiased), so with b = d loss / d out:
    grad_i[k] = -2 b_ik [raw_ik within the clamp] (f_i - c_k) / s - (sum_j b_ij out_ij / s) * 2 (c_k - mean_k c) / (K - 1).
    tests/test_models_dp.py checks it against autograd one sample at a time.
    """
    if not layer.centres.requires_grad:
        return {}
    features = activations[0].to(backprops.dtype)
    centres = layer.centres.to(backprops.dtype)
    diff = features.unsqueeze(1) - centres.unsqueeze(0)  # (B, K, D)
    raw = diff.pow(2).sum(dim=-1)
    within = ((raw >= 1e-12) & (raw <= 1e12)).to(backprops.dtype)  # clamp passes the gradient inside its range
    spread = centres.var(dim=0).sum()
    out = raw.clamp(1e-12, 1e12) / spread
    direct = (-2.0 / spread) * (backprops * within).unsqueeze(-1) * diff
    through_spread = (backprops * out).sum(dim=1) / spread  # (B,)
    d_spread = 2.0 * (centres - centres.mean(dim=0)) / (centres.shape[0] - 1)  # (K, D)
    return {layer.centres: direct - through_spread.view(-1, 1, 1) * d_spread.unsqueeze(0)}
