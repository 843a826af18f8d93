"""Checks on every school's reply before it may touch the global model.

A reply is rejected (and the round goes on with the rest) when its weights do not have the global
model's keys and shapes, are not real numbers (complex, object), hold NaN/Inf, or moved further from the global model than
`federation.max_update_norm` allows: with DP-SGD every step is clipped and noised, so an update far
beyond what `lr * steps * (clip + noise)` can produce means a broken or malicious client.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


class RejectedUpdate(ValueError):
    """One line naming what is wrong with a reply."""


def check_update(global_arrays: Mapping[str, np.ndarray], reply_arrays: Mapping[str, np.ndarray],
                 max_update_norm: float) -> float:
    """Validate a reply's weights against the global ones; return the update's L2 norm."""
    missing = set(global_arrays) - set(reply_arrays)
    extra = set(reply_arrays) - set(global_arrays)
    if missing or extra:
        names = sorted(missing)[:3] + sorted(extra)[:3]
        raise RejectedUpdate(f"weights have different keys than the global model ({', '.join(names)})")
    squared = 0.0
    for key, reference in global_arrays.items():
        value = reply_arrays[key]
        if value.shape != reference.shape:
            raise RejectedUpdate(f"'{key}' has shape {tuple(value.shape)}, expected {tuple(reference.shape)}")
        if value.dtype.kind not in "biuf":
            raise RejectedUpdate(f"'{key}' has dtype {value.dtype}, not real numbers")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise RejectedUpdate(f"'{key}' contains NaN or Inf")
        # every value FedAvg averages into a float tensor counts towards the norm, whatever dtype it came in;
        # only integer buffers answered with integers (counters) are left out
        if value.dtype.kind == "f" or reference.dtype.kind == "f":
            diff = value.astype(np.float64) - reference.astype(np.float64)
            squared += float(np.dot(diff.ravel(), diff.ravel()))
    norm = squared ** 0.5
    if norm > max_update_norm:
        # an honest school's DP noise alone has norm ~ lr·σ·clip·√(parameters)·√steps / batch: a large model
        # (a paper preset) with a small train.batch_size reaches it, and then every school is rejected every round
        raise RejectedUpdate(f"update norm {norm:.3g} exceeds federation.max_update_norm {max_update_norm:.3g} (DP "
                             "noise grows with √parameters / train.batch_size: for a large model raise one of them)")
    return norm
