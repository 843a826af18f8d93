"""R(2+1)D-18 + spatio-temporal attention + sparse (attentive) centre loss (seed paper 003, Singh et al.,
"Facial expression recognition in video using 3D-CNN deep features discrimination"), for DP training.

Input: a clip (B, 3, T, S, S) in [-1, 1] (T = 16, S = 112 in the paper). Parts:

- **Encoder**: R(2+1)D-18 as torchvision builds it (torchvision.models.video.resnet): the (2+1)D stem
  (1x7x7 conv to 45 channels, 3x1x1 conv to 64), four stages of two `BasicBlock`s whose convs are
  `Conv2Plus1D` (1x3x3 spatial conv to `midplanes`, 3x1x1 temporal conv), 1x1x1 stride-s shortcuts (time
  is down-sampled too). The blocks and (2+1)D convs here are torchvision's classes, with their
  BatchNorm3d replaced by GroupNorm and their in-place ops removed (below).
- **Spatio-temporal attention** on the encoder output f (the paper's eqs. 1-3): Q, K = 1x1x1 convs to
  C/8 channels ("eight times compression"), V = 1x1x1 conv to C; spatial attention per frame over its
  H'xW' positions, temporal attention per position over the D frames, p(f) = f + gamma (s(f) + d(f)),
  gamma a learnable scalar initialised to 0 (as SAGAN; the paper names gamma but no initial value).
- **Heads** (the paper's section 3.2, DACL = Farzaneh & Qi, WACV 2021): the attended map is
  average-pooled and layer-normalised to the deep feature f_p (C values); the classifier is a linear layer on f_p; DACL's
  attention network FC1-FC3 (C -> C/2 -> C/4 -> C/8, with norm and ReLU, Tanh last) and a linear layer to
  2C logits, a softmax over each pair, gives the attention weights w in (0, 1)^C.
- **Loss**: cross-entropy + centre_weight * sparse centre loss, per sample
  L_SCL,i = 1/2 sum_d w_id (f_p,id - c_{y_i,d})^2, DACL's L_DACL before its mean over the batch.

Departures, all for differential privacy (or stated as choices where the paper is silent):

1. BatchNorm3d -> GroupNorm (`backbones.norm.group_norm`), BatchNorm1d in DACL's attention network ->
   LayerNorm (Opacus' fixer would make its BatchNorm1d(64) a degenerate GroupNorm(32, 64)).
2. The class centres are a module inside the model (`CentreOffsets`) trained by the same DP optimizer.
   DACL updates them with their own non-private SGD (rate alpha, gradient divided by 1 + class count),
   which would train them on raw private features. Here they get the loss' autograd gradient, clipped
   and noised with everything else.
3. DACL's attention network reads the flattened last map (512x7x7 in DACL: a 25088 -> 3584 layer). On
   R(2+1)D's 512x2x7x7 map that layer alone would hold 180 M parameters, six times the encoder, so here it
   reads the pooled feature f_p (C values), with DACL's taper ending at 64 hidden units.
4. The paper's text says "256 attention weights" while its pooled feature has 512 channels; here there
   is one weight per feature element, as DACL defines the sparse centre loss.
5. The loss weight: the paper writes L = L_SCL + L_CE; DACL (which it cites for the loss) releases
   lambda = 0.01, used here as the default `centre_weight`; `model.aux_loss_weight` scales it.
6. No in-place ops; the classifier starts at zero.
7. The LayerNorm in f_p (as HAFNet's `fused_norm`): without BatchNorm the pooled features of a freshly
   initialised GroupNorm network barely differ between clips (across-sample spread 14 % of their size
   at the dp preset on synthetic clips) and training sat at chance for three epochs; with it, it
   leaves chance in the first or second.

Per-sample gradients: gamma and the centres are bare parameters Opacus has no sampler for; each sits in
a one-parameter module (`Scale`, `CentreOffsets`) with a sampler registered in `dp_layers`, so no
functorch fallback is needed.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.video.resnet import BasicBlock as TorchvisionBasicBlock
from torchvision.models.video.resnet import Conv2Plus1D

from shared_models.models.backbones.norm import group_norm
from shared_models.models.dp_layers import CentreOffsets, Scale
from shared_models.output import FEROutput


def _dp_safe(sequence: nn.Sequential) -> nn.Sequential:
    """Replace torchvision's BatchNorm3d by GroupNorm and in-place ReLUs by plain ones, in place."""
    for i, m in enumerate(sequence):
        if isinstance(m, nn.BatchNorm3d):
            sequence[i] = group_norm(m.num_features)
        elif isinstance(m, nn.ReLU):
            sequence[i] = nn.ReLU(inplace=False)
        elif isinstance(m, nn.Sequential):
            _dp_safe(m)
    return sequence


