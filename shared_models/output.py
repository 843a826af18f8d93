"""What every fedfer model returns, so client, server and evaluation code never special-case a model.

`logits` feed prediction and cross-entropy; `aux` carries the per-sample tensors a model's extra loss
terms need (for HAFNet: distances to the class centres and the partition term). Both are plain tensors
with the batch dimension first, so Opacus' hooks and the per-sample loss see one row per sample.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class FEROutput(NamedTuple):
    """Model output: class logits (B, C) and named auxiliary per-sample tensors (batch dim first)."""

    logits: Tensor
    aux: dict[str, Tensor]
