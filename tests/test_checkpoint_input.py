"""Checkpoints and `run.resume` directories are untrusted input: loaded without running code, checked
field by field, refused in one line naming the file before any Flower process starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedfer.commands.results import load_checkpoint
from server.run_dir import CheckpointError, RunDirectory, check_resume_dir, load_checkpoint_file
from shared_models.models import registry
from shared_models.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def _run_with_checkpoint(tmp_path: Path, **changes) -> tuple[Path, Path]:
    """A run directory holding one real round-1 checkpoint (tiny model), with `changes` applied to it."""
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=r1"])
    run = RunDirectory.create(cfg)
    model = registry.build("hafnet", num_classes=7, preset="dp")
    target = run.save_checkpoint(1, model.state_dict(), {"name": "hafnet", "preset": "dp", "num_classes": 7}, cfg,
                                 {"exhausted": [], "momentum": None})
    if changes:
        checkpoint = torch.load(target, weights_only=True)
        for dotted, value in changes.items():
            node = checkpoint
            # config keys are dotted themselves: config.train.lr is checkpoint["config"]["train.lr"]
            *parents, leaf = dotted.split(".", 1) if dotted.startswith("config.") else dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        torch.save(checkpoint, target)
    return run.path, target


def test_a_written_run_directory_passes(tmp_path):
    run, target = _run_with_checkpoint(tmp_path)
    path, checkpoint, cfg = check_resume_dir(run)
    assert path == target and checkpoint["round"] == 1 and cfg["model.name"] == "hafnet"
    assert load_checkpoint(run)["_path"] == str(target)


def _one_line(exc: pytest.ExceptionInfo, needle: str) -> None:
    assert needle in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("content", [
    os.urandom(4096),                                   # random bytes
    b"this is not a checkpoint\n" * 10,                 # text
    b"",                                                # empty
])
def test_garbage_checkpoints_name_the_file(tmp_path, content):
    run, target = _run_with_checkpoint(tmp_path)
    target.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        check_resume_dir(run)
    _one_line(err, str(target))


def test_truncated_checkpoint_names_the_file(tmp_path):
    run, target = _run_with_checkpoint(tmp_path)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(target)
    _one_line(err, str(target))


@pytest.mark.parametrize("field, value, needle", [
    ("model.num_classes", "abc", "model.num_classes"),
    ("model.num_classes", 10**9, "model.num_classes"),
    ("model.name", "resnet", "model.name"),
    ("model.preset", 3, "model.preset"),
    ("round", -1, "'round'"),
    ("strategy.exhausted", "school-01", "strategy.exhausted"),
    ("config", None, "'config'"),
])
def test_wrong_field_types_name_the_file_and_field(tmp_path, field, value, needle):
    run, target = _run_with_checkpoint(tmp_path, **{field: value})
    with pytest.raises(CheckpointError) as err:
        check_resume_dir(run)
    _one_line(err, str(target))
    assert needle in str(err.value)


def test_config_inside_a_checkpoint_is_validated(tmp_path):
    run, target = _run_with_checkpoint(tmp_path, **{"config.train.lr": float("nan")})
    with pytest.raises(CheckpointError) as err:
        check_resume_dir(run)
    _one_line(err, "train.lr")


def test_weights_that_do_not_fit_the_model(tmp_path):
    run, target = _run_with_checkpoint(tmp_path, state_dict={"x": torch.zeros(3)})
    with pytest.raises(CheckpointError) as err:
        check_resume_dir(run)
    _one_line(err, "do not fit")


@pytest.mark.parametrize("latest, needle", [
    (None, "missing"),
    ("{not json", "unreadable"),
    ("[]", "JSON object"),
    ('{"round": 1, "file": "../../../etc/passwd"}', "field 'file'"),
    ('{"round": "one", "file": "round-0001.pt"}', "field 'round'"),
    ('{"round": 2, "file": "round-0001.pt"}', "says round 2"),
    ('{"round": 1, "file": "round-0009.pt"}', "not found"),
])
def test_bad_latest_json(tmp_path, latest, needle):
    run, _ = _run_with_checkpoint(tmp_path)
    path = run / "checkpoints" / "latest.json"
    if latest is None:
        path.unlink()
    else:
        path.write_text(latest)
    with pytest.raises(CheckpointError) as err:
        check_resume_dir(run)
    _one_line(err, needle)


def test_resume_path_that_is_not_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_resume_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        check_resume_dir(tmp_path / "file")
    with pytest.raises(CheckpointError, match="latest.json: missing"):
        check_resume_dir(tmp_path)


class _Marker:
    """Unpickling this runs `open(marker, "w")`: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_checkpoint_does_not_execute_on_resume(tmp_path):
    run, target = _run_with_checkpoint(tmp_path)
    checkpoint = torch.load(target, weights_only=True)
    marker = tmp_path / "executed"
    checkpoint["strategy"]["payload"] = _Marker(marker)
    torch.save(checkpoint, target)
    # the file really is malicious: an unsafe load creates the marker
    proof = tmp_path / "proof"
    checkpoint["strategy"]["payload"] = _Marker(proof)
    torch.save(checkpoint, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()

    with pytest.raises(CheckpointError) as err:
        check_resume_dir(run)
    _one_line(err, str(target))
    with pytest.raises(ValueError):
        load_checkpoint(run)                    # `fedfer evaluate`'s reader
    # and the command: one line, exit 2, no Flower process, no marker
    proc = subprocess.run([sys.executable, "-m", "fedfer", "simulate", f"run.resume={run}",
                           f"run.root={tmp_path / 'runs'}"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()]
    assert str(target) in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../x", "/abs", "a/b", "..", ".hidden"])
def test_run_name_stays_inside_run_root(tmp_path, name):
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, [f"run.root={tmp_path}", f"run.name={name}"])
    assert list(tmp_path.iterdir()) == []


def test_run_directory_refuses_to_leave_root_even_unvalidated(tmp_path):
    with pytest.raises(ConfigError, match="run.name"):
        RunDirectory.create({"run.root": str(tmp_path / "runs"), "run.name": "../escaped"})
    assert not (tmp_path / "escaped").exists()


def test_a_file_that_is_not_a_checkpoint_says_so_not_the_parsers_internals(tmp_path):
    csv = tmp_path / "fer2013.csv"
    csv.write_text("emotion,pixels,Usage\n0,1 2 3,Training\n")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(csv)
    assert str(err.value) == f"{csv}: not a readable fedfer checkpoint (not a torch checkpoint file)"
