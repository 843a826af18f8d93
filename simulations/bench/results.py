"""Writing a benchmark's result file: every JSON in benchmarks/ carries the command that made it and
the resolved settings, so it can be reproduced as it stands."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence


def load_average() -> list[float]:
    """The machine's 1-, 5- and 15-minute load averages, for a result to record beside its timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """`python -m MODULE ARGS…` as the user typed it (quoted for a shell)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in args)])


def write_result(path: str | Path, record: Mapping[str, Any], *, module: str, argv: Sequence[str] | None = None) -> Path:
    """Write `record` as indented JSON with its `command` first; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command_line(module, argv), **record}, indent=2, default=str) + "\n",
                   encoding="utf-8")
    return out
