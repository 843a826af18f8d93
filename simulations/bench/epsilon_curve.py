"""What each ε costs: the default federation's accuracy at several student-level privacy budgets.

    python -m simulations.bench.epsilon_curve [--epsilons 1,2,4,8,16] [--repeats 3] [--alone 3]
        [--noise-free] [--workers 2] [--out benchmarks/epsilon-curve.json] [key=value ...]

For every ε (and, with `--noise-free`, once with the noise switched off: not private, the anchor that
shows what the noise costs), `--repeats` runs of the in-process federation of
`simulations/bench/pretraining.py` (the ClientApp's plan rule and trainer: σ calibrated so every school
ends its `federation.rounds` rounds at that ε) from the cached pre-trained start, and `--alone` schools
training alone under the same DP (the reason to federate, at that ε). Only ε changes: the step size and
everything else stay the config's, as a privacy officer who lowers the budget would run it. Every run
draws fresh DP noise, so the repeats are the spread. Prints a table, writes JSON with the command and the
resolved config, and a PNG beside it (accuracy against ε, every run a dot).

    python -m simulations.bench.epsilon_curve --replot A.json,B.json [--baseline C.json] --out M.json

runs nothing: it merges result files (more repeats of the same runs are pooled) into M.json and M.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from shared_models.config import ConfigError, load_config
from simulations.bench.results import load_average, write_result


def point_overrides(overrides: Sequence[str], epsilon: float | None, repeat: int) -> list[str]:
    """The key=value list of one run: the user's overrides, then this ε (budget and round cap raised to
    it so the guard's keys stay consistent) or the noise switched off, and the repeat as run.seed."""
    if epsilon is None:   # the noise-free anchor: not private (imported here: the module loads without torch)
        from simulations.references import NOISE_FREE_SIGMA

        point = [f"privacy.noise_multiplier={NOISE_FREE_SIGMA}"]
    else:
        point = [f"privacy.target_epsilon={epsilon:g}", f"privacy.budget={epsilon:g}",
                 f"privacy.max_round_epsilon={epsilon:g}"]
    return [*overrides, *point, f"run.seed={repeat}"]


def run_point(overrides: list[str], start_path: str, alone: str) -> dict[str, Any]:
    """One federation (and its schools alone) with `overrides`; the scores, σ and seconds. Runs in a worker."""
    import torch

    from shared_models.datasets.school_folder import load_school
    from shared_models.models import registry
    from simulations import synth
    from simulations.bench.pretraining import _alone_picks, _train_alone, federate
    from simulations.references import INDOMAIN, PUBLIC, Scorer

    cfg = load_config(None, overrides)
    torch.set_num_threads(int(cfg["train.threads"]))
    root = synth.ensure_for_config(cfg)
    start = torch.load(start_path, map_location="cpu", weights_only=True)["state_dict"]
    schools = [load_school(d) for d in sorted((root / "schools").iterdir()) if d.is_dir()]
    sizes = [s.num_students for s in schools]
    score = Scorer(root, int(registry.build_from_config(cfg).input_size), int(cfg["evaluation.bootstrap"]))
    rounds = int(cfg["federation.rounds"])
    started = time.perf_counter()
    fed = federate(cfg, schools, start, rounds, score, echo=lambda s: None)
    alone_scores = _train_alone(cfg, schools, sizes, _alone_picks(sizes, alone), start, rounds, score)
    best = max(alone_scores.values(), key=lambda r: r[INDOMAIN]["accuracy"], default=None)
    return {"overrides": overrides, "sigma": max(h["max_sigma"] for h in fed["history"]),
            "public": fed[PUBLIC], "indomain": fed[INDOMAIN], "history": fed["history"],
            "alone": {sid: {"students": r["students"], "public": r[PUBLIC]["accuracy"],
                            "indomain": r[INDOMAIN]["accuracy"], "own_school": r["own-school"]["accuracy"]}
                      for sid, r in alone_scores.items()},
            "best_alone_indomain": best[INDOMAIN]["accuracy"] if best else None,
            "seconds": round(time.perf_counter() - started, 1)}


