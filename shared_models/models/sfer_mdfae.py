"""SFER-MDFAE (seed paper 002, Shou et al., Sensors 2024) made trainable under DP-SGD.

    x -> IR50 -> L1..L4
    MDPFA  (multi-scale dual-pooling feature aggregation): on each Li a CBAM-style channel attention
           Wi = sigmoid(MLP(maxpool(Li)) + MLP(avgpool(Li))) (one MLP shared by both pools),
           Qi = Li * Wi, Gi = GAP(Qi); F_m = concat(G1..G4)          (64+128+256+512 = 960-d)
    KROAFE (key-region-oriented attention) on L4: bi-level routing attention (BiFormer's BRA):
           m x m regions, region-level routing to the topn most related regions, token attention over
           the gathered keys/values, + LePE (depthwise k=5 conv on V), output projection;
           F_dl = GAP(R_out)                                           (512-d)
    F_t = concat(F_m, F_dl) -> Linear -> logits;  loss = cross-entropy (per sample).

Choices the paper leaves open (filled in from CBAM, Woo et al. 2018, and BiFormer, Zhu et al. 2023):
- MLP reduction ratio: CBAM's 16 (hidden width never below 4).
- Heads in the attention: head width 32 as in BiFormer (16 heads at 512 channels). The attention scale
  is head_dim^-0.5 as in the paper's Eq. (11); BiFormer's legacy code uses qk_dim^-0.5 instead.
- No residual around the attention: the paper's Eq. (14) is R_out = MHSA(...) + lepe(V).
- Routing is computed on detached region means (BiFormer's default `diff_routing=False`): the region
  choice is a hard top-k index and carries no gradient. Every op indexes within a sample, so the
  per-sample gradients Opacus computes are exact.

At the `paper` preset (112 px) L4 is 512x7x7 and m = 7, so each of the 49 regions is one token and
each token attends to the 15 tokens of its most related regions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.models.backbones.ir50 import IR50
from shared_models.models.dp_layers import GroupedConv2d
from shared_models.output import FEROutput


class ChannelAttention(nn.Module):
    """CBAM channel gate with one MLP shared by the max- and avg-pooled vectors -> weights (B, C)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        # Both pools go through the shared MLP in one call: (B, 2, C) -> (B, 2, C) -> sum.
        pooled = torch.stack([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)
        return torch.sigmoid(self.mlp(pooled).sum(dim=1))


class MultiScaleDualPooling(nn.Module):
    """MDPFA: channel attention on every stage map, GAP, concat -> (B, sum(widths))."""

    def __init__(self, widths: Sequence[int], reduction: int = 16) -> None:
        super().__init__()
        self.attention = nn.ModuleList(ChannelAttention(c, reduction) for c in widths)

    def forward(self, stages: list[Tensor]) -> Tensor:
        pooled = []
        for ca, level in zip(self.attention, stages):
            # GAP(L * W) == W * GAP(L) because W is one weight per channel; this avoids a full-size product.
            pooled.append(ca(level) * level.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


class BiLevelRoutingAttention(nn.Module):
    """BRA on an NCHW map: (B, C, H, W) -> (B, C, H, W). H and W must be multiples of `regions`."""

    def __init__(self, channels: int, regions: int = 7, topn: int = 15, num_heads: int = 16,
                 lepe_kernel: int = 5) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"BiLevelRoutingAttention: {channels} channels do not split into {num_heads} heads")
        if not 1 <= topn <= regions * regions:
            raise ValueError(f"BiLevelRoutingAttention: topn must be in 1..{regions * regions}, got {topn}")
        self.channels = channels
        self.regions = regions
        self.topn = topn
        self.num_heads = num_heads
        self.scale = (channels // num_heads) ** -0.5
        self.qkv = nn.Linear(channels, 3 * channels)
        self.wo = nn.Linear(channels, channels)
        # Depthwise: GroupedConv2d so Opacus does not compute the full channel x channel outer product.
        self.lepe = GroupedConv2d(channels, channels, lepe_kernel, padding=lepe_kernel // 2, groups=channels)

    def _to_regions(self, t: Tensor) -> Tensor:
        """(B, H, W, D) -> (B, m*m, h*w, D), region-major, row by row."""
        b, height, width, d = t.shape
        m = self.regions
        h, w = height // m, width // m
        return t.reshape(b, m, h, m, w, d).permute(0, 1, 3, 2, 4, 5).reshape(b, m * m, h * w, d)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, c, height, width = x.shape
        if c != self.channels:
            raise ValueError(f"BiLevelRoutingAttention: expected {self.channels} channels, got {c}")
        if height % self.regions or width % self.regions:
            raise ValueError(f"BiLevelRoutingAttention: a {height}x{width} map does not split into "
                             f"{self.regions}x{self.regions} regions")
        q, k, v = self.qkv(x.permute(0, 2, 3, 1)).chunk(3, dim=-1)  # each (B, H, W, C)
        return q, k, v

    def _route(self, q_regions: Tensor, k_regions: Tensor) -> Tensor:
        """Region routing on detached region means -> indices (B, m*m, topn)."""
        q_win = q_regions.detach().mean(dim=2)
        k_win = k_regions.detach().mean(dim=2)
        affinity = (q_win * self.scale) @ k_win.transpose(-1, -2)  # (B, m*m, m*m)
        return affinity.topk(self.topn, dim=-1).indices

    def routing_indices(self, x: Tensor) -> Tensor:
        """The regions each query region attends to, (B, m*m, topn); for inspection and tests."""
        q, k, _ = self._project(x)
        return self._route(self._to_regions(q), self._to_regions(k))

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        q, k, v = self._project(x)
        qr, kr, vr = self._to_regions(q), self._to_regions(k), self._to_regions(v)  # (B, P, T, C)
        idx = self._route(qr, kr)  # (B, P, n)
        regions, tokens, n, heads = qr.shape[1], qr.shape[2], self.topn, self.num_heads
        # Gather the topn regions' keys/values per query region; indices stay within each sample.
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        k_sel = kr[batch, idx]  # (B, P, n, T, C)
        v_sel = vr[batch, idx]
        dh = c // heads
        q_h = qr.reshape(b, regions, tokens, heads, dh).permute(0, 1, 3, 2, 4)  # (B, P, heads, T, dh)
        k_h = k_sel.reshape(b, regions, n * tokens, heads, dh).permute(0, 1, 3, 4, 2)  # (B, P, heads, dh, nT)
        v_h = v_sel.reshape(b, regions, n * tokens, heads, dh).permute(0, 1, 3, 2, 4)  # (B, P, heads, nT, dh)
        attn = torch.softmax((q_h * self.scale) @ k_h, dim=-1)
        out = (attn @ v_h).permute(0, 1, 3, 2, 4).reshape(b, regions, tokens, c)  # (B, P, T, C)
        m = self.regions
        h, w = height // m, width // m
        out = out.reshape(b, m, m, h, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)
        # .contiguous(): Opacus' conv grad sampler unfolds its input with as_strided assuming NCHW
        # strides; a channels-last view here silently gives wrong (zero) per-sample gradients.
        lepe = self.lepe(v.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)  # depthwise conv on V
        return self.wo(out + lepe).permute(0, 3, 1, 2)


class SFERMDFAE(nn.Module):
    """SFER-MDFAE for DP training. forward(x) -> FEROutput(logits, aux={})."""

    loss_names = ("ce",)

    def __init__(
        self,
        num_classes: int = 7,
        *,
        input_size: int = 112,
        widths: Sequence[int] = (64, 128, 256, 512),
        units: Sequence[int] = (3, 4, 14, 3),
        stem_stride: int = 1,
        stage_strides: Sequence[int] = (2, 2, 2, 2),
        regions: int = 7,
        topn: int = 15,
        head_dim: int = 32,
        lepe_kernel: int = 5,
        mlp_reduction: int = 16,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"SFERMDFAE: num_classes must be >= 2, got {num_classes}")
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.backbone = IR50(widths, units, stem_stride, stage_strides)
        l4_side = self.input_size // self.backbone.reduction
        if self.input_size % self.backbone.reduction or l4_side % regions:
            raise ValueError(f"SFERMDFAE: input {input_size} gives an L4 map of {l4_side} px, "
                             f"which does not split into {regions}x{regions} regions")
        self.mdpfa = MultiScaleDualPooling(widths, mlp_reduction)
        c4 = int(widths[-1])
        self.kroafe = BiLevelRoutingAttention(c4, regions, topn, max(c4 // head_dim, 1), lepe_kernel)
        self.fc = nn.Linear(sum(int(w) for w in widths) + c4, num_classes)

    def forward(self, x: Tensor) -> FEROutput:
        stages = self.backbone(x)
        f_m = self.mdpfa(stages)
        f_dl = self.kroafe(stages[-1]).mean(dim=(2, 3))
        return FEROutput(self.fc(torch.cat([f_m, f_dl], dim=1)), {})

    def loss_terms(self, out: FEROutput, y: Tensor) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(out.logits, y, reduction="none")}

    def per_sample_loss(self, out: FEROutput, y: Tensor) -> Tensor:
        return self.loss_terms(out, y)["ce"]

    @staticmethod
    def pretrained_aliases() -> list[tuple[str, str]]:
        """A bare face.evoLVe / POSTER `ir50.pth` has `input_layer.*` and `body.*` at the top level."""
        return [("", "backbone.")]
