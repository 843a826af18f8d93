"""What the coordinator does with an admin's input and a deployment's failures: a resumed run continues under
the settings it started with (every school sets its noise, steps and sampling from the run-config it receives,
so a resume whose run-config differs — a `flwr run` with only `run.resume`, or `fedfer simulate run.resume=…
privacy.target_epsilon=8` — is refused with the overrides to repeat, and `fedfer simulate` takes the original
settings for every key the user did not set); a mistyped keyring is refused before any school is asked; a lost
evaluation node does not end the federation; the progress line names the schools that did not train."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from fedfer.commands.simulate import _config
from server.run import ResumeRefused, start_or_resume
from server.run_dir import RunDirectory
from shared_models.config import load_config, resume_differences
from shared_models.models import registry


def _run(tmp_path: Path, *overrides: str) -> Path:
    """A run directory with a round-1 checkpoint of a run started with `overrides`."""
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=first", "model.preset=dp", "model.pretrain=",
                             *overrides])
    run = RunDirectory.create(cfg)
    model = registry.build("hafnet", num_classes=7, preset="dp")
    run.save_checkpoint(1, model.state_dict(), {"name": "hafnet", "preset": "dp", "num_classes": 7}, cfg,
                        {"exhausted": [], "momentum": None})
    return run.path


def test_operational_keys_may_change_and_the_rest_may_not():
    original = load_config(None, ["privacy.target_epsilon=1", "federation.rounds=4"])
    same = dict(original, **{"run.resume": "/r", "federation.round_timeout": 99.0, "privacy.keyring": "/k"})
    assert resume_differences(same, original) == {}
    defaults = load_config(None, ["run.resume=/r"])
    assert resume_differences(defaults, original) == {"federation.rounds": (6, 4), "privacy.target_epsilon": (8.0, 1.0)}


def test_the_serverapp_refuses_a_resume_that_would_change_the_schools_noise(tmp_path):
    run = _run(tmp_path, "privacy.target_epsilon=1", "federation.rounds=4")
    # what a deployed `flwr run . -c 'run.resume=…'` hands the ServerApp: the defaults plus run.resume
    requested = load_config(None, [f"run.resume={run}", "model.preset=dp", "model.pretrain="])
    with pytest.raises(ResumeRefused) as refused:
        start_or_resume(requested)
    message = str(refused.value)
    assert "\n" not in message and "privacy.target_epsilon=1.0" in message and "federation.rounds=4" in message
    assert f"-c 'federation.rounds=4 privacy.target_epsilon=1.0 run.resume=\"{run}\"'" in message
    # repeating the run's settings resumes it
    again = load_config(None, [f"run.resume={run}", "model.preset=dp", "model.pretrain=", "privacy.target_epsilon=1",
                               "federation.rounds=4", "federation.round_timeout=30"])
    start = start_or_resume(again)
    assert start.round_offset == 1 and start.cfg["privacy.target_epsilon"] == 1.0 and start.remaining == 3


def _args(*overrides: str, config: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(overrides=list(overrides), config=config, references=False)


def test_fedfer_simulate_resumes_under_the_original_settings(tmp_path, capsys, monkeypatch):
    run = _run(tmp_path, "privacy.target_epsilon=1", "federation.rounds=4", "train.lr=0.5")
    cfg = _config(_args(f"run.resume={run}", "federation.round_timeout=30"))
    assert cfg is not None
    assert (cfg["privacy.target_epsilon"], cfg["federation.rounds"], cfg["train.lr"]) == (1.0, 4, 0.5)
    assert cfg["federation.round_timeout"] == 30.0 and cfg["run.resume"] == str(run)
    # a relative path is made absolute: the ServerApp resolves it from another folder
    monkeypatch.chdir(run.parent)
    assert _config(_args(f"run.resume={run.name}"))["run.resume"] == str(run)
    # what the launcher hands the simulated schools is therefore what the ServerApp continues with
    assert resume_differences(cfg, load_config(None, ["privacy.target_epsilon=1", "federation.rounds=4", "train.lr=0.5",
                                                      "model.preset=dp", "model.pretrain="])) == {}
    # changing a setting the schools train under is refused, naming it
    assert _config(_args(f"run.resume={run}", "privacy.target_epsilon=8")) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "privacy.target_epsilon=8.0 (the run has 1.0)" in err
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 0.5\n")          # the same value from a config file is fine
    assert _config(_args(f"run.resume={run}", config=config)) is not None


def test_a_resumed_default_run_does_not_pretrain_again(tmp_path):
    """A default run records model.pretrain=auto beside the checkpoint it resolved to; its resume starts from
    its own checkpoint, so `fedfer simulate` must neither pre-train nor refuse 'both set'."""
    from fedfer.commands.simulate import _resolve_run_config

    start = tmp_path / "pretrained.pt"
    start.write_bytes(b"not read on resume")
    run = _run(tmp_path, "model.pretrain=auto", f"model.pretrained={start}", f"data.root={tmp_path / 'data'}")
    cfg = _config(_args(f"run.resume={run}"))
    assert cfg is not None and cfg["model.pretrain"] == "" and cfg["model.pretrained"] == str(start)
    assert _resolve_run_config(cfg) == (0, None)



def test_a_lost_evaluation_node_does_not_end_a_deployed_federation(tmp_path):
    """A deployed coordinator holds no benchmark data; when the evaluation node stops answering, its
    in-process fallback cannot score the model: the round is recorded without scores and the run goes on."""
    import json

    from flwr.app import ArrayRecord

    from server.round_writer import RoundWriter
    from server.run_dir import RoundRecord

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=deployed", "model.preset=dp", "data.root=",
                             "evaluation.benchmarks=synthetic-fer2013"])
    run = RunDirectory.create(cfg)
    writer = RoundWriter(run, cfg)
    record = RoundRecord(1, train={"school-a": {"status": "ok", "epsilon": 1.0}}, aggregated=True)
    model = registry.build("hafnet", num_classes=7, preset="dp")
    writer.round_settled(record, ArrayRecord(model.state_dict()), {"exhausted": [], "momentum": None}, evaluator_expected=True)
    line = json.loads((run.path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["round"] == 1 and line["evaluation"] == {} and line["evaluated_by"] == "none"
    events = [json.loads(x) for x in (run.path / "events.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "not-evaluated" and "no data root" in e.get("reason", "") for e in events), events


def test_a_mistyped_keyring_is_refused_before_any_school_is_asked(tmp_path, caplog):
    """The ServerApp refuses it in one line (logged before Flower's traceback), rather than rejecting every
    school's reply as unverifiable."""
    from types import SimpleNamespace

    from flwr.common.config import flatten_dict

    import server.app as server_app
    from shared_models.config import nest

    cfg = load_config(None, [f"privacy.keyring={tmp_path / 'kyes'}", f"run.root={tmp_path / 'runs'}"])
    context = SimpleNamespace(run_config=flatten_dict(nest(cfg)))
    # the apps stop Flower's logger propagating (each line printed once), so caplog listens on it directly
    flower_logger = logging.getLogger("flwr")
    flower_logger.addHandler(caplog.handler)
    try:
        with pytest.raises(ValueError, match="privacy.keyring: .*kyes is not a directory"):
            server_app.main(None, context)
    finally:
        flower_logger.removeHandler(caplog.handler)
    assert any("[fedfer] refused: privacy.keyring:" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "runs").exists()   # nothing started


def test_the_progress_line_names_the_schools_that_did_not_train():
    from server.round_writer import progress_line
    from server.run_dir import RoundRecord

    ok = {"status": "ok", "epsilon": 1.0}
    record = RoundRecord(7, train={"adams": ok, "jefferson": {"status": "error", "reason": "client error: x"}})
    assert progress_line(record, 10, "fer2013", 51.0) == "round 7/10 | schools 1/2 ok (jefferson: error) | ε max 1.00 | 51.0 s"
    scored = RoundRecord(3, train={"adams": ok}, evaluation={"fer2013": {"accuracy": 0.5}})
    assert "| fer2013 acc 0.500 |" in progress_line(scored, 10, "synthetic-fer2013", 1.0)   # the evaluator's own benchmark
    many = RoundRecord(2, train={f"s{k}": {"status": "budget-exhausted" if k % 2 else "error"} for k in range(6)})
    assert "schools 0/6 ok (3 budget-exhausted, 3 error)" in progress_line(many, 4, "fer2013", 1.0)
