"""DP-safe backbones: GroupNorm instead of BatchNorm, no in-place ops on tracked outputs."""
