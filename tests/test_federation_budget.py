"""A federation where one school's budget runs out: the guard stops it exactly at the first round
that would cross its budget, the server stops selecting it, the others finish. Same run: client-level
DP at the server (accounted in ledger/federation.jsonl) and in-process evaluation (no evaluator node)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL_BUDGET = 5.0
CFG = [
    "federation.schools=3", "federation.rounds=3", "federation.min_train_schools=1", "federation.evaluator=false",
    "federation.client_dp=true", "federation.client_dp_noise=0.8",
    f"privacy.school_budgets=school-02={SMALL_BUDGET}",
    "data.students_per_school=5", "data.frames_per_student=4", "data.public_students=4", "data.image_size=32",
    "data.public_train_students=0", "data.heldout_students=2",
    "train.local_epochs=1", "train.batch_size=3", "evaluation.bootstrap=20",
    "model.pretrain=", "data.school_size_spread=30",   # from scratch, sizes as before: no pre-training in a test
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("fedfer-budget")
    cmd = [sys.executable, "-m", "fedfer", "simulate", *CFG, "run.name=budget", f"run.root={work / 'runs'}",
           f"data.root={work / 'data'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work / "runs" / "budget"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_guard_stops_school_at_first_crossing_round(run):
    from privacy.accounting import epsilon_of

    entries = _lines(run / "ledger" / "school-02.jsonl")
    trained = [e for e in entries if e["event"] == "round"]
    refused = [e for e in entries if e["event"] == "refused"]
    assert trained and len(refused) == 1
    assert all(float(e["epsilon"]) <= SMALL_BUDGET for e in trained)
    stop = refused[0]
    would_be = epsilon_of(stop["history_before"] + [[stop["noise_multiplier"], stop["sample_rate"], stop["planned_steps"]]],
                          stop["delta"], "prv")
    assert would_be > SMALL_BUDGET and stop["reason"] == "budget-exhausted"
    rounds = _lines(run / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    refused_round = stop["round"]
    assert rounds[refused_round - 1]["train"]["school-02"]["status"] == "budget-exhausted"
    for later in rounds[refused_round:]:
        assert "school-02" not in later["train"]  # no longer selected
    for school in ("school-00", "school-01"):  # the others finish every round
        assert [e["round"] for e in _lines(run / "ledger" / f"{school}.jsonl")] == [1, 2, 3]


def test_client_level_dp_is_accounted_and_audited(run):
    federation = _lines(run / "ledger" / "federation.jsonl")
    assert [e["round"] for e in federation] == [1, 2, 3]
    assert all(e["privacy_unit"] == "school" and e["sample_rate"] == 1.0 for e in federation)
    eps = [float(e["epsilon"]) for e in federation]
    assert eps[0] < eps[1] < eps[2]
    rounds = _lines(run / "metrics.jsonl")
    assert rounds[-1]["federation_epsilon"] == pytest.approx(eps[-1])
    assert all(r["evaluated_by"] == "server-in-process" for r in rounds)
    audit = subprocess.run([sys.executable, "-m", "fedfer", "privacy", "audit", str(run), "--json", "--trust-run-keys"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_audit_detects_tampering_in_the_run_copy(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".flower", "schools", "checkpoints"))
    ledger = copy / "ledger" / "school-00.jsonl"
    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["noise_multiplier"] = entry["noise_multiplier"] * 2  # claim more noise than was used
    lines[1] = json.dumps(entry)
    ledger.write_text("\n".join(lines) + "\n")
    audit = subprocess.run([sys.executable, "-m", "fedfer", "privacy", "audit", str(copy), "--trust-run-keys"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert audit.returncode == 2
    assert "school-00" in audit.stdout + audit.stderr and "line 2" in audit.stdout + audit.stderr
