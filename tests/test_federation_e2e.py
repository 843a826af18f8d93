"""End to end: `fedfer simulate` on Flower's simulation engine, 2 schools + evaluation node, 2 rounds.

Checks the run directory, that every school's ε grows round over round (lifetime accountant), that the
accuracy in metrics.jsonl is the one the evaluation node computed for that checkpoint, and that the
server process never opened the benchmark files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from process_fixtures import processes_of_run

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "federation.schools=2", "federation.rounds=2", "federation.min_train_schools=2",
    "data.students_per_school=6", "data.frames_per_student=6", "data.public_students=6", "data.image_size=32",
    "data.public_train_students=0", "data.heldout_students=2",
    "train.local_epochs=1", "train.batch_size=3", "evaluation.bootstrap=50",
    "model.pretrain=", "data.school_size_spread=30",   # from scratch, sizes as before: no pre-training in a test
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("fedfer-e2e")
    trace = work / "server-opens.txt"
    env = {**os.environ, "FEDFER_TRACE_OPENS": str(trace)}
    cmd = [sys.executable, "-m", "fedfer", "simulate", *TINY, "run.name=e2e", f"run.root={work / 'runs'}",
           f"data.root={work / 'data'}"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work, env=env) as proc:
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return {"run": work / "runs" / "e2e", "data": work / "data", "trace": trace, "stdout": stdout, "pid": proc.pid}


def test_run_directory_is_complete(federation):
    run = federation["run"]
    for name in ("config.yaml", "metrics.jsonl", "report.md", "ledger/school-00.jsonl", "ledger/school-01.jsonl",
                 "keys/school-00.pub", "checkpoints/latest.json"):
        assert (run / name).exists(), name
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["aggregated"] for r in rounds)
    assert "summary" in federation["stdout"] and "report" in federation["stdout"]
    assert list((run / "plots").glob("*.png"))


def test_epsilon_grows_every_round_for_every_school(federation):
    run = federation["run"]
    for school in ("school-00", "school-01"):
        entries = [json.loads(line) for line in (run / "ledger" / f"{school}.jsonl").read_text().splitlines()]
        assert [e["round"] for e in entries] == [1, 2]
        assert 0 < entries[0]["epsilon"] < entries[1]["epsilon"] <= 8.0 + 1e-6
    result = subprocess.run([sys.executable, "-m", "fedfer", "privacy", "audit", str(run), "--trust-run-keys"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schools_send_only_public_values_and_declare_their_size(federation):
    """What reached the server per school (metrics.jsonl) is DP output or public values only, and q comes
    from the size each school's policy declares (docs/privacy.md)."""
    run = federation["run"]
    public = {"status", "epsilon", "epsilon_rdp", "noise_multiplier", "sample_rate", "steps", "unit_weight",
              "declared_units", "update_norm"}   # update_norm: the norm of the DP-noised update
    for record in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        for school, outcome in record["train"].items():
            assert set(outcome) <= public, (school, set(outcome) - public)
            policy = json.loads((run / "schools" / school / "policy.json").read_text())
            assert outcome["sample_rate"] == pytest.approx(min(1.0, 3 / policy["declared-students"]))
            assert outcome["declared_units"] == policy["declared-students"]   # FedAvg's public weight
    assert "loss" not in (run / "flower.log").read_text().replace("losses.sum", "")


def test_accuracy_is_the_evaluation_nodes(federation):
    from shared_models.models import registry
    from shared_models.evaluation import evaluate_benchmarks
    from shared_models.config import load_config

    run = federation["run"]
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["evaluated_by"].startswith("evaluator-node")
    checkpoint = torch.load(run / "checkpoints" / "round-0002.pt", weights_only=True)
    model = registry.build(checkpoint["model"]["name"], checkpoint["model"]["num_classes"], checkpoint["model"]["preset"])
    model.load_state_dict(checkpoint["state_dict"])
    cfg = load_config(None, TINY)
    again = evaluate_benchmarks(model, cfg["evaluation.benchmarks"], federation["data"], cfg)
    for bench, metrics in again.items():
        assert last["evaluation"][bench]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
        assert last["evaluation"][bench]["accuracy_ci_low"] <= metrics["accuracy"] <= last["evaluation"][bench]["accuracy_ci_high"]


def test_server_never_opened_benchmark_files(federation):
    opened = federation["trace"].read_text().splitlines() if federation["trace"].exists() else []
    assert opened == []


def test_no_flower_process_left_behind(federation):
    assert processes_of_run(federation["run"].parent) == set()
    # nor Ray's session folder, which the launcher removes after a run that finished
    from simulations.launcher import ray_session_dir

    assert not ray_session_dir(federation["pid"]).exists()


def test_fedfer_evaluate_reproduces_the_evaluation_node(federation):
    """`fedfer evaluate` on the checkpoint, synthetic public split in FER2013 format, gives the accuracy
    the evaluation node reported for that round."""
    run = federation["run"]
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    proc = subprocess.run([sys.executable, "-m", "fedfer", "evaluate", "--checkpoint", str(run / "checkpoints" / "round-0002.pt"),
                           "--benchmark", "synthetic-fer2013", "--data-root", str(federation["data"]), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)  # {benchmark name: metrics}
    assert len(results) == 1
    row = next(iter(results.values()))
    assert row["n"] == last["evaluation"]["synthetic-fer2013"]["n"]
    assert row["accuracy"] == pytest.approx(last["evaluation"]["synthetic-fer2013"]["accuracy"], abs=1e-9)


def test_the_best_public_round_is_kept_through_flower(federation):
    """checkpoints/best.pt holds the weights of the round that scored best on the public benchmark in
    metrics.jsonl (both rounds' checkpoints are still on disk to compare with), and the summary names it."""
    from server.best_round import BestRoundRule, best_of
    from shared_models.config import read_yaml_file

    run = federation["run"]
    lines = {line["round"]: line["evaluation"] for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    expected = best_of(lines, BestRoundRule.from_config(read_yaml_file(run / "config.yaml")))
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["round"] == expected.round and set(best["best"]["accuracies"]) == {"synthetic-fer2013"}
    same_round = torch.load(run / "checkpoints" / f"round-{expected.round:04d}.pt", weights_only=True)
    for name, tensor in same_round["state_dict"].items():
        assert torch.equal(best["state_dict"][name], tensor), name
    assert f"  best model         {run / 'checkpoints' / 'best.pt'} (best round {expected.round}" in federation["stdout"]
