"""Helper for the tests that start Flower: which of its processes are still alive."""

from __future__ import annotations

from pathlib import Path


def processes_of_run(run_root: Path) -> set[int]:
    """Every live process that belongs to a run under `run_root`: the launcher gives each Flower process
    (SuperLink, simulation, Ray's raylet and workers, which inherit its environment) FLWR_HOME inside
    the run directory, whatever its name."""
    marker = f"FLWR_HOME={run_root}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found
