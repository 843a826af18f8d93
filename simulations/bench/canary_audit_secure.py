"""The canary audit on the production randomness: how often it passes the correct trainer and flags each
breakage of the CSPRNG path, over repeated audits with fresh OS keys.

    python -m simulations.bench.canary_audit_secure [--repeats 5] [--seed 0]
        [--out benchmarks/canary-audit-secure.json]

Each setting is the one tests/test_privacy_canary_audit.py uses (there with keys from a fixed sequence, so
its verdict is one draw; here each audit keys its streams from the OS, so the spread shows how much margin
that verdict has). For every setting: the correct trainer and the broken copy ``--repeats`` times each on the
secure randomness, and the broken copy once on the reproducible (seeded torch) randomness, where it is the
correct trainer. Prints a table (setting, mechanism, randomness, claimed ε, f-DP and Steinke bounds as
min / median / max, how many audits flagged) and writes JSON with every audit's bounds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from pathlib import Path

from privacy.canary_audit import run_white_box_audit, tiny_model_builder
from simulations.bench.canary_audit import tiny_school
from simulations.bench.results import load_average, write_result
from simulations.broken_dp import FACTORIES

DELTA = 1e-5

#: name → (white-box settings, the breakage of the CSPRNG path it is sized for)
SETTINGS = {
    "q 1, claim ε 4, 10 steps, 8,000 canaries": (
        dict(canaries=8000, runs=16, epsilon=4.0, epochs=10), "secure_half_noise"),
    "per-sample clipping, claim ε 4, 10 steps, 2,000 canaries": (
        dict(canaries=2000, runs=4, epsilon=4.0, epochs=10, clipping="per-sample"), "secure_no_noise_per_sample"),
    "q ≈ 1/2, claim ε 5, 40 steps, likelihood score, 8,000 canaries": (
        dict(canaries=8000, runs=4, epsilon=5.0, epochs=20, units_per_batch=500, score="likelihood"),
        "secure_double_sample_rate"),
}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="units_per_batch .* exceeds")
    rows = []
    for setting, (settings, breakage) in SETTINGS.items():
        for mechanism, randomness, repeats in (("correct", "secure", args.repeats), (breakage, "secure", args.repeats),
                                               (breakage, "reproducible", 1)):
            audits = [_audit(settings, mechanism, randomness, args.seed + r) for r in range(repeats)]
            rows.append(_row(setting, mechanism, randomness, audits))
            print(_line(rows[-1]), flush=True)
    _print_table(rows)
    out = {"settings": {**vars(args), "out": str(args.out), "delta": DELTA, "beta": 0.05, "base_students": 8,
                        "model": "MLP 64-8-3 + canary probe", "frames_per_canary": 2,
                        "audits": {name: s for name, (s, _) in SETTINGS.items()}},
           "load_average_at_end": load_average(), "rows": rows}
    write_result(args.out, out, module="simulations.bench.canary_audit_secure", argv=argv)
    print(f"wrote {args.out}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="audits per mechanism on the secure randomness")
    ap.add_argument("--seed", type=int, default=0, help="first audit seed (the canaries' coins; audit r: seed + r)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/canary-audit-secure.json"))
    return ap.parse_args(argv)


def _audit(settings: dict, mechanism: str, randomness: str, seed: int) -> dict:
    x, y, units = tiny_school()
    res = run_white_box_audit(x, y, units, tiny_model_builder((1, 8, 8), 3, 8), frames_per_canary=2, num_classes=3,
                              delta=DELTA, seed=seed, trainer_factory=FACTORIES[mechanism], mechanism=mechanism,
                              randomness=randomness, **settings)
    return {"seed": seed, "claimed_epsilon": res.claimed_epsilon, "steinke": res.bounds["steinke"].epsilon,
            "fdp": res.bounds["fdp"].epsilon, "bound_above_claim": res.bound_above_claim,
            "sample_rate": res.sample_rate, "steps": res.steps, "noise_multiplier": res.noise_multiplier,
            "clipping": res.settings["clipping"], "seconds": round(res.seconds, 1)}


def _row(setting: str, mechanism: str, randomness: str, audits: list[dict]) -> dict:
    def spread(key: str) -> list[float]:
        values = sorted(a[key] for a in audits)
        return [round(values[0], 2), round(statistics.median(values), 2), round(values[-1], 2)]

    return {"setting": setting, "mechanism": mechanism, "randomness": randomness, "audits": len(audits),
            "claimed_epsilon": round(max(a["claimed_epsilon"] for a in audits), 3),
            "fdp_min_median_max": spread("fdp"), "steinke_min_median_max": spread("steinke"),
            "flagged": sum(a["bound_above_claim"] for a in audits), "each": audits}


def _line(row: dict) -> str:
    fdp, steinke = row["fdp_min_median_max"], row["steinke_min_median_max"]
    claim = "∞" if math.isinf(row["claimed_epsilon"]) else f"{row['claimed_epsilon']:.2f}"
    return (f"{row['setting'][:44]:44s} {row['mechanism']:28s} {row['randomness']:12s} {claim:>6s} "
            f"{fdp[0]:5.2f} {fdp[1]:5.2f} {fdp[2]:5.2f}   {steinke[0]:5.2f} {steinke[1]:5.2f} {steinke[2]:5.2f}"
            f"   {row['flagged']}/{row['audits']}")


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'setting':44s} {'mechanism':28s} {'randomness':12s} {'claim':>6s} {'f-DP min/median/max':>19s}   "
          f"{'Steinke min/median/max':>22s}   flagged")
    for row in rows:
        print(_line(row))


if __name__ == "__main__":
    raise SystemExit(main())
