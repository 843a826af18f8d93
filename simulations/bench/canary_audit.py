"""Benchmark of the canary audit: how tight it is, and that it catches broken mechanisms.

    python -m simulations.bench.canary_audit [--canaries 16000] [--runs 32] [--epsilon 4] [--seed 0]
        [--randomness secure|reproducible] [--out benchmarks/canary-audit.json]

Rows: the ideal Gaussian mechanism (pure numpy) at the papers' claims ε 9.99 and 4.37 (δ 1e-5), with
the audit's grid correction and with k planned in advance as the papers do; the
real student-level trainer audited white-box at claimed ε 8 and at ε 4 (the test suite's claim, with
its four broken copies from ``simulations.broken_dp``); and the trainer with the noise off. Prints a
table (mechanism, claimed ε, Steinke bound, f-DP bound, canaries, seconds) and writes JSON with the
command and the resolved settings. The trainer rows draw from the CSPRNG a school trains with (``--randomness
secure``, the default) or replay on seeded torch generators (``reproducible``; how benchmarks/canary-audit.json
was measured, before the audit could use the CSPRNG). The breakages of the CSPRNG path alone:
simulations/bench/canary_audit_secure.py.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import numpy as np

from privacy.canary_audit import (bounds_exceed_claim, gaussian_sigma, one_run_bounds, plan_guesses,
                                  run_white_box_audit, simulate_gaussian_canaries, tiny_model_builder)
from simulations.broken_dp import FACTORIES, MUTATIONS
from simulations.bench.results import write_result

DELTA = 1e-5


def tiny_school():
    """The test suite's school: 8 students of 4 random 8×8 frames, 3 classes (also the CSPRNG bench's)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 3, (32,), generator=g)
    return x, y, [f"s{i % 8}" for i in range(32)]


def _row(mechanism: str, claimed: float | None, bounds: dict, canaries: int, seconds: float, **extra) -> dict:
    return {"mechanism": mechanism, "claimed_epsilon": claimed,
            "steinke": bounds["steinke"].epsilon if math.isfinite(bounds["steinke"].epsilon) else None,
            "fdp": bounds["fdp"].epsilon if math.isfinite(bounds["fdp"].epsilon) else None,
            "canaries": canaries, "seconds": round(seconds, 1),
            "bound_above_claim": claimed is not None and bounds_exceed_claim(bounds, claimed), **extra}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="units_per_batch .* exceeds")
    rows = _ideal_rows(args) + _trainer_rows(args)
    _print_table(rows)
    _write_json(args, argv, rows)
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", type=int, default=16000, help="canaries for the real-trainer rows")
    ap.add_argument("--runs", type=int, default=32)
    ap.add_argument("--ideal-canaries", type=int, default=100_000)
    ap.add_argument("--epsilon", type=float, default=4.0, help="claim for the mutation rows")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--frames", type=int, default=2, help="frames per canary student")
    ap.add_argument("--subsampled-batch", type=int, default=64,
                    help="students per step for the one subsampled row (q about batch / students per run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--randomness", choices=("secure", "reproducible"), default="secure",
                    help="the trainer rows' draws: the production CSPRNG, or seeded torch generators (a replay)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/canary-audit.json"))
    return ap.parse_args(argv)


def _ideal_rows(args: argparse.Namespace) -> list[dict]:
    """The ideal Gaussian mechanism at the papers' claims: k from the grid, and k planned in advance."""
    rows = []
    rng = np.random.default_rng(args.seed)
    for claim in (9.99, 4.37):
        sigma = gaussian_sigma(claim, DELTA)

        def simulate(g, sigma=sigma):
            return simulate_gaussian_canaries(args.ideal_canaries, sigma, 1.0, 1, g)

        started = time.perf_counter()
        scores, included = simulate(rng)
        rows.append(_row(f"ideal Gaussian σ {sigma:.2f}, k grid, 95 % joint", claim,
                         one_run_bounds(scores, included, DELTA), args.ideal_canaries, time.perf_counter() - started))
        print(rows[-1], flush=True)
        started = time.perf_counter()
        planned = plan_guesses(simulate, DELTA, beta=0.1, seed=args.seed + 99)
        rows.append(_row(f"ideal Gaussian σ {sigma:.2f}, k planned, 95 % each", claim,
                         one_run_bounds(scores, included, DELTA, beta=0.1, planned_k=planned), args.ideal_canaries,
                         time.perf_counter() - started, planned_k=planned))
        print(rows[-1], flush=True)
    return rows


def _trainer_rows(args: argparse.Namespace) -> list[dict]:
    """The real student-level trainer audited white-box: correct, subsampled, broken copies, DP off."""
    x, y, units = tiny_school()
    net = tiny_model_builder((1, 8, 8), 3, 8)
    common = dict(canaries=args.canaries, runs=args.runs, epochs=args.epochs, frames_per_canary=args.frames,
                  num_classes=3, seed=args.seed, delta=DELTA, randomness=args.randomness)
    # (mechanism, claimed ε, extra settings); q = 1 unless a batch is given
    subsampled = dict(units_per_batch=args.subsampled_batch, score="likelihood")
    plan = ([("correct", 8.0, {}), ("correct", 8.0, subsampled), ("correct", args.epsilon, {})]
            + [(m, args.epsilon, {}) for m in MUTATIONS] + [("correct", None, {})])
    rows = []
    for name, eps, extra in plan:
        res = run_white_box_audit(x, y, units, net, epsilon=eps, trainer_factory=FACTORIES[name], mechanism=name,
                                  **common, **extra)
        claimed = None if math.isinf(res.claimed_epsilon) else res.claimed_epsilon
        label = (f"real trainer, {name.replace('_', ' ')}" + ("" if eps is not None else ", DP off")
                 + (f", q {res.sample_rate:.2f}, {res.steps} steps, {res.score} score" if extra else ""))
        rows.append(_row(label, claimed, res.bounds, res.canaries, res.seconds, target_epsilon=eps,
                         noise_multiplier=res.noise_multiplier, sample_rate=res.sample_rate, steps=res.steps,
                         score=res.score, best_k={k: b.k for k, b in res.bounds.items()}))
        print(rows[-1], flush=True)
    return rows


def _print_table(rows: list[dict]) -> None:
    def fmt(v):
        return "∞" if v is None else f"{v:.2f}"

    print(f"\n{'mechanism':64s} {'claimed ε':>9s} {'Steinke':>8s} {'f-DP':>7s} {'canaries':>9s} {'seconds':>8s}  verdict")
    for r in rows:
        verdict = "bound above claim" if r["bound_above_claim"] else "consistent"
        print(f"{r['mechanism']:64s} {fmt(r['claimed_epsilon']):>9s} {fmt(r['steinke']):>8s} {fmt(r['fdp']):>7s} "
              f"{r['canaries']:>9d} {r['seconds']:>8.1f}  {verdict}")


def _write_json(args: argparse.Namespace, argv: list[str] | None, rows: list[dict]) -> None:
    """The rows with the command and the resolved settings."""
    out = {"settings": {**vars(args), "out": str(args.out), "delta": DELTA, "beta": 0.05, "score": "sum",
                        "sample_rate": 1.0, "base_students": 8, "model": "MLP 64-8-3 + canary probe"},
           "rows": rows}
    write_result(args.out, out, module="simulations.bench.canary_audit", argv=argv)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
