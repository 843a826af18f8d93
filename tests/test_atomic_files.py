"""File modes of the atomic writer: private by default, ordinary for what people read."""

from __future__ import annotations


def test_reports_and_plots_are_readable_as_an_ordinary_file_would_be(tmp_path) -> None:
    """Plots written through the atomic writer were 0600 (the temp file's mode) where they had followed the
    umask; a report or plot is for others to read, unlike the privacy state."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared_models.atomic_files import atomic_write_text, readable_mode
    from shared_models.plotting import save_figure

    old = os.umask(0o027)
    try:
        assert readable_mode() == 0o640
        fig = plt.figure()
        save_figure(fig, tmp_path / "plot.png")
        plt.close(fig)
        atomic_write_text(tmp_path / "state.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "plot.png").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600   # privacy state keeps the private mode
