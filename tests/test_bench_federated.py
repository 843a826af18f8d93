"""simulations.bench.federated: a finished run directory becomes a result file with the command, the resolved
config, the last evaluated round's WAR/UAR with CI and each school's ε from its ledger."""

from __future__ import annotations

import json
from pathlib import Path

from simulations.bench import federated


def _fake_run(run_dir: Path) -> None:
    """What `fedfer simulate` leaves behind, reduced to the files the result reads."""
    (run_dir / "ledger").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model.name: r2plus1d_sta\nmodel.task: engagement\nfederation.rounds: 2\n")
    metrics = [
        {"round": 1, "evaluation": {"synthetic-daisee": {"accuracy": 0.3, "accuracy_ci_low": 0.2,
                                                         "accuracy_ci_high": 0.4, "uar": 0.3, "n": 200,
                                                         "confusion": [[1, 0], [0, 1]]}},
         "timing": {"round_seconds": 40.04}, "train": {"school-00": {"status": "ok"}}},
        {"round": 2, "evaluation": {"synthetic-daisee": {"accuracy": 0.5, "accuracy_ci_low": 0.43,
                                                         "accuracy_ci_high": 0.57, "uar": 0.49, "n": 200}},
         "timing": {"round_seconds": 35.0}, "train": {"school-00": {"status": "error"}}},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    ledger = [{"round": r, "epsilon": e, "noise_multiplier": 1.1, "sample_rate": 0.07, "steps": 14}
              for r, e in ((1, 2.8), (2, 7.99))]
    (run_dir / "ledger" / "school-00.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ledger))


def test_result_holds_the_last_round_the_schools_epsilon_and_the_command(tmp_path, monkeypatch):
    out = tmp_path / "bench" / "federated-x.json"
    runs = tmp_path / "runs"

    def fake_simulate(overrides, run_root, name):
        assert list(overrides) == ["model.task=engagement"] and run_root == runs
        _fake_run(run_root / name)
        return 0

    monkeypatch.setattr(federated, "_simulate", fake_simulate)
    argv = ["--out", str(out), "--run-root", str(runs), "model.task=engagement"]
    assert federated.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m simulations.bench.federated --out")
    assert result["final"]["round"] == 2 and result["final"]["synthetic-daisee"]["accuracy_ci_low"] == 0.43
    assert result["chance"] == 0.25 and result["config"]["model.name"] == "r2plus1d_sta"
    assert result["schools"]["school-00"]["epsilon"] == 7.99 and result["schools"]["school-00"]["rounds_trained"] == 2
    assert [r["seconds"] for r in result["rounds"]] == [40.0, 35.0]
    assert [r["schools_ok"] for r in result["rounds"]] == [1, 0] and result["every_school_every_round"] is False
    assert "confusion" not in result["rounds"][0]["synthetic-daisee"]
    assert (runs / "federated-x").is_dir()   # a given --run-root is kept


def test_a_failed_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(federated, "_simulate", lambda overrides, run_root, name: 2)
    out = tmp_path / "r.json"
    assert federated.main(["--out", str(out), "--run-root", str(tmp_path)]) == 2
    assert not out.exists()


def test_the_pre_trained_round_0_asks_no_school_and_does_not_count():
    from simulations.bench.federated import every_school_every_round

    start = {"round": 0, "schools_ok": 0, "schools_asked": 0}
    assert every_school_every_round([start, {"round": 1, "schools_ok": 3, "schools_asked": 3}]) is True
    assert every_school_every_round([start, {"round": 1, "schools_ok": 2, "schools_asked": 3}]) is False
    assert every_school_every_round([start]) is False
