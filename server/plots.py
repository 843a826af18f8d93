"""The run report's figures (matplotlib, Agg backend: no display needed on a server).

Each function takes plain data (no run-directory parsing here; that is ``server/report.py``),
writes one PNG and returns its path. Figures are sized to read on a laptop screen and in a
Markdown viewer: axes labelled with units, a legend, a title that says what is shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from shared_models.plotting import pyplot, save_figure
from shared_models.wording import counted

#: Above this many classes the per-cell count/% annotations are left out (text for n² cells is what
#: makes matplotlib slow: 90,000 labels for 300 classes), and above MAX_TICK_CLASSES the class names.
MAX_ANNOTATED_CLASSES = 20
MAX_TICK_CLASSES = 60
#: A confusion matrix larger than this is not an FER result; it is refused with one line.
MAX_CONFUSION_CLASSES = 1000


def accuracy_curves(series: Mapping[str, Mapping[str, Sequence[float | None]]], path: Path, *, title: str,
                    best_round: int | None = None) -> Path:
    """Accuracy (solid, with its 95 % CI band) and UAR (dashed) per round, one colour per benchmark.

    `series[benchmark]` holds equal-length lists ``round``, ``accuracy``, ``ci_low``, ``ci_high``,
    ``uar`` (fractions in 0..1; None where a value is missing). `best_round`: the round that scored best on
    the public benchmarks (server/best_round.py), marked with a dotted vertical line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (bench, data) in enumerate(sorted(series.items())):
        colour = colours[k % len(colours)]
        rounds = np.asarray(data["round"], dtype=float)
        acc = _percent(data["accuracy"])
        ax.plot(rounds, acc, "-o", color=colour, markersize=4, label=f"{bench} accuracy")
        low, high = _percent(data["ci_low"]), _percent(data["ci_high"])
        if np.any(np.isfinite(low)):
            ax.fill_between(rounds, low, high, color=colour, alpha=0.18, linewidth=0,
                            label=f"{bench} accuracy 95% CI")
        ax.plot(rounds, _percent(data["uar"]), "--s", color=colour, markersize=3, label=f"{bench} UAR")
    if best_round is not None:
        ax.axvline(best_round, color="0.35", linestyle=":", linewidth=1.5,
                   label=f"best round on the public benchmarks ({best_round}): checkpoints/best.pt")
    ax.set_xlabel("federated round")
    ax.set_ylabel("score on the benchmark (%)")
    ax.set_ylim(0, 100)
    _whole_rounds(ax)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def epsilon_curves(series: Mapping[str, Mapping[str, Sequence[float]]], path: Path, *, title: str,
                   budget: float | None = None, refusals: Mapping[str, Sequence[int]] | None = None,
                   school_budgets: Mapping[str, float] | None = None) -> Path:
    """Cumulative ε per school per round; the budget as a horizontal line (one per distinct budget, naming its
    schools, when `school_budgets` holds more than one); rounds where a school refused or failed marked with a red ×."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    top = 0.0
    for school, data in sorted(series.items()):
        rounds, eps = list(data["round"]), list(data["epsilon"])
        ax.plot(rounds, eps, "-o", markersize=4, label=school)
        top = max([top] + [e for e in eps if np.isfinite(e)])
    refused_label = "refused / failed"
    for school, rounds in sorted((refusals or {}).items()):
        data = series.get(school, {"round": [], "epsilon": []})
        for r in rounds:
            before = [e for rr, e in zip(data["round"], data["epsilon"]) if rr <= r]
            ax.plot([r], [before[-1] if before else 0.0], "x", color="red", markersize=8, label=refused_label)
            refused_label = "_nolegend_"
    by_value: dict[float, list[str]] = {}
    for school, value in sorted((school_budgets or {}).items()):
        if value is not None and value > 0:
            by_value.setdefault(float(value), []).append(school)
    if len(by_value) > 1:   # schools with budgets of their own: one line each, or a school looks over a budget not its
        for value, schools in sorted(by_value.items()):
            names = ", ".join(schools[:3]) + (", …" if len(schools) > 3 else "")
            ax.axhline(value, color="red", linestyle="--", linewidth=1.2, label=f"budget ε = {value:g} ({names})")
            top = max(top, value)
    elif budget is not None and budget > 0:
        ax.axhline(budget, color="red", linestyle="--", linewidth=1.2, label=f"budget ε = {budget:g}")
        top = max(top, budget)
    ax.set_xlabel("federated round")
    ax.set_ylabel("cumulative ε spent by the school")
    ax.set_ylim(0, top * 1.1 if top > 0 else 1)
    _whole_rounds(ax)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8, ncol=2 if len(series) > 6 else 1)
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def epsilon_distribution(quantiles: Mapping[str, Sequence[float]], finals: Sequence[float], path: Path, *,
                         title: str, budget: float | None = None) -> Path:
    """A large federation's privacy in two panels: per round, the median cumulative ε of the schools that
    have trained with 10-90 % and min-max bands (and how many schools that is); and the histogram of each
    school's final ε. Readable at 1,000 schools, where one curve per school is not."""
    plt = pyplot()
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11.5, 4.6), gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    rounds = np.asarray(quantiles.get("round", []), dtype=float)
    if rounds.size:
        ax.fill_between(rounds, quantiles["q0"], quantiles["q100"], color="tab:blue", alpha=0.12, linewidth=0,
                        label="min-max")
        ax.fill_between(rounds, quantiles["q10"], quantiles["q90"], color="tab:blue", alpha=0.28, linewidth=0,
                        label="10-90 %")
        ax.plot(rounds, quantiles["q50"], "-o", color="tab:blue", markersize=3, label="median")
        counts = ax.twinx()
        counts.plot(rounds, quantiles["schools"], ":o", color="gray", markersize=3, label="schools that have trained")
        counts.set_ylabel("schools that have trained", color="gray")
        counts.set_ylim(0, max(quantiles["schools"]) * 1.1)
    if budget is not None and budget > 0:
        ax.axhline(budget, color="red", linestyle="--", linewidth=1.2, label=f"budget ε = {budget:g}")
        hist.axvline(budget, color="red", linestyle="--", linewidth=1.2)
    top = max([v for v in quantiles.get("q100", []) if np.isfinite(v)] + [budget or 0.0, 1e-9])
    ax.set_xlabel("federated round")
    ax.set_ylabel("cumulative ε spent by a school")
    ax.set_ylim(0, top * 1.1)
    _whole_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=10)
    finite = [v for v in finals if np.isfinite(v)]
    hist.hist(finite, bins=min(30, max(5, len(finite) // 10)) if finite else 5, color="tab:blue", alpha=0.8)
    hist.set_xlabel("final ε of a school")
    hist.set_ylabel("schools")
    hist.set_title(f"final ε, {counted(len(finite), 'school')}", fontsize=10)
    hist.grid(alpha=0.3)
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def confusion_heatmap(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: Path, *, title: str) -> Path:
    """Row-normalised colours (recall per true class), each cell annotated with its count and %."""
    counts = _confusion_counts(confusion, labels)
    plt = pyplot()
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    classes = counts.shape[0]
    size = min(16.0, max(4.5, 0.75 * classes + 2.5))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(share * 100, cmap="Blues", vmin=0, vmax=100)
    if classes <= MAX_TICK_CLASSES:
        ticks = np.arange(classes)
        ax.set_xticks(ticks, labels, rotation=45, ha="right")
        ax.set_yticks(ticks, labels)
    if classes <= MAX_ANNOTATED_CLASSES:
        for i in range(classes):
            for j in range(classes):
                colour = "white" if share[i, j] > 0.6 else "black"
                ax.text(j, i, f"{int(counts[i, j])}\n{share[i, j] * 100:.0f}%", ha="center", va="center",
                        fontsize=7, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("% of the true class (recall on the diagonal)")
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _confusion_counts(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> np.ndarray:
    """The matrix as floats, or ValueError (one line) unless it is square, of finite counts >= 0,
    one label per class and at most MAX_CONFUSION_CLASSES classes."""
    if isinstance(confusion, np.ndarray):
        confusion = confusion.tolist()
    size = len(confusion) if isinstance(confusion, Sequence) else -1
    if not 0 < size <= MAX_CONFUSION_CLASSES:
        raise ValueError(f"confusion matrix of {size} rows (expected 1 to {MAX_CONFUSION_CLASSES})")
    if not all(isinstance(row, Sequence) and not isinstance(row, str) and len(row) == size for row in confusion):
        raise ValueError(f"confusion matrix is not square ({size} rows, rows of other lengths)")
    try:
        counts = np.asarray(confusion, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("confusion matrix holds values that are not numbers") from None
    if not (np.all(np.isfinite(counts)) and np.all(counts >= 0)):
        raise ValueError("confusion matrix holds negative or non-finite counts")
    if len(labels) != size:
        raise ValueError(f"confusion matrix of {size} classes but {len(labels)} labels")
    return counts


def _whole_rounds(ax: object) -> None:
    """Round ticks on whole numbers only. `integer=True` alone is dropped by matplotlib when fewer than two whole
    numbers are in view, so a one-round run (the view 0.96-1.04 around round 1) was ticked 0.96, 0.98, … 1.04:
    one whole number in view is enough here."""
    ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)   # type: ignore[attr-defined]


def _percent(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else 100.0 * float(v) for v in values], dtype=float)


#: the comparison plot's reference lines: (colour, line style) by row key of server/added.py
REFERENCE_STYLES = {"start": ("grey", ":"), "central": ("tab:green", "--"), "best-alone": ("tab:orange", "-."),
                    "noise-free": ("tab:purple", (0, (5, 2, 1, 2)))}


def federation_added(panels: Sequence[Mapping[str, object]], path: Path, *, title: str) -> Path:
    """Side-by-side panels (one per test set), each: the federation's accuracy per round (with its 95 % CI
    band; round 0 = the starting model) and horizontal lines for the reference models.

    `panels[i]` holds ``title`` (str), ``curve`` (``round``, ``accuracy``, ``ci_low``, ``ci_high``; fractions)
    and ``references``: a list of (key, label, accuracy fraction) — key picks the style (REFERENCE_STYLES);
    optionally ``noise_free`` (``label``, ``round``, ``accuracy``): the same federation without noise, per round,
    and ``kept_round``: the round checkpoints/best.pt holds when it is not the last (marked and labelled: it is the
    model the schools get, and the one the report's headline is about)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False, sharey=True)
    values: list[float] = []
    for ax, panel in zip(axes[0], panels):
        curve = panel["curve"]
        rounds = np.asarray(curve["round"], dtype=float)   # type: ignore[index]
        acc = _percent(curve["accuracy"])   # type: ignore[index]
        low, high = _percent(curve["ci_low"]), _percent(curve["ci_high"])   # type: ignore[index]
        ax.plot(rounds, acc, "-o", color="tab:blue", markersize=5, linewidth=2.2, label="Federation (private), per round")
        if np.any(np.isfinite(low)):
            ax.fill_between(rounds, low, high, color="tab:blue", alpha=0.15, linewidth=0, label="95% confidence band")
        if len(acc) and np.isfinite(acc[-1]):   # the number a reader looks for: where the federation ended
            ax.annotate(f"{acc[-1]:.1f}%", (rounds[-1], acc[-1]), textcoords="offset points", xytext=(-6, 8),
                        ha="right", color="tab:blue", fontweight="bold")
        kept = panel.get("kept_round")
        if kept is not None and kept in rounds.tolist():   # the model the schools get, when not the last round's
            at = rounds.tolist().index(kept)
            ax.axvline(float(kept), color="tab:red", linestyle=":", linewidth=1.5,   # type: ignore[arg-type]
                       label=f"checkpoints/best.pt, round {kept}" + (f": {acc[at]:.1f}%" if np.isfinite(acc[at]) else ""))
        quiet = panel.get("noise_free")
        if quiet:   # what the privacy cost, round by round
            colour, style = REFERENCE_STYLES["noise-free"]
            quiet_acc = _percent(quiet["accuracy"])   # type: ignore[index]
            ax.plot(np.asarray(quiet["round"], dtype=float), quiet_acc, marker="s", markersize=4,   # type: ignore[index]
                    color=colour, linestyle=style, linewidth=1.6, label=f"{quiet['label']}: {quiet_acc[-1]:.1f}%")   # type: ignore[index]
            values += [v for v in quiet_acc.tolist() if np.isfinite(v)]
        for key, label, value in panel["references"]:   # type: ignore[attr-defined]
            colour, style = REFERENCE_STYLES.get(key, ("black", ":"))
            ax.axhline(100 * value, color=colour, linestyle=style, linewidth=1.8, label=f"{label}: {100 * value:.1f}%")
            values.append(100 * value)
        values += [v for v in acc.tolist() + low.tolist() + high.tolist() if np.isfinite(v)]
        ax.set_title(str(panel["title"]), fontsize=11)
        ax.set_xlabel("round of federated training (0 = starting model)")
        _whole_rounds(ax)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7.5)
    axes[0][0].set_ylabel("expressions recognised correctly (%)")
    if values:
        axes[0][0].set_ylim(max(0.0, min(values) - 8), min(100.0, max(values) + 4))
    fig.suptitle(title, fontsize=12)
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
