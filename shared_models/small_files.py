"""Reading a small file someone else may have placed (a key, an anchor, a policy) without trusting what it is.

`Path.read_bytes()` on such a path can block for good (a named pipe), never end (a symlink to /dev/zero),
or fill the memory (a file of gigabytes). :func:`read_small_file` opens without blocking, checks what the
open file is (no race between a check and the open) and reads at most `limit` bytes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SmallFileError(OSError):
    """A small file that cannot be read as one: missing, not a regular file, too large or unreadable.
    ``str()`` is one line naming the file; ``why`` the reason alone, for callers that phrase their own
    line. An OSError, so callers that already turn an unreadable file into one line keep doing so."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why

    def __str__(self) -> str:
        return self.args[0]


def read_small_file(path: Path | str, limit: int) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; SmallFileError otherwise."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a named pipe returns at once instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SmallFileError(path, "missing") from None
    except (OSError, ValueError) as exc:   # ValueError: a NUL byte in the name
        raise SmallFileError(path, f"cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
                    else "a device or socket")
            raise SmallFileError(path, f"{kind}, not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except SmallFileError:
        raise
    except OSError as exc:
        raise SmallFileError(path, f"cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SmallFileError(path, f"larger than {limit:,} bytes")
    return data
