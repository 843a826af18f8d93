"""A run stopped before its first checkpoint (killed while pre-training, or during round 1) is resumed by
starting it again: round 1 from its start model, under the settings in its config.yaml. Nothing of the run is
lost (nothing was aggregated) and no spend is forgotten (a school that trained the lost round 1 has it in its
ledger and accountant). It used to be refused ("…latest.json: missing; … has no checkpoint to resume from")."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from fedfer.commands.simulate import _config
from server.run import ResumeRefused, start_is_scored, start_or_resume
from server.run_dir import CheckpointError, NoCheckpointYet, RunBusy, RunDirectory, check_resume_dir
from shared_models.config import load_config


def _stopped_run(tmp_path: Path, *overrides: str) -> RunDirectory:
    """What a run killed before its first checkpoint leaves: config.yaml (and an empty checkpoints/)."""
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=first", "model.preset=dp", "model.pretrain=",
                             f"data.root={tmp_path / 'data'}", *overrides])
    return RunDirectory.create(cfg)


def _args(*overrides: str) -> argparse.Namespace:
    return argparse.Namespace(overrides=list(overrides), config=None, references=False)


def test_a_run_without_a_checkpoint_is_told_apart_from_a_folder_that_is_no_run(tmp_path):
    run = _stopped_run(tmp_path)
    with pytest.raises(NoCheckpointYet):
        check_resume_dir(run.path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint to resume from") as refused:
        check_resume_dir(tmp_path / "empty")   # no config.yaml: not a run this could start again
    assert not isinstance(refused.value, NoCheckpointYet)


def test_the_serverapp_starts_such_a_run_again_at_round_1_under_its_settings(tmp_path):
    run = _stopped_run(tmp_path, "privacy.target_epsilon=2", "federation.rounds=3")
    requested = load_config(None, [f"run.resume={run.path}", "model.preset=dp", "model.pretrain=",
                                   "privacy.target_epsilon=2", "federation.rounds=3"])
    start = start_or_resume(requested)
    assert start.round_offset == 0 and start.remaining == 3 and start.strategy_state == {}
    assert start.cfg["privacy.target_epsilon"] == 2.0 and start.cfg["run.resume"] == str(run.path)
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert events[-1]["event"] == "resumed" and events[-1]["round"] == 0
    # the schools set their noise from the run-config: a restart under other settings is refused like any resume
    with pytest.raises(ResumeRefused, match="privacy.target_epsilon=2.0"):
        start_or_resume(load_config(None, [f"run.resume={run.path}", "model.preset=dp", "model.pretrain=",
                                           "federation.rounds=3"]))


def test_fedfer_simulate_restarts_under_the_original_settings_and_says_so(tmp_path, capsys):
    run = _stopped_run(tmp_path, "privacy.target_epsilon=2", "train.lr=0.5")
    cfg = _config(_args(f"run.resume={run.path}", "federation.round_timeout=30"))
    assert cfg is not None
    assert (cfg["privacy.target_epsilon"], cfg["train.lr"], cfg["federation.round_timeout"]) == (2.0, 0.5, 30.0)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no checkpoint yet: it starts again at round 1" in out
    assert _config(_args(f"run.resume={run.path}", "train.lr=1.5")) is None
    assert "train.lr=1.5 (the run has 0.5)" in capsys.readouterr().err


def test_a_run_stopped_while_pretraining_its_start_model_pretrains_it_again(tmp_path):
    """config.yaml names the cached checkpoint `fedfer simulate` was training; it was never written."""
    never_written = tmp_path / "cache" / "pretrained" / "abc.pt"
    run = _stopped_run(tmp_path, "model.pretrain=auto", f"model.pretrained={never_written}")
    cfg = _config(_args(f"run.resume={run.path}"))
    assert cfg is not None and cfg["model.pretrain"] == "auto" and cfg["model.pretrained"] == ""
    never_written.parent.mkdir(parents=True)
    never_written.write_bytes(b"there now")   # the cached start model: used as it is, nothing to train
    cfg = _config(_args(f"run.resume={run.path}"))
    assert cfg is not None and cfg["model.pretrain"] == "" and cfg["model.pretrained"] == str(never_written)


def test_a_start_model_that_is_gone_is_named_in_one_line(tmp_path, capsys):
    gone = tmp_path / "mine.pt"
    run = _stopped_run(tmp_path, f"model.pretrained={gone}")
    assert _config(_args(f"run.resume={run.path}")) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"model.pretrained: {gone} not found" in err


def test_the_start_models_score_is_not_recorded_twice(tmp_path):
    run = _stopped_run(tmp_path)
    assert not start_is_scored(run)
    run.append_metrics({"round": 0, "evaluation": {}})   # round 0 was scored before the run stopped
    assert start_is_scored(run)


def test_a_run_still_being_prepared_is_not_resumed_beside_it(tmp_path, capsys):
    run = _stopped_run(tmp_path)
    with run.preparing():   # the `fedfer simulate` that started it is still pre-training
        with pytest.raises(RunBusy, match="still being prepared"):
            run.check_not_busy()
        assert _config(_args(f"run.resume={run.path}")) is None
    assert "still being prepared" in capsys.readouterr().err
    (run.path / "preparing.lock").touch()   # what a killed `fedfer simulate` leaves: a free gate
    run.check_not_busy()


def test_resuming_a_finished_run_rewrites_its_report_without_starting_flower(tmp_path, monkeypatch, capsys):
    """It used to start a SuperLink, the simulation and Ray (tens of seconds) for the ServerApp to say
    'already finished'."""
    from fedfer.commands import simulate
    from shared_models.models import registry

    def no_flower(*args, **kwargs):
        raise AssertionError("Flower started for a finished run")

    monkeypatch.setattr(simulate, "_federation", no_flower)
    run = _stopped_run(tmp_path, "federation.rounds=2")
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=first", "model.preset=dp", "model.pretrain=",
                             f"data.root={tmp_path / 'data'}", "federation.rounds=2"])
    model = registry.build("hafnet", num_classes=7, preset="dp")
    for rnd in (1, 2):
        run.save_checkpoint(rnd, model.state_dict(), {"name": "hafnet", "preset": "dp", "num_classes": 7}, cfg,
                            {"exhausted": [], "momentum": None})
        run.append_metrics({"round": rnd, "train": {}, "evaluation": {}})
    args = argparse.Namespace(overrides=[f"run.resume={run.path}"], config=None, references=False, ray_address=None)
    assert simulate.cmd_simulate(args) == 0
    out = capsys.readouterr().out
    assert "already finished 2 rounds" in out and (run.path / "report.md").is_file()
    # the seconds are this command's, not the run's: a bare "wall time 1 s" read as the run's own time
    assert "wall time" in out and "(this command only: the run had already finished)" in out
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert events[-1]["event"] == "resumed" and events[-1]["round"] == 2


def test_an_interrupted_simulation_says_how_to_continue_it(tmp_path, capsys):
    """Ctrl-C on `fedfer simulate` said where the results were, not that `run.resume` continues the run."""
    from fedfer.commands.simulate import _finish_federation

    class Interrupted:   # a federation Ctrl-C'd while the caller waits for it
        def result(self) -> int:
            raise KeyboardInterrupt

    assert _finish_federation(Interrupted(), tmp_path / "runs" / "r", 0.0) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"continue with `fedfer simulate run.resume={tmp_path / 'runs' / 'r'}`" in err, err


def test_kill_stops_a_simulation_as_ctrl_c_does(tmp_path, capsys):
    """`kill %1` (SIGTERM) on `fedfer simulate &` ended it silently: no line, and the simulation ran on."""
    import os
    import signal

    from fedfer.commands.simulate import _finish_federation, stop_on_sigterm_as_on_ctrl_c

    stopped = []

    class Killed:   # a federation whose `fedfer simulate` is sent SIGTERM while it waits
        def result(self) -> int:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)   # the handler raises here
            except KeyboardInterrupt:
                stopped.append(True)   # what Federation.result does: stop the processes, re-raise
                raise
            return 0

    from fedfer.commands import simulate

    before = signal.getsignal(signal.SIGTERM)
    try:
        # `fedfer simulate` installs it first thing (here it then stops at a bad key)
        args = argparse.Namespace(overrides=["no.such_key=1"], config=None, references=False, ray_address=None)
        assert simulate.cmd_simulate(args) == 2 and signal.getsignal(signal.SIGTERM) is not before
        signal.signal(signal.SIGTERM, before)
        stop_on_sigterm_as_on_ctrl_c()
        assert _finish_federation(Killed(), tmp_path / "r", 0.0) == 130
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped == [True] and "fedfer: interrupted; Flower processes stopped" in capsys.readouterr().err
