"""How many torch threads a training process uses, and how its idle OpenMP threads wait.

Measured (benchmarks/models.json, `threads` rows; docs/dp-speed.md): with two torch threads while other
processes kept the second core busy, HAFNet `cpu` plain training fell from ~300 to ~8 samples/s. The
cause is OpenMP's default wait policy: after every parallel region GNU OpenMP (the runtime torch's CPU
wheels use) spins waiting for the other thread, and when that thread is not scheduled — its core is busy
with another process — every one of the model's hundreds of small ops waits out a scheduler time slice.
``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep instead (same run: ~150 samples/s with two threads,
as fast as one); it must be in the environment before torch is imported, so the command line and the
ClientApp set it (:func:`prefer_passive_waiting`) unless the user chose a policy.

``train.threads`` = 0 (auto) takes the cores this process may run on (``os.sched_getaffinity``) that no
other runnable task is using right now (``/proc/loadavg``), shared between ``share`` processes, at least
one. The default stays 1: on a machine that also runs other work one thread per process is what scales.
"""

from __future__ import annotations

import os
import sys

AUTO = 0


def prefer_passive_waiting() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy; True if the setting is in effect
    (False when torch — hence OpenMP — was already loaded without it)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"
    if "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Other tasks runnable right now (the kernel's count in /proc/loadavg, less this process)."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def resolve_threads(requested: int, share: int = 1) -> int:
    """``requested`` threads, or for 0 (auto) the free cores divided among ``share`` processes (>= 1)."""
    if requested < 0:
        raise ValueError(f"train.threads must be >= 0 (0 = auto), got {requested}")
    if requested != AUTO:
        return int(requested)
    free = usable_cores() - busy_cores()
    return max(1, min(usable_cores(), free) // max(1, int(share)))


def apply_threads(requested: int, share: int = 1) -> int:
    """Resolve ``train.threads`` and give torch that many intra-op threads; returns the number."""
    import torch

    threads = resolve_threads(int(requested), share)
    torch.set_num_threads(threads)
    return threads