class BasicBlock(TorchvisionBasicBlock):
    """torchvision's video BasicBlock with Conv2Plus1D, GroupNorm and an out-of-place residual add."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__(inplanes, planes, Conv2Plus1D, stride, downsample)
        _dp_safe(self.conv1)
        _dp_safe(self.conv2)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class R2Plus1D18(nn.Module):
    """R(2+1)D-18 encoder (no pool/fc): (B, 3, T, S, S) -> (B, widths[-1], T', S', S').

    With the defaults this is torchvision's `r2plus1d_18` without its head: same modules, same parameter
    count. `stem_width` 45 is torchvision's (2+1)D stem middle width for 64 output channels; the small
    presets scale it with widths[0]. `stem_kernel` / `stem_stride` are the stem's spatial conv.
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), blocks: Sequence[int] = (2, 2, 2, 2),
                 strides: Sequence[int] = (1, 2, 2, 2), stem_width: int = 45, stem_kernel: int = 7,
                 stem_stride: int = 2) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4 or len(strides) != 4 or min(blocks) < 1:
            raise ValueError("R2Plus1D18: widths, blocks and strides need 4 entries, every stage >= 1 block")
        self.stem = _dp_safe(nn.Sequential(
            nn.Conv3d(3, stem_width, (1, stem_kernel, stem_kernel), stride=(1, stem_stride, stem_stride),
                      padding=(0, stem_kernel // 2, stem_kernel // 2), bias=False),
            nn.BatchNorm3d(stem_width), nn.ReLU(),
            nn.Conv3d(stem_width, widths[0], (3, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(widths[0]), nn.ReLU(),
        ))
        inplanes = widths[0]
        for i, (width, count, stride) in enumerate(zip(widths, blocks, strides), start=1):
            down = None
            if stride != 1 or inplanes != width:
                down = _dp_safe(nn.Sequential(nn.Conv3d(inplanes, width, 1, stride=stride, bias=False),
                                              nn.BatchNorm3d(width)))
            layer = [BasicBlock(inplanes, width, stride, down)] + [BasicBlock(width, width) for _ in range(count - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
            inplanes = width
        self.out_channels = inplanes
        for m in self.modules():  # torchvision's VideoResNet initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SpatioTemporalAttention(nn.Module):
    """p(f) = f + gamma (s(f) + d(f)): s attends over the H'W' positions of each frame, d over the D frames
    at each position; Q, K: 1x1x1 convs to C/compression channels, V: 1x1x1 conv to C (shared by both)."""

    def __init__(self, channels: int, compression: int = 8) -> None:
        super().__init__()
        inner = max(1, channels // compression)
        self.query = nn.Conv3d(channels, inner, 1)
        self.key = nn.Conv3d(channels, inner, 1)
        self.value = nn.Conv3d(channels, channels, 1)
        self.gamma = Scale()  # learnable gamma, 0 at the start: the block begins as the identity

    def forward(self, f: Tensor) -> Tensor:
        b, c, d, h, w = f.shape
        q, k, v = self.query(f), self.key(f), self.value(f)
        # spatial: per frame, positions attend to positions -> (B, D, HW, .)
        qs, ks, vs = (t.permute(0, 2, 3, 4, 1).reshape(b, d, h * w, -1) for t in (q, k, v))
        s = torch.softmax(qs @ ks.transpose(-1, -2), dim=-1) @ vs
        s = s.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)
        # temporal: per position, frames attend to frames -> (B, HW, D, .)
        qd, kd, vd = (t.permute(0, 3, 4, 2, 1).reshape(b, h * w, d, -1) for t in (q, k, v))
        t_ = torch.softmax(qd @ kd.transpose(-1, -2), dim=-1) @ vd
        t_ = t_.reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)
        return f + self.gamma(s + t_)


class FeatureAttention(nn.Module):
    """DACL's attention network on the pooled feature: FC1-FC3 (norm, ReLU; Tanh last), then 2C logits and
    a softmax over each pair; returns w in (0, 1)^C (the second entry of each pair, as DACL)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        sizes = [channels, max(2, channels // 2), max(2, channels // 4), max(2, channels // 8)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.Tanh() if i == 2 else nn.ReLU(inplace=False)]
        self.fcs = nn.Sequential(*layers)
        self.heads = nn.Linear(sizes[-1], 2 * channels)

    def forward(self, pooled: Tensor) -> Tensor:
        logits = self.heads(self.fcs(pooled)).view(pooled.shape[0], -1, 2)
        return torch.softmax(logits, dim=-1)[..., 1]


class R2Plus1DSTA(nn.Module):
    """Singh et al.'s clip model for DP training. forward(x: (B, 3, T, S, S)) -> FEROutput(logits, aux) with
    aux = {"centre_sq": (B, K) the sparse centre loss of each sample against every class centre}."""

    loss_names = ("ce", "centre")

    def __init__(
        self,
        num_classes: int = 7,
        *,
        input_size: int = 112,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        strides: Sequence[int] = (1, 2, 2, 2),
        stem_width: int = 45,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        compression: int = 8,
        centre_weight: float = 0.01,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"R2Plus1DSTA: num_classes must be >= 2, got {num_classes}")
        if centre_weight < 0:
            raise ValueError("R2Plus1DSTA: centre_weight must be >= 0")
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.centre_weight = float(centre_weight)
        self.backbone = R2Plus1D18(widths, blocks, strides, stem_width, stem_kernel, stem_stride)
        channels = self.backbone.out_channels
        self.attention = SpatioTemporalAttention(channels, compression)
        self.feature_norm = nn.LayerNorm(channels)
        self.feature_attention = FeatureAttention(channels)
        self.centres = CentreOffsets(num_classes, channels)
        self.fc = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> FEROutput:
        if x.ndim != 5:
            raise ValueError(f"R2Plus1DSTA reads clips (B, 3, T, S, S); got a tensor of shape {tuple(x.shape)}")
        pooled = self.feature_norm(self.attention(self.backbone(x)).mean(dim=(2, 3, 4)))  # f_p
        weights = self.feature_attention(pooled)  # w, (B, C)
        offsets = self.centres(pooled)  # f_p - c_k, (B, K, C)
        centre_sq = 0.5 * (weights.unsqueeze(1) * offsets.pow(2)).sum(dim=-1)
        return FEROutput(self.fc(pooled), {"centre_sq": centre_sq})

    def loss_terms(self, out: FEROutput, y: Tensor) -> dict[str, Tensor]:
        """Unweighted per-sample loss terms, each (B,): cross-entropy and the sparse centre loss."""
        return {"ce": F.cross_entropy(out.logits, y, reduction="none"),
                "centre": out.aux["centre_sq"].gather(1, y.unsqueeze(1)).squeeze(1)}

    def per_sample_loss(self, out: FEROutput, y: Tensor) -> Tensor:
        """CE + centre_weight * sparse centre loss, per sample (B,)."""
        terms = self.loss_terms(out, y)
        return terms["ce"] + self.centre_weight * terms["centre"]

    @staticmethod
    def pretrained_aliases() -> list[tuple[str, str]]:
        """A bare torchvision r2plus1d_18 checkpoint (`stem`, `layer1`, ...) loads into the encoder."""
        return [("", "backbone.")]
