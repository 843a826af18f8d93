"""The files a Flower process reads at start (certificates, keys, secrets), checked before it starts so a
missing or empty one is one line naming its path instead of Flower's message without it. Used by the
school's start check (client/runtime/preflight.py) and the coordinator's (server/deploy/preflight.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence


def option(args: Sequence[str], name: str) -> str | None:
    """The value of Flower's option `name` (`--name VALUE` or `--name=VALUE`; the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def read_start_file(path: Path, what: str, error: type[Exception]) -> bytes:
    """The bytes of a file a process needs at start, or `error` naming the path and what the file is."""
    try:
        if not path.exists():
            raise error(f"{path}: missing ({what})")
        if not path.is_file():
            raise error(f"{path}: not a regular file ({what})")
        data = path.read_bytes()
    except PermissionError:
        raise error(f"{path}: not readable by this user ({what})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc}; {what})") from None
    if not data.strip():
        raise error(f"{path}: empty ({what})")
    return data


EXIT_CONFIG = 2   # the process cannot start as configured: fix the named file, then start again


def run_start_check(check: Callable[[list[str]], object], error: type[Exception], argv: Sequence[str] | None = None) -> int:
    """`python -m …preflight [-- FLOWER_ARGS]`: run `check` on the Flower arguments; 0, or one line and EXIT_CONFIG."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        check(args[args.index("--") + 1:] if "--" in args else args)
    except error as exc:
        print(f"fedfer: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return 0
