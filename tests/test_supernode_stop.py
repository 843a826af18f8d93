"""A SuperNode stopped by a signal to every process of its node (systemd's default KillMode, the tests'
Supervisor.stop) gets the signal twice: its own, and the launcher's forward. Flower's graceful exit, which
deactivates the node at the SuperLink (offline at once), must survive the second one; before, it was killed
half-way and the SuperLink counted the stopped school online for up to 60 s more (docs/deployment.md §5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Flower's signal handling as the SuperNode uses it, with its connection's `finally` (where it deactivates the
#: node) standing in as a file written after a second's work
SUPERNODE = """
import sys, time
from pathlib import Path
patched = sys.argv[2] == "patched"
if patched:
    from client.runtime.supernode import patch_second_stop_signal
    assert patch_second_stop_signal()
from flwr.supernode import start_client_internal as flower
from flwr.supercore.telemetry import EventType
flower.register_signal_handlers(event_type=EventType.RUN_SUPERNODE_LEAVE, exit_message="SuperNode terminated gracefully.")
Path(sys.argv[1] + ".ready").write_text("")
try:
    while True:
        time.sleep(0.05)
finally:
    time.sleep(1.0)                       # DeactivateNode on a loaded machine
    Path(sys.argv[1]).write_text("deactivated")
"""


def _stopped_twice(tmp_path: Path, mode: str) -> tuple[bool, int]:
    marker = tmp_path / f"{mode}-deactivated"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    node = subprocess.Popen([sys.executable, "-c", SUPERNODE, str(marker), mode], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not Path(str(marker) + ".ready").exists():
            assert node.poll() is None and time.monotonic() < deadline, "the stand-in SuperNode did not start"
            time.sleep(0.05)
        node.send_signal(signal.SIGTERM)   # the service manager's
        time.sleep(0.3)
        node.send_signal(signal.SIGTERM)   # the launcher's forward
        code = node.wait(timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
    return marker.exists(), code


def test_a_second_stop_signal_does_not_cut_the_supernodes_deactivation_short(tmp_path):
    deactivated, code = _stopped_twice(tmp_path, "patched")
    assert deactivated and code == 0


def test_unpatched_flower_is_killed_by_the_second_signal(tmp_path):
    # what the patch is for: without it, the second signal ends the SuperNode before it deactivates
    deactivated, code = _stopped_twice(tmp_path, "plain")
    assert not deactivated and code == -signal.SIGTERM


def test_before_flower_handles_signals_a_stop_still_ends_the_supernode(tmp_path):
    script = ("import time, sys\nfrom client.runtime.supernode import patch_second_stop_signal\n"
              "assert patch_second_stop_signal()\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n")
    ready = tmp_path / "ready"
    node = subprocess.Popen([sys.executable, "-c", script, str(ready)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert node.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=30) == -signal.SIGTERM
    finally:
        if node.poll() is None:
            node.kill()
