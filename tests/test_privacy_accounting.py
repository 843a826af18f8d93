"""Lifetime accounting, budget guard and planner (the canary audit: tests/test_privacy_canary_audit.py)."""

from __future__ import annotations

import json
import math

import pytest

from privacy.accounting import (AccountingError, SchoolAccountant, calibrate_noise, compress_history,
                                dataset_fingerprint, epsilon_of, epsilon_report)
from privacy.budget import BUDGET_EXHAUSTED, check_budget

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


@pytest.mark.parametrize("points", ["0", "-3", "1"])
def test_plan_refuses_fewer_than_two_curve_points_in_one_line(capsys, points):
    """`privacy plan --points 0` (or negative) printed a two-row curve as if asked for it; now refused, naming
    the flag, before any accounting."""
    from fedfer.cli import main as fedfer_main

    code = fedfer_main(["privacy", "plan", "--epsilon", "4", "--delta", "1e-5", "--rounds", "4", "--local-epochs", "1",
                        "--students", "48", "--batch", "16", "--points", points])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err == f"fedfer privacy plan: --points must be at least 2 (the first and the " \
                                               f"last round), got {points}\n", err


@pytest.mark.parametrize("text", ["[" * 100_000, '{"history": [], "x": ' + "9" * 5000 + "}", b"\xff\xfe"],
                         ids=["deep", "5000-digit", "not-utf8"])
def test_a_damaged_accountant_file_is_an_accounting_error_naming_it(tmp_path, text):
    """RecursionError, ValueError and UnicodeDecodeError escaped the accountant (a school's round then failed
    with Python's message instead of its one-line refusal naming the file)."""
    from privacy.accounting import AccountingError, SchoolAccountant

    acct = SchoolAccountant(tmp_path, "school-a", "ab" * 8)
    acct.record(1.0, 0.1, 10)
    data = text if isinstance(text, bytes) else text.encode()
    acct.path.write_bytes(data)
    with pytest.raises(AccountingError, match="unreadable accountant state"):
        SchoolAccountant(tmp_path, "school-a", "ab" * 8)


def test_a_dataset_id_file_that_is_not_ascii_is_an_accounting_error(tmp_path):
    from privacy.accounting import DATASET_ID_FILE, AccountingError, school_dataset_id

    (tmp_path / DATASET_ID_FILE).write_bytes(b"\xff" * 32)
    with pytest.raises(AccountingError, match="not a dataset id"):
        school_dataset_id(tmp_path, "school-a")
