"""The lesson report's figures (matplotlib, Agg backend), in the style of server/plots.py: axes with
units, a legend, a title saying what is shown. Suppressed windows (fewer than k students) are gaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared_models.labels import FER7
from shared_models.plotting import pyplot, save_figure

COLOURS = {"angry": "#d62728", "disgust": "#8c564b", "fear": "#9467bd", "happy": "#2ca02c", "sad": "#1f77b4",
           "surprise": "#ff7f0e", "neutral": "#7f7f7f"}


def expression_mix(windows: list, path: Path, k: int) -> Path:
    """Stacked shares of the class's expressions per window."""
    plt = pyplot()
    minutes = np.array([w.start / 60.0 for w in windows])
    mix = np.array([w.mix if w.expressions_shown else [np.nan] * len(FER7) for w in windows], dtype=float)
    totals = mix.sum(axis=1, keepdims=True)
    shares = np.divide(mix, totals, out=np.full_like(mix, np.nan), where=totals > 0)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    bottom = np.zeros(len(windows))
    width = (windows[0].end - windows[0].start) / 60.0 if windows else 1.0
    for j, name in enumerate(FER7):
        values = np.nan_to_num(shares[:, j])
        ax.bar(minutes, values, width=width, bottom=bottom, align="edge", color=COLOURS[name], label=name, linewidth=0)
        bottom += values
    ax.set_xlabel("lesson time (minutes)")
    ax.set_ylabel("share of detected faces")
    ax.set_ylim(0, 1)
    ax.set_title(f"The class's expressions per {width * 60:.0f}-s window (blank: fewer than {k} students' faces)")
    ax.legend(ncol=7, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    out = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return out


def indicators(windows: list, path: Path, k: int) -> Path:
    """The four seed-001 indicators per window, with the difficulty moments marked."""
    plt = pyplot()
    minutes = np.array([(w.start + w.end) / 120.0 for w in windows])

    def values(name: str) -> np.ndarray:
        return np.array([getattr(w, name) if w.shown else np.nan for w in windows], dtype=float)

    fig, axes = plt.subplots(4, 1, figsize=(10, 8), sharex=True)
    panels = (("inattentive", "focus\nshare inattentive", "#d62728"),
              ("engagement", "engagement\nhappy + surprise", "#2ca02c"),
              ("passive", "involvement\nshare passive", "#9467bd"),
              ("difficulty", "difficulty\nstudents triggered", "#1f77b4"))
    for ax, (name, label, colour) in zip(axes, panels):
        ax.plot(minutes, values(name), color=colour, marker=".", linewidth=1)
        ax.set_ylabel(label, fontsize=8)
        if name != "difficulty":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for w in windows:
        if w.shown and w.difficulty:
            for ax in axes:
                ax.axvline((w.start + w.end) / 120.0, color="#1f77b4", alpha=0.25, linewidth=2)
    axes[-1].set_xlabel("lesson time (minutes)")
    axes[0].set_title(f"Learning-status indicators (seed 001) per window; gaps: fewer than {k} students")
    out = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return out
