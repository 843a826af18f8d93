"""Benchmark: ``fedfer privacy audit`` of one school's signed history with many distinct (σ, q).

    python -m simulations.bench.accounting_distinct_pairs [--pairs 50,200,500,2000] [--out benchmarks/accounting-distinct-pairs.json]

A school whose σ or q changes every round (a new run per round, a changing cohort) has one distinct
(σ, q) per entry. Each case writes a signed, hash-chained ledger of `pairs` round entries, every one
with its own (σ, q), then times the whole audit (verification, RDP replay of every entry, PRV of the
last one) in a fresh cache, wall and CPU time (the machine may be shared). Every entry repeats its
dataset's history, so the ledger grows as pairs² (≈ 50 MB at 2,000): parsing and hashing it is the
floor of the audit's cost. The final ε is compared with dp-accounting (Google's independent
implementation): its RDP accountant at the same orders, and its PLD accountant (the tight figure
an upper bound must not fall below). Prints a table and writes JSON with the command.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from simulations.bench.results import write_result

DELTA = 1e-5
STEPS_PER_ROUND = 6


def distinct_history(pairs: int) -> list[tuple[float, float, int]]:
    """`pairs` rounds, each with its own (σ, q): σ in [1.5, 3.5), q in [0.05, 0.3) (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(pairs)
    sigmas = 1.5 + 2.0 * rng.random(pairs)
    qs = 0.05 + 0.25 * rng.random(pairs)
    return [(float(round(s, 6)), float(round(q, 6)), STEPS_PER_ROUND) for s, q in zip(sigmas, qs)]


def write_signed_history(state_dir: Path, school: str, history: list[tuple[float, float, int]],
                         delta: float = DELTA) -> Path:
    """A ledger.jsonl of one round entry per history element, signed like SchoolLedger.append writes
    it, but without re-verifying the whole file per append (that is O(n²) and not what is measured).
    Stored ε: PRV for the last entry (what the audit checks), RDP for every entry (checked too); the
    PRV field of earlier entries holds the RDP figure, a valid upper bound checked only by --every-entry."""
    from privacy.accounting import RunningRdp, epsilon_of
    from privacy.ledger import GENESIS_HASH, LEDGER_FILE, SCHEMA, _encode_eps, _line, entry_hash
    from privacy.signing import key_id, load_or_create_signing_key, public_key_pem, sign_hash

    key = load_or_create_signing_key(state_dir)
    (state_dir / "signing_key.pub").write_text(public_key_pem(key), encoding="ascii")
    prev, lines = GENESIS_HASH, []
    running = RunningRdp()
    for i, (sigma, q, steps) in enumerate(history):
        before = [list(h) for h in history[:i]]
        running.add(sigma, q, steps)
        eps_rdp = running.epsilon(delta)
        eps = epsilon_of(history[: i + 1], delta) if i == len(history) - 1 else eps_rdp
        eps, eps_rdp = _encode_eps(eps), _encode_eps(eps_rdp)
        entry: dict[str, Any] = {
            "schema": SCHEMA, "event": "round", "school_id": school, "dataset_fingerprint": "f" * 64,
            "run_id": f"run-{i}", "round": 1, "run_seq": 0, "privacy_unit": "student", "sample_rate": q,
            "noise_multiplier": sigma, "max_grad_norm": 1.0, "steps": steps, "delta": delta,
            "accountant": "prv", "history_before": before, "epsilon": eps, "epsilon_rdp": eps_rdp,
            "budget": None, "key_id": key_id(key), "timestamp": "2026-01-01T00:00:00+00:00", "prev_hash": prev,
        }
        entry["hash"] = entry_hash(entry)
        entry["signature"] = sign_hash(key, entry["hash"])
        prev = entry["hash"]
        lines.append(_line(entry))
    path = state_dir / LEDGER_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rdp_epsilon_dp_accounting(history: list[tuple[float, float, int]], delta: float = DELTA,
                              orders: tuple[float, ...] | None = None) -> float:
    """ε of the history by dp-accounting's RDP accountant (default: the integer orders 2-64)."""
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant(list(orders or range(2, 65)))
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


def pld_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """ε of the history by dp-accounting's PLD accountant (add/remove adjacency, as PRV's)."""
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


def _clear_caches() -> None:
    from privacy import accounting

    for name in ("_epsilon_report", "_rdp_one_step", "_prv_epsilon_cached"):
        cached = getattr(accounting, name, None)
        if cached is not None:
            cached.cache_clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="50,200,500,2000", help="comma-separated history lengths")
    parser.add_argument("--pld-max-pairs", type=int, default=500,
                        help="compute dp-accounting's PLD ε up to this many pairs (it takes minutes at 2000)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/accounting-distinct-pairs.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from privacy import accounting
    from privacy.accounting import epsilon_report
    from privacy.audit import run_audit

    epsilon_report([(1.0, 0.1, 1)], DELTA)  # imports outside the timings
    # wall time depends on what else runs on the machine; CPU time of this process much less
    load_at_start = round(os.getloadavg()[0], 2)
    rows = []
    print(f"{'pairs':>6} {'audit s':>8} {'cpu s':>6} {'exit':>5} {'ε (audit)':>10} {'method':>13} {'ε RDP dpa':>10} "
          f"{'ε PLD dpa':>10} {'PLD s':>7}")
    for pairs in (int(p) for p in args.pairs.split(",")):
        history = distinct_history(pairs)
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "school-00"
            state.mkdir()
            ledger = write_signed_history(state, "school-00", history)
            ledger_bytes = ledger.stat().st_size
            _clear_caches()
            started, cpu_started = time.perf_counter(), time.process_time()
            report = run_audit([ledger], trust_run_keys=True)   # the key written beside the ledger
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        row = report.rows[0]
        orders = None if row.prv_method == "rdp-fallback" else accounting._rdp_orders()
        rdp_dpa = rdp_epsilon_dp_accounting(history, orders=orders) if row.prv_method != "prv" else None
        pld, pld_s = None, None
        if pairs <= args.pld_max_pairs:
            started = time.perf_counter()
            pld = pld_epsilon(history)
            pld_s = time.perf_counter() - started
        rows.append({"pairs": pairs, "audit_seconds": round(seconds, 3), "audit_cpu_seconds": round(cpu, 3),
                     "ledger_mb": round(ledger_bytes / 2**20, 1), "exit_code": report.exit_code,
                     "epsilon": row.epsilon_prv, "method": row.prv_method, "problems": row.problems[:3],
                     "epsilon_rdp_dp_accounting": rdp_dpa, "epsilon_pld_dp_accounting": pld,
                     "pld_seconds": None if pld_s is None else round(pld_s, 3)})
        show = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        print(f"{pairs:>6} {seconds:>8.2f} {cpu:>6.2f} {report.exit_code:>5} {row.epsilon_prv:>10.4f} {row.prv_method:>13} "
              f"{show(rdp_dpa, '.4f'):>10} {show(pld, '.4f'):>10} {show(pld_s, '.1f'):>7}", flush=True)
    out = {
        "settings": {"delta": DELTA, "steps_per_round": STEPS_PER_ROUND, "sigma_range": [1.5, 3.5],
                     "q_range": [0.05, 0.3], "threads": 1, "pld_value_discretization_interval": 1e-3,
                     "prv_max_distinct_pairs": accounting.PRV_MAX_DISTINCT_PAIRS,
                     "load_average_1min_at_start": load_at_start, "cpu_count": os.cpu_count()},
        "rows": rows,
    }
    write_result(args.out, out, module="simulations.bench.accounting_distinct_pairs", argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
