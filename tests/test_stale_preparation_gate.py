"""A `fedfer simulate` killed while it pre-trains leaves `<run>/preparing.lock` behind: the kernel drops its
lock, the file stays. Nothing waits on a gate no process holds, but the file said "still being prepared" to
anyone reading the folder; the next command that opens the run (a resume — `fedfer simulate` and the
ServerApp —, a new ServerApp start, `fedfer report`) now removes it and says so, and never one a live
`fedfer simulate` holds.

The killed process is a real child process holding the gate, killed with SIGKILL (no cleanup code runs)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared_models.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path):
    from server.run_dir import RunDirectory

    return RunDirectory.create(load_config(overrides=[f"run.root={tmp_path / 'runs'}", "run.name=gate"]))


class Holder:
    """A child process inside `RunDirectory.preparing()` of the run at `path`, as `fedfer simulate` is while
    it pre-trains, until it is killed."""

    def __init__(self, path: Path) -> None:
        script = textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from server.run_dir import RunDirectory
            with RunDirectory(Path({str(path)!r})).preparing():
                print("holding", flush=True)
                time.sleep(600)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "holding"

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL


@pytest.fixture()
def killed_gate(tmp_path):
    """A run whose preparation gate was held by a process that was then killed: the file is left."""
    run = _run(tmp_path)
    holder = Holder(run.path)
    try:
        assert run.preparing_path.exists()
    finally:
        holder.kill()
    assert run.preparing_path.exists()   # what a killed `fedfer simulate` leaves
    return run


@pytest.fixture()
def warnings():
    """The server's log lines (Flower's logger) at WARNING and above."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def _said_removed(run, lines: list[str]) -> bool:
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()] if run.events_path.exists() else []
    return (any("removed a stale preparing.lock" in line and str(run.path) in line for line in lines)
            and [e["event"] for e in events] == ["stale-gate-removed"])


def test_a_resume_removes_the_gate_a_killed_simulate_left(killed_gate, warnings):
    assert killed_gate.check_not_busy() is True   # fedfer simulate run.resume=… and the ServerApp call this
    assert not killed_gate.preparing_path.exists() and _said_removed(killed_gate, warnings)
    assert killed_gate.check_not_busy() is False  # said once


def test_the_serverapps_start_removes_it_and_does_not_wait(killed_gate, warnings):
    assert killed_gate.wait_until_prepared() is False
    assert not killed_gate.preparing_path.exists() and _said_removed(killed_gate, warnings)


def test_fedfer_report_removes_it(killed_gate, warnings, capsys):
    from fedfer.cli import main

    assert main(["report", str(killed_gate.path)]) == 0
    assert not killed_gate.preparing_path.exists() and _said_removed(killed_gate, warnings)


def test_a_gate_a_live_process_holds_is_kept(tmp_path, warnings, capsys):
    from fedfer.cli import main
    from server.run_dir import RunBusy

    run = _run(tmp_path)
    holder = Holder(run.path)
    try:
        with pytest.raises(RunBusy, match="still being prepared"):
            run.check_not_busy()
        assert main(["report", str(run.path)]) == 0   # the report is drawn; the live gate stays
        assert run.preparing_path.exists() and not warnings
    finally:
        holder.kill()


def test_a_gate_removed_between_the_preparers_open_and_its_lock_is_made_again(tmp_path, monkeypatch):
    """The removal checks the file is still the gate it locked, and so does `preparing`: a preparer that
    opened a stale gate another command then removed locks a file nobody sees, so it makes the gate again
    (else the ServerApp would find no gate and read a half-prepared run)."""
    from server import run_dir as module

    run = _run(tmp_path)
    run.preparing_path.touch()   # a stale gate
    real_flock = module.fcntl.flock
    removed = []

    def flock(fd, operation):
        if not removed:   # another command removes the stale gate just before the preparer locks it
            monkeypatch.setattr(module.fcntl, "flock", real_flock)
            removed.append(run.remove_stale_gate())
        return real_flock(fd, operation)

    monkeypatch.setattr(module.fcntl, "flock", flock)
    with run.preparing():
        assert removed == [True] and run.preparing_path.exists()
        holder_fd = os.open(run.preparing_path, os.O_RDWR)
        try:   # the gate at the path is the locked one: a waiter would wait
            with pytest.raises(BlockingIOError):
                real_flock(holder_fd, module.fcntl.LOCK_EX | module.fcntl.LOCK_NB)
        finally:
            os.close(holder_fd)
    assert not run.preparing_path.exists()


def test_fedfer_report_draws_the_report_when_the_gate_cannot_be_removed(killed_gate, monkeypatch, capsys):
    """A gate this user may not remove (another user's run, a read-only mount of the gate's folder): the report
    is the command's job; it is written and the command ends 0, with no traceback."""
    from fedfer.cli import main

    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == "preparing.lock":
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert main(["report", str(killed_gate.path)]) == 0
    assert (killed_gate.path / "report.md").is_file() and "Traceback" not in capsys.readouterr().err


def test_the_serverapp_waits_for_a_gate_made_while_it_removed_a_stale_one(tmp_path, monkeypatch):
    """The ServerApp opens a stale gate; before it locks it, another command removes it and a `fedfer simulate`
    makes a new gate and holds it. The ServerApp's lock on the removed file guards nothing: it must look again
    and wait for the new gate, not start reading a half-prepared run."""
    import threading
    import time

    from server import run_dir as module

    run = _run(tmp_path)
    run.preparing_path.touch()   # a stale gate
    real_flock = module.fcntl.flock
    holders = []

    killed_at: list[float] = []

    def kill_later(holder: Holder) -> None:
        time.sleep(1.0)
        killed_at.append(time.monotonic())
        holder.kill()

    def flock(fd, operation):
        if not holders:
            monkeypatch.setattr(module.fcntl, "flock", real_flock)
            run.remove_stale_gate()
            holders.append(Holder(run.path))   # a new `fedfer simulate` preparing the run, killed a second later
            holders.append(threading.Thread(target=kill_later, args=(holders[0],), daemon=True))
            holders[1].start()
        return real_flock(fd, operation)

    monkeypatch.setattr(module.fcntl, "flock", flock)
    try:
        assert run.wait_until_prepared() is True
        assert killed_at and time.monotonic() >= killed_at[0]   # it returned only once the new gate was free
    finally:
        if holders:
            holders[1].join(timeout=60)
            if holders[0].proc.poll() is None:
                holders[0].kill()
    assert not run.preparing_path.exists()
