"""The one normalisation choice for convolutional stacks.

BatchNorm mixes samples, so DP-SGD cannot use it. Opacus' own fixer swaps BatchNorm2d(C) for
GroupNorm(gcd(32, C), C), which for C <= 32 puts one channel in a group (instance norm). On the small
maps of the `cpu` presets (2x2 .. 4x4) a one-channel group normalises 4-16 numbers, which is close to
degenerate, so here every group holds at least two channels: GroupNorm(min(32, C // 2), C), i.e. the
same as Opacus for C >= 64 and twice the group size below that.
"""

from __future__ import annotations

import math

from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm for a conv feature map of `channels` channels (>= 2 channels per group)."""
    if channels < 2:
        raise ValueError(f"group_norm: need at least 2 channels, got {channels}")
    groups = math.gcd(32, channels)
    while channels // groups < 2:
        groups //= 2
    return nn.GroupNorm(groups, channels)
