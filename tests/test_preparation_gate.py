"""`fedfer simulate` pre-trains while Flower starts: the run directory's preparation gate.

The launcher holds `<run>/preparing.lock` while it pre-trains, builds the schools and writes their
policies; Flower (SuperLink, `flwr run`, Ray) starts meanwhile and the ServerApp waits at the gate
before it reads the pre-trained model. If the preparation fails, Flower is stopped before the gate opens.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from process_fixtures import processes_of_run

from shared_models.config import load_config
from shared_models.models import registry


def test_the_gate_is_released_and_removed_however_the_preparation_ends(tmp_path) -> None:
    from server.run_dir import RunDirectory

    run = RunDirectory.create(load_config(overrides=[f"run.root={tmp_path}", "run.name=gate"]))
    assert run.wait_until_prepared() is False   # no gate: a deployment, or nothing to prepare
    with pytest.raises(RuntimeError, match="pre-training failed"):
        with run.preparing():
            assert run.preparing_path.exists()
            raise RuntimeError("pre-training failed")
    assert not run.preparing_path.exists() and run.wait_until_prepared() is False


def test_the_serverapp_waits_at_the_gate_for_the_pretrained_model(tmp_path) -> None:
    """While the gate is held the ServerApp's start neither returns nor fails on the checkpoint that does
    not exist yet; once it is written and the gate opens, the run starts from exactly those weights."""
    from server.run import start_or_resume
    from server.run_dir import RunDirectory

    checkpoint = tmp_path / "public.pt"
    cfg = load_config(overrides=["model.preset=dp", "model.pretrain=", f"model.pretrained={checkpoint}",
                                 f"run.root={tmp_path / 'runs'}", "run.name=gated"])
    run = RunDirectory.create(cfg)
    started, failed = [], []

    def serverapp_start() -> None:
        try:
            started.append(start_or_resume(cfg))
        except Exception as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    with run.preparing():
        thread = threading.Thread(target=serverapp_start, daemon=True)
        thread.start()
        thread.join(timeout=2.0)
        assert thread.is_alive() and not started and not failed
        torch.manual_seed(3)
        weights = registry.build_from_config(cfg).state_dict()
        torch.save({"state_dict": weights}, checkpoint)
    thread.join(timeout=60)
    assert not failed and len(started) == 1
    for name, tensor in started[0].model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    assert started[0].run.path == run.path and not run.preparing_path.exists()


TINY = ["federation.schools=2", "federation.rounds=1", "federation.min_train_schools=2",
        "data.students_per_school=4", "data.frames_per_student=2", "data.public_students=2",
        "data.public_frames=7", "data.public_train_students=2", "data.public_train_frames=7",
        "data.heldout_students=1", "data.image_size=32", "evaluation.bootstrap=10", "model.preset=dp",
        "pretrain.epochs=1", "pretrain.batch_size=8", "data.school_size_spread=30"]


def test_a_failed_pretraining_stops_the_flower_it_started_beside_it(tmp_path, monkeypatch, capsys) -> None:
    """The pre-training fails after `flwr run` has started: one line naming the problem, exit code 2, and
    no Flower process (SuperLink, simulation, Ray) left behind; the gate is gone."""
    from fedfer.cli import main
    from simulations import pretrain

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "failing"

    def failing_pretraining(*args, **kwargs):
        deadline = time.time() + 120
        while not (run / "flower.log").exists() and time.time() < deadline:   # `flwr run` is running
            time.sleep(0.2)
        assert (run / "flower.log").exists(), "Flower never started beside the pre-training"
        raise pretrain.PretrainError("pretrain.benchmarks: synthetic-rafdb:train: the disk went away")

    monkeypatch.setattr(pretrain, "ensure_pretrained", failing_pretraining)
    code = main(["simulate", *TINY, f"run.root={tmp_path / 'runs'}", "run.name=failing",
                 f"data.root={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert code == 2 and "fedfer: pretrain.benchmarks: synthetic-rafdb:train: the disk went away" in err
    assert "Traceback" not in err
    assert processes_of_run(tmp_path / "runs") == set()
    assert not (run / "preparing.lock").exists()
