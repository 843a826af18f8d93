"""Helper for the tests that start Flower: which of its processes are still alive."""

from __future__ import annotations

from pathlib import Path

from server.processes import processes_with_flwr_home


def processes_of_run(run_root: Path) -> set[int]:
    """Every live process that belongs to a run under `run_root` (server/processes.py `processes_with_flwr_home`)."""
    return processes_with_flwr_home(run_root)
