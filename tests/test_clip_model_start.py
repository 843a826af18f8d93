"""A clip model in a simulation: the default `model.pretrain=auto` pre-trains on still faces, which a clip model
cannot read — docs/models.md's own `fedfer simulate model.name=mafnet …` ended in "internal error: RuntimeError:
Given groups=1, weight of size [8, 3, 1, 5, 5] …" (and r2plus1d_sta in a ValueError) after building the data.
Now `fedfer simulate` starts a clip model from scratch and says so; `fedfer pretrain` refuses it in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared_models.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ["model.name=mafnet", "model.preset=dp", "model.task=engagement", "data.clips_per_student=1",
         "evaluation.benchmarks=synthetic-daisee"]


def test_simulate_starts_a_clip_model_from_scratch_and_says_so(tmp_path, monkeypatch, capsys):
    from fedfer.commands import simulate

    def no_pretraining(cfg):
        raise AssertionError("pre-training started for a clip model")

    monkeypatch.setattr(simulate, "_pretrain_auto", no_pretraining)
    cfg = load_config(None, [*CLIPS, f"run.root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"])
    assert cfg["model.pretrain"] == "auto"
    assert simulate._resolve_run_config(cfg) == (0, None)
    assert cfg["model.pretrain"] == "" and cfg["model.pretrained"] == ""
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "mafnet reads clips" in out and "starts from scratch" in out


@pytest.mark.parametrize("model", [["model.name=mafnet", "model.preset=dp"], ["model.name=r2plus1d_sta", "model.preset=dp"]])
def test_pretraining_refuses_a_clip_model_in_one_line(tmp_path, model):
    from simulations.pretrain import PretrainError, data_specs

    cfg = load_config(None, [*model, "data.clips_per_student=1", "evaluation.benchmarks=synthetic-clips"])
    with pytest.raises(PretrainError, match="reads clips and pre-training trains on still faces"):
        data_specs(cfg, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "fedfer", "pretrain", "--data-root", str(tmp_path / "data"),
                           "--out", str(tmp_path / "p.pt"), *model, "data.clips_per_student=1",
                           "evaluation.benchmarks=synthetic-clips"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "reads clips" in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists()   # refused before building any data
