"""Which Ray a simulation's schools run on, checked by the ServerApp against `federation.ray_address`.

The key cannot move the simulation by itself: Flower 1.41 initialises Ray in the `flwr-simulation`
process (the same process as this ServerApp, in another thread) from its own backend settings, and
`ray.init` attaches to an existing cluster only through Ray's discovery — RAY_ADDRESS in the
environment of the SuperLink that starts the simulation. `fedfer simulate` sets it. With `flwr run .`
the user starts that SuperLink (or `flwr run` spawns its local one, which inherits the shell's
environment), so a key the environment does not match would silently run every school on this machine;
the ServerApp stops the run instead, naming both addresses.
"""

from __future__ import annotations

import socket
import time
from typing import Any


class RayClusterError(RuntimeError):
    """The simulation's Ray is not the cluster `federation.ray_address` names (one line)."""


def _resolved(address: str) -> tuple[set[str], int] | None:
    """The IPs a HOST:PORT resolves to, and the port; None if it does not parse or resolve."""
    from shared_models.config import ray_address_parts

    parts = ray_address_parts(address)
    if parts is None:
        return None
    host, port = parts
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}, port
    except OSError:
        return None


def same_ray_address(actual: str, expected: str) -> bool:
    """Whether the GCS address Ray is connected to is the one the config names. Ray itself rewrites a
    loopback head address to this machine's own IP before connecting, so that form counts too."""
    if actual == expected:
        return True
    try:
        from ray._private.services import canonicalize_bootstrap_address

        if actual == canonicalize_bootstrap_address(expected):
            return True
    except Exception:   # a private Ray helper: if it moved, the resolved comparison below still decides
        pass
    got, wanted = _resolved(actual), _resolved(expected)
    return got is not None and wanted is not None and got[1] == wanted[1] and bool(got[0] & wanted[0])


def check_ray_cluster(grid: Any, expected: str, timeout: float = 600.0) -> str | None:
    """In a simulation with `federation.ray_address` set, wait until Flower's backend has initialised
    Ray in this process (it does so before any school can answer) and return the cluster address it is
    attached to; raise RayClusterError if it is another one. Deployment (no Ray) and an empty key: None."""
    if not expected or type(grid).__name__ != "InMemoryGrid":
        return None
    import ray

    deadline = time.monotonic() + timeout
    while not ray.is_initialized():
        if time.monotonic() > deadline:
            raise RayClusterError(f"federation.ray_address={expected}: Flower's simulation did not initialise "
                                  f"Ray within {timeout:.0f} s")
        time.sleep(0.2)
    actual = str(ray.get_runtime_context().gcs_address)
    if not same_ray_address(actual, expected):
        raise RayClusterError(
            f"federation.ray_address={expected}, but this simulation runs on the Ray at {actual}: start the "
            f"SuperLink that runs it with RAY_ADDRESS={expected} in its environment (`RAY_ADDRESS={expected} "
            f"flwr run .` when no local SuperLink is running yet), or use `fedfer simulate --ray-address`")
    return actual
