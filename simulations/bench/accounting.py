"""Benchmark: how long the privacy accounting takes at realistic history lengths.

    python -m simulations.bench.accounting [--out benchmarks/privacy-accounting.json]

Prints a table and writes JSON (with the command). Each figure is a fresh process-level computation
(caches cleared), so it is what a client pays once per round and the auditor once per entry.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from simulations.bench.results import write_result


def _timed(fn):
    from privacy import accounting

    accounting._epsilon_report.cache_clear()
    accounting._rdp_one_step.cache_clear()
    accounting.calibrate_noise.cache_clear()
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/privacy-accounting.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from privacy.accounting import calibrate_noise, epsilon_of
    from privacy.audit import run_audit

    epsilon_of([(1.0, 0.1, 1)], 1e-5)  # import opacus/torch outside the timings
    q, delta = 16 / 48, 1e-5
    rows = []

    def add(name, fn):
        value, seconds = _timed(fn)
        rows.append({"case": name, "value": value, "seconds": round(seconds, 3)})
        print(f"{name:<62} {value:>10.4f} {seconds:>8.2f} s", flush=True)

    print(f"{'case':<62} {'value':>10} {'time':>10}")
    sigma = 1.9
    add("ε PRV, 50 rounds × 6 steps, one (σ, q)", lambda: epsilon_of([(sigma, q, 6)] * 50, delta))
    add("ε RDP, same history", lambda: epsilon_of([(sigma, q, 6)] * 50, delta, "rdp"))
    add("ε PRV, 50 rounds in 5 runs with 5 different σ", lambda: epsilon_of(
        [(sigma + 0.1 * (r // 10), q, 6) for r in range(50)], delta))
    add("ε PRV, 50 rounds with 50 different σ (worst case)", lambda: epsilon_of(
        [(sigma + 0.01 * r, q, 6) for r in range(50)], delta))
    add("σ for ε=8 over 12 rounds × 2 epochs (default config)", lambda: calibrate_noise(8.0, delta, q, 12 * 6))
    add("σ for ε=8 over 50 rounds × 2 epochs", lambda: calibrate_noise(8.0, delta, q, 50 * 6))

    # a whole run directory: 6 schools × 50 rounds, audited end to end
    with tempfile.TemporaryDirectory() as tmp:
        from privacy.accounting import SchoolAccountant, dataset_fingerprint
        from privacy.ledger import SchoolLedger, ServerLedgerCopy, record_round
        from privacy.signing import load_or_create_signing_key

        run_dir = Path(tmp) / "run"
        for s in range(6):
            name = f"school-{s:02d}"
            state = Path(tmp) / name
            key = load_or_create_signing_key(state)
            ledger = SchoolLedger(state, name, key)
            acct = SchoolAccountant(state, name, dataset_fingerprint([name]))
            ServerLedgerCopy.store_public_key(run_dir, name, key.public_key())
            for r in range(1, 51):
                e = record_round(acct, ledger, run_id="bench", round=r, privacy_unit="student", noise_multiplier=sigma,
                                 sample_rate=q, steps=6, max_grad_norm=1.0, delta=delta, budget=100.0)
                ServerLedgerCopy.append_verified(run_dir, name, e, key.public_key())
        add("fedfer privacy audit RUN_DIR: 6 schools × 50 rounds (exit code)", lambda: float(run_audit([run_dir]).exit_code))
        add("same with --every-entry (PRV at all 300 entries; exit code)",
            lambda: float(run_audit([run_dir], every_entry=True).exit_code))

    write_result(args.out, {"threads": 1, "rows": rows}, module="simulations.bench.accounting")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
