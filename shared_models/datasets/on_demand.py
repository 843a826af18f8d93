"""Schools generated on demand: how a simulated node asks for its school's folder and waits for it.

With `data.generate=on-demand` (a simulation of many schools) `fedfer simulate` builds only the public
and in-domain parts before the run; a school's folder is built the first time the school is sampled.
The node that needs it (a Ray actor, which must not import the generator) drops a request file and waits;
the generator service in the `fedfer simulate` process (simulations/school_service.py) builds the
folder into a temporary directory and renames it into place, so the folder appears complete or not at all:

    <root>/.requests/<school_id>.request     asked for (written atomically; several nodes may ask at once)
    <root>/.requests/<school_id>.failed      the generator could not build it (one line: why)
    <root>/schools/<school_id>/school.json   written last inside the folder renamed into place: the school exists

Nothing of a school's data passes through this protocol: only its id.
"""

from __future__ import annotations

import time
from pathlib import Path

from shared_models.atomic_files import atomic_write_text
from shared_models.wording import one_line

REQUESTS_DIR = ".requests"
POLL_S = 0.1


class SchoolNotGenerated(RuntimeError):
    """The on-demand school did not appear (generator failed, stopped, or the wait timed out)."""


def school_ready(data_dir: Path) -> bool:
    """A synthetic school folder is complete once its school.json exists (it is written last)."""
    return (data_dir / "school.json").is_file()


def request_path(data_dir: Path) -> Path:
    """<root>/.requests/<school_id>.request for a school folder <root>/schools/<school_id>."""
    return data_dir.parent.parent / REQUESTS_DIR / f"{data_dir.name}.request"


def await_school(data_dir: str | Path, timeout_s: float, poll_s: float = POLL_S) -> Path:
    """Ask for the school at `data_dir` and wait until it is complete; returns `data_dir`.

    Raises SchoolNotGenerated naming the school when the generator reports a failure or `timeout_s` passes."""
    data_dir = Path(data_dir)
    if school_ready(data_dir):
        return data_dir
    request = request_path(data_dir)
    failed = request.with_suffix(".failed")
    request.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(request, data_dir.name + "\n")
    deadline = time.monotonic() + timeout_s
    while not school_ready(data_dir):
        if failed.is_file():
            reason = failed.read_text(encoding="utf-8", errors="replace").strip()[:300]
            raise SchoolNotGenerated(f"{data_dir.name}: the generator could not build it: {reason}")
        if time.monotonic() > deadline:
            raise SchoolNotGenerated(f"{data_dir.name}: not generated within {timeout_s:.0f} s (is the run's "
                                     f"generator running? `fedfer simulate` starts it with data.generate=on-demand)")
        time.sleep(poll_s)
    return data_dir


def pending_requests(root: Path) -> list[str]:
    """School ids asked for under <root>/.requests and not yet built or failed, oldest first."""
    folder = Path(root) / REQUESTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.request"):
        try:
            found.append((path.stat().st_mtime_ns, path.stem))
        except FileNotFoundError:   # answered meanwhile
            continue
    return [name for _, name in sorted(found)]


def answer_request(root: Path, school_id: str, failure: str = "") -> None:
    """Remove a served request; on `failure`, leave the one-line reason the waiting node reports."""
    folder = Path(root) / REQUESTS_DIR
    if failure:
        atomic_write_text(folder / f"{school_id}.failed", one_line(failure) + "\n")
    (folder / f"{school_id}.request").unlink(missing_ok=True)
