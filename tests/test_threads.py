"""train.threads: explicit counts pass through, 0 (auto) takes the free cores, OpenMP waits passively."""

from __future__ import annotations

import pytest
import torch  # noqa: F401  (loaded, as in every training process by the time threads are set)

from shared_models import threads


def test_auto_threads_take_free_cores_shared_between_processes(monkeypatch):
    assert threads.resolve_threads(3) == 3
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", lambda: 3)
    assert threads.resolve_threads(0) == 5
    assert threads.resolve_threads(0, share=2) == 2
    monkeypatch.setattr(threads, "busy_cores", lambda: 12)   # more runnable tasks than cores: still one
    assert threads.resolve_threads(0) == 1
    with pytest.raises(ValueError, match="train.threads must be >= 0"):
        threads.resolve_threads(-1)


def test_real_machine_auto_is_within_its_cores():
    assert 1 <= threads.resolve_threads(0) <= threads.usable_cores()


def test_passive_waiting_respects_a_users_policy(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert threads.prefer_passive_waiting() is False
    monkeypatch.delenv("OMP_WAIT_POLICY")
    # torch is loaded in the test process already: too late to change how OpenMP waits, and it says so
    assert threads.prefer_passive_waiting() is False
    assert "OMP_WAIT_POLICY" not in __import__("os").environ
