"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: the models under test are small, and on the shared 2-core machine a second
    OpenMP thread that gets descheduled stalls every op (measured 10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def serverapp_identity(monkeypatch):
    """A ServerApp process knows its run and task; `Message(...)` reads them when a strategy makes one."""
    from flwr.supercore.task_identity import TaskIdentity

    # node 1 is the SuperLink's own id (flwr.common.constant)
    for name, value in {"_run_id": 1, "_task_id": 1, "_node_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture()
def supernode_clock(monkeypatch):
    """client/runtime/supernode's sleeps made instant: returns (now, slept) — a one-item list holding the
    fake monotonic time (a sleep advances it) and the list of every sleep's seconds."""
    from client.runtime import supernode

    now = [100.0]
    slept: list[float] = []

    def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(supernode._time, "sleep", fake_sleep)
    return now, slept
