"""A resume may change where things are and how the machine runs them (shared_models.config.RESUME_MAY_CHANGE:
timeouts, the keyring, threads, evaluation options), and the docs say so — but the ServerApp took every setting
from the checkpoint, so `flwr run -c 'run.resume=… federation.round_timeout=30'` still waited 600 s per round
(session 25's deployment edges). Now a setting given on resume other than the default wins, and a bare resume
keeps the run's own values."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord

from server.round_writer import RoundWriter
from server.run import start_or_resume
from server.run_dir import RoundRecord, RunDirectory
from shared_models.config import load_config
from shared_models.models import registry

RUN = ["model.preset=dp", "run.name=old", "federation.rounds=3", "federation.evaluator=false",
       "federation.round_timeout=1200"]


def _run_with_one_round(root: Path) -> None:
    cfg = load_config(None, [f"run.root={root}", *RUN])
    writer = RoundWriter(RunDirectory.create(cfg), cfg)
    record = RoundRecord(1, train={"school-a": {"status": "ok"}}, aggregated=True, timing={"round_seconds": 1.0})
    arrays = ArrayRecord({k: v.clone() for k, v in registry.build_from_config(cfg).state_dict().items()})
    writer.round_trained(record, arrays, {"exhausted": [], "momentum": None})
    record.evaluation, record.evaluated_by = {}, ""
    writer.round_settled(record, arrays, {"exhausted": [], "momentum": None}, evaluator_expected=False)


def _resume(root: Path, *overrides: str):
    return start_or_resume(load_config(None, [f"run.root={root}", *RUN[:-1], f"run.resume={root / 'old'}", *overrides]))


def test_a_timeout_given_on_resume_is_the_one_in_force(tmp_path: Path) -> None:
    _run_with_one_round(tmp_path)
    start = _resume(tmp_path, "federation.round_timeout=30", "federation.offline_wait=45")
    assert start.cfg["federation.round_timeout"] == 30 and start.cfg["federation.offline_wait"] == 45
    events = [json.loads(line) for line in (tmp_path / "old" / "events.jsonl").read_text().splitlines()]
    changed = [e for e in events if e.get("event") == "resume-settings"]
    assert changed and changed[-1]["changed"]["federation.round_timeout"] == [1200, 30]


def test_a_bare_resume_keeps_the_runs_own_settings(tmp_path: Path) -> None:
    _run_with_one_round(tmp_path)
    start = _resume(tmp_path)   # the run-config carries the default round_timeout (600): the run's 1200 stays
    assert start.cfg["federation.round_timeout"] == 1200
    assert "resume-settings" not in (tmp_path / "old" / "events.jsonl").read_text()


def test_the_start_model_is_not_taken_from_a_resume(tmp_path: Path) -> None:
    """The weights come from the checkpoint: a model.pretrained given on resume does not replace the run's."""
    _run_with_one_round(tmp_path)
    given = tmp_path / "other.pt"
    given.write_bytes(b"never read")
    start = _resume(tmp_path, f"model.pretrained={given}", "train.threads=2")
    assert start.cfg["train.threads"] == 2
    assert start.cfg["model.pretrained"] == ""


def test_a_run_stopped_before_its_first_checkpoint_takes_the_resumes_timeout_too(tmp_path: Path) -> None:
    """The other resume path (server/run.py `restart`: round 1 again from the start model) kept config.yaml's."""
    RunDirectory.create(load_config(None, [f"run.root={tmp_path}", *RUN]))   # config.yaml, no checkpoint yet
    start = _resume(tmp_path, "federation.round_timeout=30")
    assert start.cfg["federation.round_timeout"] == 30
