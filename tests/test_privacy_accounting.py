"""Lifetime accounting, budget guard, planner, and the one-run audit statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from privacy.accounting import (AccountingError, SchoolAccountant, calibrate_noise, compress_history,
                                dataset_fingerprint, epsilon_of, epsilon_report)
from privacy.budget import BUDGET_EXHAUSTED, check_budget
from privacy.empirical_audit import audit_scores, epsilon_lower_bound, p_value

DELTA = 1e-5


def test_fingerprint_is_stable_and_row_sensitive():
    rows = ["path,label,student_id", "a.png,happy,s1", "b.png,sad,s2"]
    assert dataset_fingerprint(rows) == dataset_fingerprint([r.encode() for r in rows])
    assert dataset_fingerprint(rows) == dataset_fingerprint([r + "\n" for r in rows])
    assert dataset_fingerprint(rows) != dataset_fingerprint(rows[:2] + ["b.png,sad,s3"])
    assert dataset_fingerprint(["ab"]) != dataset_fingerprint(["a", "b"])


def test_prv_matches_opacus_and_compression_is_exact():
    from opacus.accountants import PRVAccountant

    ref = PRVAccountant()
    ref.history = [(1.0, 0.125, 8)]
    assert epsilon_of([(1.0, 0.125, 8)], DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-3)
    rounds = [(1.0, 0.125, 4)] * 2
    assert epsilon_of(rounds, DELTA) == pytest.approx(epsilon_of([(1.0, 0.125, 8)], DELTA), rel=1e-12)
    assert compress_history([(1.0, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.1, 2), (1.0, 0.0, 9), (3.0, 0.1, 0)]) == \
        [(1.0, 0.1, 5), (2.0, 0.1, 1)]
    assert epsilon_of([(1.0, 0.125, 8)], DELTA, "rdp") == pytest.approx(3.7934, abs=1e-3)  # Opacus RDP figure


def test_prv_agrees_with_google_pld_within_one_percent():
    dp_accounting = pytest.importorskip("dp_accounting")
    history = [(1.1, 0.25, 24), (1.5, 0.25, 16), (0.9, 0.1, 30)]
    pld = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                          value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    ours = epsilon_of(history, DELTA)
    assert ours == pytest.approx(pld.get_epsilon(DELTA), rel=0.01)


def test_tiny_and_huge_epsilon_do_not_crash():
    tiny = epsilon_report([(50.0, 0.001, 1)], DELTA)
    assert tiny.method == "prv" and 0 <= tiny.epsilon < 0.05
    huge = epsilon_report([(0.3, 0.5, 1000)], DELTA)
    assert huge.method == "rdp-fallback" and huge.epsilon > 100 and math.isfinite(huge.epsilon)
    assert epsilon_of([], DELTA) == 0.0
    assert math.isinf(epsilon_of([(0.0, 0.1, 3)], DELTA))
    with pytest.raises(AccountingError, match="sample_rate"):
        epsilon_of([(1.0, 1.5, 3)], DELTA)


def test_accountant_persists_and_rerun_on_same_data_continues(tmp_path):
    fp = dataset_fingerprint(["x"])
    acct = SchoolAccountant(tmp_path, "s1", fp)
    acct.record(1.0, 0.125, 8)
    acct.record(1.0, 0.125, 8)
    state = json.loads((tmp_path / f"accountant-{fp[:16]}.json").read_text())
    assert state["history"] == [[1.0, 0.125, 8], [1.0, 0.125, 8]]
    rerun = SchoolAccountant(tmp_path, "s1", fp)  # a new run, same school, same data
    assert rerun.history == [(1.0, 0.125, 8)] * 2
    assert rerun.epsilon(DELTA) == pytest.approx(epsilon_of([(1.0, 0.125, 16)], DELTA))
    assert rerun.epsilon_if(1.0, 0.125, 8, DELTA) == pytest.approx(epsilon_of([(1.0, 0.125, 24)], DELTA))
    assert rerun.history == [(1.0, 0.125, 8)] * 2  # epsilon_if records nothing
    other = SchoolAccountant(tmp_path, "s1", dataset_fingerprint(["y"]))  # new data: a fresh history
    assert other.history == []
    with pytest.raises(AccountingError, match="belongs to school 's1'"):
        SchoolAccountant(tmp_path, "s2", fp)
    (tmp_path / f"accountant-{fp[:16]}.json").write_text("{broken")
    with pytest.raises(AccountingError, match="unreadable accountant state"):
        SchoolAccountant(tmp_path, "s1", fp)


def test_budget_guard_stops_exactly_at_the_first_crossing_round(tmp_path):
    acct = SchoolAccountant(tmp_path, "s1", dataset_fingerprint(["z"]))
    planned, budget = (1.0, 0.1, 10), 6.0
    trained = 0
    for _ in range(40):
        decision = check_budget(acct, planned, DELTA, budget)
        if not decision.allowed:
            break
        assert decision.reason == "" and decision.epsilon_after <= budget
        acct.record(*planned)
        trained += 1
    assert decision.reason == BUDGET_EXHAUSTED
    assert epsilon_of([(1.0, 0.1, 10 * trained)], DELTA) <= budget < epsilon_of([(1.0, 0.1, 10 * (trained + 1))], DELTA)
    assert decision.epsilon_now == pytest.approx(acct.epsilon(DELTA)) and trained >= 2
    assert not check_budget(acct, planned, DELTA, budget).allowed  # and it stays refused
    assert check_budget(acct, planned, DELTA, None).allowed


def test_calibration_and_planner_are_consistent(capsys):
    from fedfer.cli import main as fedfer_main
    from privacy.planner import make_plan, sampling

    assert sampling(48, 16) == (pytest.approx(1 / 3), 3)
    plan = make_plan(4.0, DELTA, rounds=4, local_epochs=1, units=48, batch=16)
    assert plan.total_steps == 12 and plan.noise_multiplier > 0.5
    eps = [p["epsilon_prv"] for p in plan.curve]
    assert [p["round"] for p in plan.curve] == [1, 2, 3, 4]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert 4.0 - 0.02 <= eps[-1] <= 4.0
    assert all(p["epsilon_rdp"] >= p["epsilon_prv"] for p in plan.curve)
    assert calibrate_noise(4.0, DELTA, 1 / 3, 12) == pytest.approx(plan.noise_multiplier)
    code = fedfer_main(["privacy", "plan", "--epsilon", "4", "--delta", "1e-5", "--rounds", "4", "--local-epochs", "1",
                        "--students", "48", "--batch", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["noise_multiplier"] == pytest.approx(plan.noise_multiplier)


# ------------------------------------------------------------------ one-run audit statistics
def test_p_value_without_delta_is_the_binomial_tail_and_bound_inverts_it():
    # r perfect guesses: p-value = p_eps ** r, so the bound is logit(beta ** (1/r))
    r, beta = 100, 0.05
    p = beta ** (1 / r)
    assert p_value(r, r, r, math.log(p / (1 - p)), 0.0) == pytest.approx(beta, rel=1e-9)
    assert epsilon_lower_bound(r, r, r, 0.0, beta) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert epsilon_lower_bound(1000, 1000, 500, DELTA) == 0.0  # chance level: nothing learned
    assert p_value(1000, 100, 90, 2.0, 1e-3) > p_value(1000, 100, 90, 2.0, 0.0)  # δ only loosens


def _randomized_response(eps: float, m: int, rng: np.random.Generator):
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    # a score whose sign is an eps-DP randomized response of membership
    sign = np.where(included == truthful, 1.0, -1.0)
    return sign * rng.random(m), included


def test_lower_bound_on_simulated_eps_dp_guesses_is_valid_and_informative():
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(20):
        scores, included = _randomized_response(1.0, 1000, rng)
        bounds.append(audit_scores(scores, included, DELTA, beta=0.05, ks=[500]).epsilon_lb)
    assert sum(b > 1.0 for b in bounds) <= 3  # exceeds the truth with probability <= beta
    assert np.median(bounds) > 0.6           # and is not vacuous
    scores, included = _randomized_response(1.0, 1000, rng)
    best = audit_scores(scores, included, DELTA)
    assert best.ks_tried == [50, 100, 200, 300, 500] and best.epsilon_lb <= 1.0 + 0.3
    chance = audit_scores(rng.random(400), rng.random(400) < 0.5, DELTA)
    assert chance.epsilon_lb < 0.5


def test_canary_harness_runs_the_dp_trainer_and_reports_a_bound(tmp_path):
    import torch

    from privacy.empirical_audit import run_canary_audit, tiny_model_builder

    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 3, (40,), generator=g)
    units = [f"s{i % 10}" for i in range(40)]
    res = run_canary_audit(x, y, units, tiny_model_builder((1, 8, 8), num_classes=3, hidden=16), canaries=40,
                           epsilon=4.0, epochs=1, units_per_batch=8, frames_per_unit=2, num_classes=3, seed=1)
    assert res.dp and res.claimed_epsilon == pytest.approx(4.0, abs=0.02)
    assert res.units == 10 + res.included and res.bound.m == 40
    assert 0 <= res.bound.epsilon_lb <= res.claimed_epsilon
    assert res.steps == round(1 / res.sample_rate)


# -- many distinct (σ, q) and extreme σ (issue 20) -------------------------------------------------
def _many_pairs(n: int) -> list[tuple[float, float, int]]:
    rng = np.random.default_rng(n)
    return [(float(1.5 + 2 * a), float(0.05 + 0.25 * b), 6) for a, b in rng.random((n, 2))]


def test_vectorised_rdp_is_opacus_rdp():
    from opacus.accountants.analysis.rdp import compute_rdp

    from privacy.accounting import _INTEGER_ORDERS, _rdp_one_step, _rdp_orders

    for sigma, q in [(0.3, 0.5), (0.8, 0.01), (1.0, 0.125), (2.7, 0.3), (6.0, 0.9), (50.0, 0.05)]:
        for orders in (_rdp_orders(), _INTEGER_ORDERS):
            ref = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)))
            ours = _rdp_one_step.__wrapped__(sigma, q, orders)
            assert np.allclose(ours, ref, rtol=1e-7, atol=1e-12), (sigma, q, len(orders))


def test_many_distinct_pairs_agree_with_dp_accounting_and_stay_above_pld():
    dp_accounting = pytest.importorskip("dp_accounting")
    from privacy.accounting import PRV_MAX_DISTINCT_PAIRS

    history = _many_pairs(PRV_MAX_DISTINCT_PAIRS + 8)
    report = epsilon_report(history, DELTA)
    assert report.method == "rdp-fallback" and "distinct" in report.note
    rdp = dp_accounting.rdp.RdpAccountant(list(range(2, 65)))
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-2)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        rdp.compose(event, steps)
        pld.compose(event, steps)
    assert report.epsilon == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-6)  # same bound, other code
    tight = pld.get_epsilon(DELTA)
    assert tight <= report.epsilon <= 1.25 * tight  # a valid upper bound, and not a useless one
    # below the limit PRV still answers, close to the PLD figure
    few = history[:6]
    pld_few = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in few:
        pld_few.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert epsilon_report(few, DELTA).method == "prv"
    assert epsilon_of(few, DELTA) == pytest.approx(pld_few.get_epsilon(DELTA), rel=0.01)


def test_running_rdp_matches_the_rdp_of_each_prefix():
    from privacy.accounting import PRV_MAX_DISTINCT_PAIRS, RunningRdp

    history = _many_pairs(PRV_MAX_DISTINCT_PAIRS + 4)
    history[3] = history[1]  # a repeated pair merges, as in compress_history
    running = RunningRdp()
    for k, entry in enumerate(history, start=1):
        running.add(*entry)
        if k in (1, 4, PRV_MAX_DISTINCT_PAIRS, PRV_MAX_DISTINCT_PAIRS + 1, len(history)):
            assert running.epsilon(DELTA) == pytest.approx(epsilon_of(history[:k], DELTA, "rdp"), rel=1e-9), k


def test_audit_of_a_many_pair_signed_history_recomputes_epsilon(tmp_path):
    from privacy.audit import run_audit
    from privacy.bench_distinct_pairs import distinct_history, write_signed_history

    history = distinct_history(60)
    state = tmp_path / "school-00"
    state.mkdir()
    report = run_audit([write_signed_history(state, "school-00", history)])
    assert report.exit_code == 0, report.rows[0].problems
    assert report.rows[0].epsilon_prv == pytest.approx(epsilon_of(history, DELTA), rel=1e-12)
    assert report.rows[0].prv_method == "rdp-fallback"


@pytest.mark.parametrize("sigma", [1e-300, 1e-5, 1e300, 1e6])
def test_extreme_noise_multipliers_give_a_bound_not_a_traceback(sigma, tmp_path):
    from privacy.accounting import SIGMA_CEILING
    from privacy.audit import run_audit
    from privacy.bench_distinct_pairs import write_signed_history

    for kind in ("prv", "rdp"):
        report = epsilon_report([(sigma, 0.1, 10)], DELTA, kind)
        if sigma < 1:
            assert math.isinf(report.epsilon) and "noise" in report.note
        else:  # more noise than the ceiling is accounted at the ceiling: an upper bound, ≥ the true ε
            assert report.epsilon == epsilon_of([(SIGMA_CEILING, 0.1, 10)], DELTA, kind) and "above" in report.note
    state = tmp_path / "school"
    state.mkdir()
    audit = run_audit([write_signed_history(state, "school", [(1.0, 0.1, 5), (sigma, 0.1, 10)])])
    assert audit.exit_code == 0, audit.rows[0].problems
