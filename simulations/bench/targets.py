"""Where issue 14's accuracy targets sit: the federation round by round against (a), (b) and (c).

    python -m simulations.bench.targets --runs benchmarks/epsilon-curve.json,benchmarks/pretraining-tune/s17-frontier-r24.json \
        --only "ε 8,noise off" --pooled benchmarks/central-epochs-cpu-s12.json --out benchmarks/targets.png

Reads result files of `simulations.bench.epsilon_curve` (every run's in-domain accuracy after each round, the
pre-trained start (a), the best school alone (c) where it was run) and of `simulations.bench.central_epochs`
(the pooled non-private model (b) at its last epoch), runs nothing, and prints one row per setting: its final
in-domain accuracy (mean over runs) against the three targets — at least 10 points above (a), within 5 of (b),
at least 10 above the best school alone. Writes the table as JSON and a plot of the in-domain accuracy per round
with the level the targets ask for, so whoever sets the targets can see how far each setting gets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from simulations.bench.results import write_result

ABOVE_START = 0.10    # the federation at least 10 points above (a) ...
ABOVE_ALONE = 0.10    # ... and above the best school alone (c)
BELOW_POOLED = 0.05   # ... and at most 5 below (b)


def _accuracy(value: Any) -> float:
    return float(value["accuracy"] if isinstance(value, Mapping) else value)


def settings_of(record: Mapping[str, Any], source: str, only: Sequence[str]) -> list[dict[str, Any]]:
    """Every setting of an epsilon-curve result: its label, rounds, mean in-domain curve and final figures."""
    rounds = int(record["config"]["federation.rounds"])
    out = []
    for label, runs in record["runs"].items():
        if only and label not in only:
            continue
        curves = [[_accuracy(h["indomain"]) for h in run["history"]] for run in runs]
        length = min(len(c) for c in curves)
        mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
        alone = record["summary"].get(label, {}).get("best_alone_indomain")
        out.append({"setting": f"{label}, {rounds} rounds", "source": source, "runs": len(runs),
                    "curve": mean_curve, "indomain": mean_curve[-1],
                    "public": sum(_accuracy(run["public"]) for run in runs) / len(runs),
                    "best_alone": float(alone["mean"]) if alone else None})
    return out


def pooled_reference(record: Mapping[str, Any]) -> tuple[int, float]:
    """(epochs, in-domain accuracy) of a central-epochs result's longest-trained (b)."""
    last = max(record["curve"], key=lambda point: int(point["epochs"]))
    return int(last["epochs"]), _accuracy(last["synthetic-indomain"])


def verdict(row: Mapping[str, Any], start: float, pooled: float) -> dict[str, Any]:
    """The three targets for one setting: the margins in points and whether each is met."""
    fed = float(row["indomain"])
    out: dict[str, Any] = {"over_start_points": round(100 * (fed - start), 1),
                           "under_pooled_points": round(100 * (pooled - fed), 1)}
    out["over_start_met"] = fed - start >= ABOVE_START
    out["under_pooled_met"] = pooled - fed <= BELOW_POOLED
    if row.get("best_alone") is not None:
        out["over_alone_points"] = round(100 * (fed - float(row["best_alone"])), 1)
        out["over_alone_met"] = fed - float(row["best_alone"]) >= ABOVE_ALONE
    return out


def plot(rows: Sequence[Mapping[str, Any]], start: float, pooled: float, pooled_epochs: int, path: Path) -> Path:
    from shared_models.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.8))
    colours = ["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive",
               "tab:cyan"]   # green is (a)'s and the targets' band
    for i, row in enumerate(rows):   # every curve starts at round 0, the pre-trained start (a)
        ax.plot(range(len(row["curve"]) + 1), [100 * start] + [100 * v for v in row["curve"]], "-o", markersize=3,
                color=colours[i % len(colours)], label=f"{row['setting']} ({row['runs']} run{'s' if row['runs'] > 1 else ''})")
    need = max(start + ABOVE_START, pooled - BELOW_POOLED)
    ax.axhspan(100 * need, 100 * pooled, color="tab:green", alpha=0.12,
               label="what the targets ask: ≥ (a) + 10 and ≥ (b) − 5")
    ax.axhline(100 * start, color="tab:green", linestyle="-.", label="(a) pre-trained start")
    ax.axhline(100 * pooled, color="black", linestyle="--", label=f"(b) pooled, no privacy, {pooled_epochs} epochs")
    ax.set_xlabel("round")
    ax.set_ylabel("schools' held-out students recognised (%)")
    ax.set_title("The federation round by round against issue 14's targets", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    path = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _print_table(rows: Sequence[Mapping[str, Any]], start: float, pooled: float) -> None:
    print(f"(a) start {start:.3f}   (b) pooled {pooled:.3f}   targets: ≥ {start + ABOVE_START:.3f} and ≥ "
          f"{pooled - BELOW_POOLED:.3f} in-domain, and 10 points over the best school alone")
    print(f"{'setting':28} {'runs':>4} {'in-domain':>9} {'vs (a)':>7} {'vs (b)':>7} {'vs (c)':>7}  all met")
    for row in rows:
        v = row["verdict"]
        alone = f"{v['over_alone_points']:+7.1f}" if "over_alone_points" in v else f"{'-':>7}"
        met = all(v[k] for k in v if k.endswith("_met"))
        print(f"{row['setting']:28} {row['runs']:>4} {row['indomain']:9.3f} {v['over_start_points']:+7.1f} "
              f"{-v['under_pooled_points']:+7.1f} {alone}  {'yes' if met else 'no'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="epsilon-curve result files, comma-separated")
    parser.add_argument("--only", default="", help="settings to show, comma-separated (e.g. 'ε 8,noise off')")
    parser.add_argument("--pooled", type=Path, required=True, help="a central-epochs result: (b)")
    parser.add_argument("--out", type=Path, required=True, help="the plot (.png); the table goes beside it as .json")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    try:
        records = [(f, json.loads(Path(f).read_text(encoding="utf-8"))) for f in args.runs.split(",") if f.strip()]
        starts = {round(float(r["start"]["indomain"]), 6) for _, r in records}
        if len(starts) != 1:
            raise ValueError(f"the files start from different models (in-domain {sorted(starts)})")
        start = starts.pop()
        epochs, pooled = pooled_reference(json.loads(args.pooled.read_text(encoding="utf-8")))
        rows = [row for f, r in records for row in settings_of(r, f, only)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"targets: cannot read the result files: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"targets: no setting matches --only {args.only!r}", file=sys.stderr)
        return 2
    for row in rows:
        row["verdict"] = verdict(row, start, pooled)
    _print_table(rows, start, pooled)
    figure = plot(rows, start, pooled, epochs, args.out)
    table = write_result(args.out.with_suffix(".json"), {
        "start_indomain": start, "pooled_indomain": pooled, "pooled_epochs": epochs, "pooled_source": str(args.pooled),
        "targets": {"over_start": ABOVE_START, "under_pooled": BELOW_POOLED, "over_alone": ABOVE_ALONE},
        "settings": rows}, module="simulations.bench.targets", argv=argv)
    print(f"wrote {figure} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
