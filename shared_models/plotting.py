"""Matplotlib without a display, and PNGs written so a reader never sees half a file: the run report
(server/plots.py) and the lesson report (client/classroom/plots.py) both draw through these."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # matplotlib is imported on first use: the Agg backend must be chosen before pyplot loads
    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display, no GUI toolkit)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> Path:
    """Write `fig` to `path` all at once (shared_models/atomic_files.py: a temp file of its own, fsync, rename):
    a reader or a crash never sees half a PNG, and two writers of the same plot never share a temp file."""
    import io

    from shared_models.atomic_files import atomic_write_bytes, readable_mode

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(Path(path), png.getvalue(), readable_mode())
    return path
