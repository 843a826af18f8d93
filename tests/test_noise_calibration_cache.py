"""calibrate_noise keeps its results on disk (a deployed school runs each message in a fresh process),
and never trusts a stored σ that would overshoot the target ε."""

from __future__ import annotations

import json

from privacy import accounting


def test_stored_sigma_is_reused_only_when_it_keeps_the_target(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFER_CACHE_DIR", str(tmp_path))
    accounting.calibrate_noise.cache_clear()
    args = (4.0, 1e-5, 0.25, 8, "rdp")
    sigma = accounting.calibrate_noise(*args)
    stored = json.loads(accounting.calibration_cache_path().read_text())
    assert list(stored.values()) == [sigma]
    key = next(iter(stored))

    accounting.calibrate_noise.cache_clear()   # a fresh process: the disk answers
    monkeypatch.setattr(accounting, "_bisect_noise", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert accounting.calibrate_noise(*args) == sigma

    # a stored σ too small for the target (stale or tampered) is recomputed, not used
    accounting.calibration_cache_path().write_text(json.dumps({key: sigma / 4}))
    monkeypatch.undo()
    monkeypatch.setenv("FEDFER_CACHE_DIR", str(tmp_path))
    accounting.calibrate_noise.cache_clear()
    assert accounting.calibrate_noise(*args) == sigma
    assert accounting.epsilon_of([(sigma, 0.25, 8)], 1e-5, "rdp") <= 4.0
    accounting.calibrate_noise.cache_clear()


def test_a_target_the_accountant_cannot_reach_ends_with_a_sigma_within_it(tmp_path, monkeypatch):
    """ε 10^6 (or 1e308) at q 0.27: Opacus' bisection halved σ towards 0 for good (`fedfer privacy plan
    --epsilon 1e308` never returned, and a run-config's privacy.target_epsilon=1e6 would hang every school);
    the bisection now stops at a σ precision and a halving count, and what it returns keeps the target."""
    import pytest

    monkeypatch.setenv("FEDFER_CACHE_DIR", str(tmp_path))
    calls = []
    original = accounting._bisect_noise
    monkeypatch.setattr(accounting, "_bisect_noise", lambda *a: calls.append(a) or original(*a))
    for target in (1e6, 1e308):
        accounting.calibrate_noise.cache_clear()
        sigma = accounting.calibrate_noise(target, 1e-5, 0.2667, 24, "prv")
        assert sigma > 0 and accounting.epsilon_of([(sigma, 0.2667, 24)], 1e-5, "prv") <= target
    assert len(calls) == 2
    with pytest.raises(accounting.AccountingError, match="too low"):   # the other end: unchanged
        accounting.calibrate_noise(1e-9, 1e-5, 1.0, 1000, "rdp")


def test_the_bisection_finds_the_sigma_opacus_finds(tmp_path, monkeypatch):
    """The stop changes nothing for a reachable target: the same σ as Opacus' get_noise_multiplier."""
    import warnings

    import numpy as np
    from opacus.accountants.utils import get_noise_multiplier

    for accountant, target, q, steps in (("prv", 8.0, 0.2667, 24), ("rdp", 1.0, 0.05, 1000), ("rdp", 50.0, 0.2667, 24)):
        mechanism = accounting._register_prv() if accountant == "prv" else "rdp"
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps,
                                          accountant=mechanism, epsilon_tolerance=0.01)
        assert accounting._bisect_noise(target, 1e-5, q, steps, accountant, 0.01) == theirs
