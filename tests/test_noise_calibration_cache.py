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
