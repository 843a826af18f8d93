"""What `fedfer simulate` prints: each fact once. The start model and the run directory were each named
twice (the pre-training's own line and simulate's; simulate's heading and the ServerApp's log line)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from shared_models.config import load_config


def test_the_serverapps_run_directory_line_is_not_echoed_again(tmp_path: Path) -> None:
    from server.run_dir import restart_message
    from simulations.launcher import Federation, _run_and_follow

    run_dir = tmp_path / "runs" / "r1"
    echoed: list[str] = []
    federation = Federation({"federation.schools": 1, "federation.evaluator": False}, run_dir, echo=echoed.append)
    # what `flwr run --stream` shows of the ServerApp (Flower logs each record in two formats)
    serverapp = [f"INFO :      [fedfer] run directory {run_dir}", f"[fedfer] run directory {run_dir}",
                 f"INFO :      [fedfer] {restart_message(run_dir)}",   # simulate said it before Flower started
                 "INFO :      [fedfer] round 1/2 | schools 1/1 ok", "INFO :      [fedfer] run directory /elsewhere"]
    script = "\n".join(f"print({line!r}, flush=True)" for line in serverapp)
    code, failed = _run_and_follow(federation, [sys.executable, "-c", script], dict(os.environ), tmp_path / "flower.log")
    assert code == 0 and not failed
    # the run `fedfer simulate` printed is not repeated; a different one (never expected) still would be shown
    assert echoed == ["round 1/2 | schools 1/1 ok", "run directory /elsewhere"]
    assert f"[fedfer] run directory {run_dir}" in (tmp_path / "flower.log").read_text()   # the full log keeps it


def test_a_cached_start_model_is_named_once(tmp_path: Path, monkeypatch, capsys) -> None:
    from fedfer.commands.simulate import _PendingPretraining, _pretrain_now
    from simulations import pretrain

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = load_config(None, ["data.generate=on-demand"])   # on-demand: nothing is built beside the pre-training
    data = [{"spec": "synthetic-rafdb:train", "name": "synthetic-rafdb", "split": "train", "n": 10, "fingerprint": "test"}]
    path = pretrain.cached_checkpoint(cfg, tmp_path, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"cached")   # only its existence is looked at
    assert _pretrain_now(cfg, _PendingPretraining(tmp_path, data, path)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if str(path) in line]
    assert lines == [f"pre-trained model (cached): {path}"]


def test_a_checkpoint_given_is_the_start_without_turning_auto_off(tmp_path, monkeypatch):
    """`fedfer pretrain` ends with `next: fedfer simulate model.pretrained=PATH` and docs/simulation.md gives
    the same line, but with the default model.pretrain=auto it stopped at 'both set; choose one'."""
    from fedfer.commands import simulate

    def no_pretraining(cfg):
        raise AssertionError("pre-training started although a checkpoint was given")

    monkeypatch.setattr(simulate, "_pretrain_auto", no_pretraining)
    monkeypatch.setattr("server.run.check_pretrained_model", lambda provenance, cfg, path: None)
    monkeypatch.setattr("shared_models.models.registry.pretrained_provenance", lambda path: None)
    start = tmp_path / "mine.pt"
    start.write_bytes(b"read by the ServerApp, not here")
    cfg = load_config(None, [f"model.pretrained={start}", f"run.root={tmp_path / 'runs'}", f"data.root={tmp_path / 'd'}"])
    assert cfg["model.pretrain"] == "auto"
    assert simulate._resolve_run_config(cfg) == (0, None)
    assert cfg["model.pretrained"] == str(start) and cfg["model.pretrain"] == ""


def test_a_long_pretraining_epoch_shows_it_moves(tmp_path):
    """The paper preset pre-trained for 9 minutes on one thread with no line between its start and its end."""
    import torch

    from simulations.pretrain import train_public
    from shared_models.models import registry

    model = registry.build("hafnet", num_classes=7, preset="dp")
    images = torch.randint(0, 255, (12, 3, 64, 64), dtype=torch.uint8)
    labels = torch.arange(12) % 7
    lines: list[str] = []
    train_public(model, images, labels, epochs=1, batch_size=4, lr=0.001, seed=0, echo=lines.append,
                 progress_every_s=0.0)
    assert len(lines) == 3, lines   # steps 1 and 2 of 3, then the epoch's own line (the last step is that)
    assert lines[0].startswith("pre-training epoch 1/1: step 1/3, loss ")
    assert lines[1].startswith("pre-training epoch 1/1: step 2/3, loss ")
    assert lines[2].startswith("pre-training epoch 1/1: loss ")


def test_a_rejected_update_norm_says_what_to_change():
    """hafnet `paper` (19.7 M parameters) at train.batch_size=8: every school's honest update was rejected,
    every round, with only 'update norm 1.87e+03 exceeds federation.max_update_norm 1e+03'."""
    import numpy as np
    import pytest

    from server.validation import RejectedUpdate, check_update

    with pytest.raises(RejectedUpdate) as rejected:
        check_update({"w": np.zeros(4)}, {"w": np.full(4, 1000.0)}, max_update_norm=1000.0)
    assert "train.batch_size" in str(rejected.value) and "\n" not in str(rejected.value)


def test_overrides_after_a_flag_are_overrides_too(capsys):
    """`fedfer simulate k=v --references k2=v2` stopped at 'unrecognized arguments: k2=v2' (argparse reads one run
    of positionals); a word that is not key=value is still refused."""
    import pytest

    from fedfer.cli import parse

    args = parse(["simulate", "federation.rounds=3", "--references", "evaluation.central_epochs=2", "train.lr=1.0"])
    assert args.references and args.overrides == ["federation.rounds=3", "evaluation.central_epochs=2", "train.lr=1.0"]
    with pytest.raises(SystemExit) as stopped:
        parse(["simulate", "federation.rounds=3", "--references", "--nonsense"])
    assert stopped.value.code == 2 and "unrecognized arguments: --nonsense" in capsys.readouterr().err
