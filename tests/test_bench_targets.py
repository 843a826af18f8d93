"""simulations/bench/targets.py: the settings' final accuracy against issue 14's three targets, from result files."""

from __future__ import annotations

import json

import pytest

from simulations.bench import targets


def _curve_file(path, rounds, runs, start=0.78, alone=None):  # noqa: ANN001, ANN202
    """An epsilon-curve result: {label: [in-domain per round for each run]}."""
    record = {"config": {"federation.rounds": rounds}, "start": {"indomain": start, "public": 0.9},
              "runs": {label: [{"history": [{"round": i + 1, "indomain": {"accuracy": v}, "public": 0.9}
                                            for i, v in enumerate(curve)], "public": {"accuracy": 0.9}}
                               for curve in curves]
                       for label, curves in runs.items()},
              "summary": {label: ({"best_alone_indomain": {"mean": alone}} if alone else {}) for label in runs}}
    path.write_text(json.dumps(record))
    return str(path)


def _pooled_file(path, indomain=0.93):  # noqa: ANN001, ANN202
    path.write_text(json.dumps({"curve": [{"epochs": 8, "synthetic-indomain": {"accuracy": 0.90}},
                                          {"epochs": 32, "synthetic-indomain": {"accuracy": indomain}}]}))
    return str(path)


def test_each_setting_is_judged_on_its_mean_final_round(tmp_path, capsys):
    six = _curve_file(tmp_path / "six.json", 2, {"ε 8": [[0.80, 0.84], [0.80, 0.82]], "ε 1": [[0.5, 0.6]]}, alone=0.79)
    long = _curve_file(tmp_path / "long.json", 3, {"noise off": [[0.82, 0.86, 0.89]]})
    out = tmp_path / "t.png"
    code = targets.main(["--runs", f"{six},{long}", "--only", "ε 8,noise off", "--pooled",
                         _pooled_file(tmp_path / "b.json"), "--out", str(out)])
    assert code == 0 and out.is_file()
    table = json.loads(out.with_suffix(".json").read_text())
    assert table["pooled_indomain"] == 0.93 and table["pooled_epochs"] == 32   # (b) at its longest training
    eight, off = table["settings"]
    assert eight["setting"] == "ε 8, 2 rounds" and eight["indomain"] == pytest.approx(0.83)
    assert eight["verdict"] == {"over_start_points": 5.0, "under_pooled_points": 10.0, "over_start_met": False,
                                "under_pooled_met": False, "over_alone_points": 4.0, "over_alone_met": False}
    # 0.89: +11 over (a), 4 under (b); no school alone was run for it, so that target is not judged
    assert off["verdict"]["over_start_met"] and off["verdict"]["under_pooled_met"] and "over_alone_met" not in off["verdict"]
    assert "noise off, 3 rounds" in capsys.readouterr().out


def test_files_from_different_starts_are_refused(tmp_path, capsys):
    a = _curve_file(tmp_path / "a.json", 2, {"ε 8": [[0.8, 0.84]]}, start=0.78)
    b = _curve_file(tmp_path / "b.json", 2, {"ε 8": [[0.8, 0.84]]}, start=0.70)
    code = targets.main(["--runs", f"{a},{b}", "--pooled", _pooled_file(tmp_path / "p.json"),
                         "--out", str(tmp_path / "t.png")])
    assert code == 2 and "different models" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()


def test_no_matching_setting_is_one_line(tmp_path, capsys):
    a = _curve_file(tmp_path / "a.json", 2, {"ε 8": [[0.8, 0.84]]})
    code = targets.main(["--runs", a, "--only", "ε 3", "--pooled", _pooled_file(tmp_path / "p.json"),
                         "--out", str(tmp_path / "t.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "ε 3" in err
