"""Crash-safe writes: the one place fedfer writes a file that must survive a crash (privacy state,
ledgers, the run directory, checkpoints, deployment files, the synthetic data's manifests).

Whole files go through write-to-temp, fsync, rename, fsync-directory: after a crash a reader sees the
old file or the new one, never a torn one. Two ways to append a line:
- ``append_line_atomic`` rewrites the file the same way (ledgers: small, and a ledger must never end
  in a partial line);
- ``append_line`` writes a complete line with O_APPEND, then fsyncs (metrics and events: a killed
  process leaves at most a missing line, or a torn last one if the kernel cut the write short; the
  next append ends that fragment with a newline first, so readers skip it and lose nothing else).
``locked`` serialises read-modify-write cycles between processes of the same school (or server) with
an advisory lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` all at once (`mode`: the new file's permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.replace(tmp, path)
        except OSError as exc:   # name the file asked for (e.g. a folder in its place), not the temp file removed below
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def readable_mode() -> int:
    """The permissions an ordinary `open()` would give a new file (0666 less the umask): for files meant
    to be read by others — reports and plots — where the temp file's 0600 would hide them."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in `directory` durable (the directory entry, not only the file's data)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def append_line_atomic(path: Path, line: str) -> None:
    """Append one line (no newline inside) as an all-or-nothing replacement of the file."""
    if "\n" in line or "\r" in line:
        raise ValueError("a ledger line must not contain a newline")
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        raise ValueError(f"{path}: last line has no newline; the file was edited outside fedfer")
    atomic_write_bytes(path, old + line.encode("utf-8") + b"\n")


def append_line(path: Path, line: str) -> None:
    """Append one complete line with a single O_APPEND write, then fsync."""
    if "\n" in line or "\r" in line:
        raise ValueError("a line must not contain a newline")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            # a crash cut the last write short: end that fragment first, or this line would be glued onto
            # it and both lost to a reader (the fragment stays a line of its own, which readers skip)
            data = b"\n" + data
        view = memoryview(data)
        while view:   # a write may take only part (a signal, a nearly full disk): write the rest
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<path>.lock`` for the duration of the block."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def try_locked(path: Path) -> Iterator[bool]:
    """Like :func:`locked`, but never waits: yields True if this block holds the lock, False if another
    process or thread holds it (the caller declines instead of queueing)."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