def summarise(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over the repeats of one ε: federation in-domain and public, best school alone and
    the federation's margin over it (in points)."""
    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": round(float(np.mean(values)), 4), "min": round(min(values), 4), "max": round(max(values), 4)}

    fed = [p["indomain"]["accuracy"] for p in points]
    summary = {"runs": len(points), "sigma": points[0]["sigma"], "indomain": spread(fed),
               "public": spread([p["public"]["accuracy"] for p in points])}
    alone = [p["best_alone_indomain"] for p in points if p["best_alone_indomain"] is not None]
    if alone:
        summary["best_alone_indomain"] = spread(alone)
        summary["margin_over_alone_points"] = round(100 * (float(np.mean(fed)) - float(np.mean(alone))), 1)
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", default="1,2,4,8,16", help="comma-separated student-level ε values")
    parser.add_argument("--repeats", type=int, default=3, help="runs per ε (fresh DP noise each)")
    parser.add_argument("--alone", default="3", help="schools that also train alone at each ε ('all', a count, 0)")
    parser.add_argument("--noise-free", action="store_true", help="also one point with the noise off (not private)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/epsilon-curve.json"))
    parser.add_argument("--replot", default="", help="run nothing: merge these result files (comma-separated; a "
                        "setting's runs pooled over the files with the same resolved config as its first holder) "
                        "into --out and its .png")
    parser.add_argument("--baseline", type=Path, default=None, help="with --replot: a result file whose federation "
                                                                    "means are drawn as a dashed line for comparison")
    parser.add_argument("--baseline-label", default="earlier runs", help="the legend's name for --baseline")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _epsilons(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"--epsilons needs positive numbers, got {text!r}")
    return sorted(set(values))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.replot:
        return replot([Path(f) for f in args.replot.split(",") if f.strip()], args.out, args.baseline,
                      args.baseline_label, argv)
    from privacy.policy import check_config_epsilons

    try:
        epsilons = _epsilons(args.epsilons)
        cfg = load_config(None, args.overrides)
        for eps in epsilons:   # a bad ε or override is refused here, not in a worker half an hour later
            # privacy/policy.py's rule too: each point's ε becomes every school's budget (at most MAX_EPSILON)
            check_config_epsilons(load_config(None, point_overrides(args.overrides, eps, 0)), f"--epsilons {eps:g}")
    except (ConfigError, ValueError) as exc:
        print(f"epsilon curve: {exc}", file=sys.stderr)
        return 2
    from simulations import pretrain, synth
    from simulations.bench.pretraining import _home_relative

    started, load_before = time.perf_counter(), load_average()
    root = synth.ensure_for_config(cfg)
    start_path = (str(cfg["model.pretrained"]) if cfg["model.pretrained"]
                  else str(pretrain.ensure_pretrained(cfg, root, echo=lambda s: print("  " + s, flush=True))))
    start = start_score(cfg, root, start_path)
    print(f"(a) the pre-trained start: in-domain {start['indomain']:.3f}, public {start['public']:.3f}", flush=True)
    keys = [*epsilons, *([None] if args.noise_free else [])]
    jobs = [(eps, r) for r in range(args.repeats) for eps in keys]
    print(f"{len(jobs)} runs ({len(keys)} settings × {args.repeats}), {args.workers} at a time", flush=True)
    points: dict[str, list[dict[str, Any]]] = {_label(eps): [] for eps in keys}
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_point, point_overrides(args.overrides, eps, r), start_path, args.alone): (eps, r)
                   for eps, r in jobs}
        for done, future in enumerate(as_completed(futures), start=1):
            eps, r = futures[future]
            point = future.result()
            points[_label(eps)].append(point)
            print(f"  [{done}/{len(jobs)}] {_label(eps)} run {r + 1}: σ {point['sigma']:.2f}, in-domain "
                  f"{point['indomain']['accuracy']:.3f}, public {point['public']['accuracy']:.3f}, best alone "
                  f"{_fmt(point['best_alone_indomain'])} ({point['seconds']:.0f} s)", flush=True)
    summary = {label: summarise(runs) for label, runs in points.items()}
    _print_table(summary)
    out = write_result(args.out, {
        "config": cfg, "pretrained": _home_relative(start_path), "start": start,
        "summary": summary, "runs": points,
        "wall_seconds": round(time.perf_counter() - started, 1), "load_average": [load_before, load_average()],
        "notes": "in-process federation (simulations/bench/pretraining.py), FedAvgM with uniform weights; only ε varies",
    }, module="simulations.bench.epsilon_curve", argv=argv)
    figure = plot(summary, points, start, out.with_suffix(".png"),
                  title=f"What each privacy budget costs ({len(list((root / 'schools').iterdir()))} schools, "
                        f"{cfg['federation.rounds']} rounds, model {cfg['model.name']} {cfg['model.preset']})")
    print(f"wrote {out} and {figure}")
    return 0


def _label(epsilon: float | None) -> str:
    return "noise off" if epsilon is None else f"ε {epsilon:g}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_table(summary: Mapping[str, Mapping[str, Any]]) -> None:
    print(f"\n{'setting':<10} {'σ':>5} {'runs':>4}  {'federation in-domain (min-max)':<32} {'public':<22} "
          f"{'best school alone':<22} margin")
    for label, s in summary.items():
        def cell(m: Mapping[str, float] | None) -> str:
            return "-" if m is None else f"{m['mean']:.3f} ({m['min']:.3f}-{m['max']:.3f})"

        print(f"{label:<10} {s['sigma']:>5.2f} {s['runs']:>4}  {cell(s['indomain']):<32} {cell(s['public']):<22} "
              f"{cell(s.get('best_alone_indomain')):<22} {s.get('margin_over_alone_points', '-')}")


def merge_results(records: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[dict[str, list], dict[str, list[str]]]:
    """The runs of every setting across result files, in the files' order: a setting's runs are pooled over the
    files whose resolved config equals the first holder's (repeats of the same runs); any other file's runs of
    it (another step size, say) are left out. Returns the runs and the files each setting's runs came from."""
    points: dict[str, list] = {}
    sources: dict[str, list[str]] = {}
    configs: dict[str, Mapping[str, Any]] = {}
    for name, record in records:
        for label, runs in record["runs"].items():
            if label not in points:
                points[label], sources[label], configs[label] = [], [], record["config"]
            if _same_runs(configs[label], record["config"]):
                points[label].extend(runs)
                sources[label].append(name)
    return points, sources


def _same_runs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two resolved configs describe repeats of the same run (the seed aside: every run draws fresh DP noise)."""
    return {k: v for k, v in a.items() if k != "run.seed"} == {k: v for k, v in b.items() if k != "run.seed"}


def replot(files: Sequence[Path], path: Path, baseline: Path | None, baseline_label: str,
           argv: Sequence[str] | None = None) -> int:
    """The figure and a merged result file (`path` with .json) from result files already written."""
    import json

    try:
        records = [(str(f), json.loads(f.read_text(encoding="utf-8"))) for f in files]
        base = json.loads(baseline.read_text(encoding="utf-8"))["summary"] if baseline else None
        points, sources = merge_results(records)
        start, config = records[0][1]["start"], records[0][1]["config"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        print(f"epsilon curve: cannot replot from {', '.join(map(str, files))}: {exc}", file=sys.stderr)
        return 2
    summary = {label: summarise(runs) for label, runs in points.items()}
    _print_table(summary)
    out = write_result(path.with_suffix(".json"), {
        "config": config, "start": start, "summary": summary, "runs": points, "sources": sources,
        "baseline": str(baseline) if baseline else None,
        "notes": "merged from result files: a setting's runs pooled over the files whose resolved config is the same"},
        module="simulations.bench.epsilon_curve", argv=argv)
    title = f"What each privacy budget costs ({config['federation.schools']} schools, {config['federation.rounds']} rounds)"
    figure = plot(summary, points, start, path.with_suffix(".png"), title=title, baseline=base,
                  baseline_label=baseline_label)
    print(f"wrote {out} and {figure}")
    return 0


def start_score(cfg: Mapping[str, Any], root: Path, start_path: str) -> dict[str, float]:
    """(a): the pre-trained start's in-domain and public accuracy (the level the federation starts from)."""
    import torch

    from simulations.references import INDOMAIN, PUBLIC, Scorer, model_from

    state = torch.load(start_path, map_location="cpu", weights_only=True)["state_dict"]
    model = model_from(cfg, state)
    scores = Scorer(root, int(model.input_size), int(cfg["evaluation.bootstrap"]))(model)
    return {"indomain": scores[INDOMAIN]["accuracy"], "public": scores[PUBLIC]["accuracy"]}


def plot(summary: Mapping[str, Mapping[str, Any]], points: Mapping[str, Sequence[Mapping[str, Any]]],
         start: Mapping[str, float], path: Path, *, title: str, baseline: Mapping[str, Any] | None = None,
         baseline_label: str = "earlier runs") -> Path:
    """In-domain and public accuracy against ε (log axis): every run a dot, the means joined; the start, the
    noise-free anchor, the best school alone and (optionally) another set of runs' means as lines."""
    from shared_models.plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    private = sorted((float(label.split()[1]), label) for label in summary if label != "noise off")
    xs = [eps for eps, _ in private]
    for ax, key, heading in [(axes[0], "indomain", "the schools' own kind of faces (held-out students)"),
                           (axes[1], "public", "public test faces")]:
        for eps, label in private:
            ax.plot([eps] * len(points[label]), [100 * p[key]["accuracy"] for p in points[label]], "o",
                    color="tab:blue", alpha=0.45, markersize=4)
        ax.plot(xs, [100 * summary[label][key]["mean"] for _, label in private], "-", color="tab:blue",
                linewidth=2, label="federation (private), mean of runs")
        if key == "indomain" and all("best_alone_indomain" in summary[label] for _, label in private):
            ax.plot(xs, [100 * summary[label]["best_alone_indomain"]["mean"] for _, label in private], "--",
                    color="tab:orange", label="best school alone, same ε")
        ax.axhline(100 * start[key], color="tab:green", linestyle="-.", label="pre-trained start (public data only)")
        if baseline is not None:
            shown = sorted((float(label.split()[1]), s[key]["mean"]) for label, s in baseline.items() if label != "noise off")
            ax.plot([e for e, _ in shown], [100 * m for _, m in shown], "--", color="tab:purple", alpha=0.7,
                    label=f"federation, {baseline_label}")
        if "noise off" in summary:
            ax.axhline(100 * summary["noise off"][key]["mean"], color="tab:gray", linestyle=":",
                       label="same federation, noise off (not private)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel("student-level ε per school (δ 1e-5)")
        ax.set_title(heading, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_ylabel("expressions recognised correctly (%)")
    fig.suptitle(title, fontsize=12)
    path = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
