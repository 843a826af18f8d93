"""Clips end to end on tiny files the tests write: the school-folder clip format (clip_id, frame, engagement,
landmarks.npy), student-level DP over clips, the clip readers feeding a clip model through the evaluation
code with WAR/UAR, and the model.task key."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privacy.engine import PrivateTrainer
from shared_models.config import ConfigError, load_config
from shared_models.datasets.school_folder import SchoolDataError, load_school, load_school_clips
from shared_models.evaluation import evaluate_benchmarks
from shared_models.models import registry
from shared_models.models.mafnet import unpack_landmarks
from shared_models.output import FEROutput
from shared_models.training import ClipDataset, clip_dataset

SIDE = 48


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIDE, SIDE, 3), value, np.uint8)).save(path)


def _school(tmp_path: Path, *, engagement: bool = True) -> Path:
    """Two students: st-a has clips ca (4 frames, listed out of order) and cb (3 frames, the last missing on
    disk), st-b has clip cc (2 frames); one still. Frame k of a clip is a flat image of value 10 k + c."""
    root = tmp_path / "school"
    header = "path,label,student_id,clip_id,frame" + (",engagement" if engagement else "")
    rows = [header, "still.png,happy,st-a,,-1" + ("," if engagement else "")]
    _png(root / "still.png", 200)
    plan = [("ca", "st-a", 4, "sad", "high"), ("cb", "st-a", 3, "fear", "1"), ("cc", "st-b", 2, "angry", "3")]
    for c, (clip, student, n, label, level) in enumerate(plan):
        for k in reversed(range(n)):
            rel = f"clips/{clip}/f{k}.png"
            if not (clip == "cb" and k == 2):
                _png(root / rel, 10 * k + c)
            rows.append(f"{rel},{label},{student},{clip},{k}" + (f",{level}" if engagement else ""))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    marks = np.arange(len(rows) - 1, dtype=np.float32)[:, None, None] * np.ones((1, 68, 2), np.float32)
    np.save(root / "landmarks.npy", marks)   # row i of labels.csv: every coordinate = i
    return root


def test_school_clips_are_grouped_ordered_labelled_and_carry_their_landmarks(tmp_path: Path) -> None:
    root = _school(tmp_path)
    clips = load_school_clips(root, num_frames=2, task="engagement")
    assert len(clips) == 2 and clips.student_ids == ["st-a", "st-b"]          # cb skipped: a frame is missing
    assert clips.skipped == {"unreadable clips": 1}
    assert clips.labels.tolist() == [2, 3]                                     # "high", "3"
    assert clips.clips.shape == (2, 2, SIDE, SIDE, 3)
    assert clips.clips[0, :, 0, 0, 0].tolist() == [0, 30]                      # frames 0 and 3 of ca, in order
    # ca's rows in labels.csv are 1..4 (frame 3 first): frame 0 is row 4, frame 3 row 1
    assert clips.landmarks is not None and clips.landmarks[0, :, 0, 0].tolist() == [4.0, 1.0]
    fer = load_school_clips(root, num_frames=2, task="fer7")
    assert fer.labels.tolist() == [4, 0]                                       # sad, angry
    assert len(load_school(root)) == 1                                         # image models still read stills only


def test_school_clip_errors_name_the_file(tmp_path: Path) -> None:
    root = _school(tmp_path, engagement=False)
    with pytest.raises(SchoolDataError, match="labels.csv: missing column engagement"):
        load_school_clips(root, 2, "engagement")
    np.save(root / "landmarks.npy", np.zeros((3, 68, 2), np.float32))
    with pytest.raises(SchoolDataError, match="landmarks.npy: expected float"):
        load_school_clips(root, 2, "fer7")


def test_clip_dataset_packs_landmarks_for_landmark_models_only(tmp_path: Path) -> None:
    data = load_school_clips(_school(tmp_path), 2, "engagement")
    mafnet = registry.build("mafnet", 4, "dp")
    x, y = clip_dataset(data, mafnet)[0]
    assert x.shape == (3, 2, SIDE + 1, SIDE) and y == 2
    pixels, marks, present = unpack_landmarks(x.unsqueeze(0), SIDE)
    assert present.tolist() == [1.0] and marks[0, 1, 0, 0] == pytest.approx(1.0 / SIDE)
    assert pixels.min() >= -1 and pixels.max() <= 1
    plain = ClipDataset(data.clips, data.labels, SIDE)
    assert plain[0][0].shape == (3, 2, SIDE, SIDE)


def test_student_level_dp_over_clips_samples_students_not_clips(tmp_path: Path) -> None:
    data = load_school_clips(_school(tmp_path), 2, "engagement")
    data.clips = np.concatenate([data.clips] * 3)          # 6 clips of the same 2 students
    data.labels = np.concatenate([data.labels] * 3)
    data.landmarks = np.concatenate([data.landmarks] * 3)
    data.student_ids = data.student_ids * 3
    model = registry.build("mafnet", 4, "dp")
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), clip_dataset(data, model),
                             data.student_ids, units_per_batch=2, frames_per_unit=2, noise_multiplier=1.0,
                             max_grad_norm=1.0, seed=3, declared_units=2, reproducible=True)
    assert trainer.num_units == 2 and trainer.sample_rate == 1.0
    seen = {}

    def loss(m, x, y):
        seen["clips"] = x.shape[0]
        return registry.per_sample_loss(m, m(x), y)

    before = [p.detach().clone() for p in model.parameters()]
    trainer.step([0, 1], loss)
    assert seen["clips"] == 4                                 # 2 clips of each of the 2 sampled students
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    trainer.close()


class _MeanBrightness(torch.nn.Module):
    """A clip model whose logits say which class the clip's mean brightness falls in (checks the wiring)."""

    def __init__(self, classes: int, frames: int) -> None:
        super().__init__()
        self.input_size, self.clip_frames, self.classes = SIDE, frames, classes

    def forward(self, x: torch.Tensor) -> FEROutput:
        assert x.shape[1:] == (3, self.clip_frames, SIDE, SIDE)
        level = ((x.mean(dim=(1, 2, 3, 4)) + 1) / 2 * self.classes).long().clamp(0, self.classes - 1)
        return FEROutput(torch.nn.functional.one_hot(level, self.classes).float(), {})


def _clip(folder: Path, value: int, frames: int = 3) -> None:
    for k in range(frames):
        _png(folder / f"{k:03d}.png", value)


def test_clip_readers_feed_clip_models_with_war_and_uar(tmp_path: Path) -> None:
    dfew = tmp_path / "DFEW"
    split = dfew / "EmoLabel_DataSplit" / "test(single-labeled)"
    split.mkdir(parents=True)
    (split / "set_1.csv").write_text("video_name,label\n1,1\n2,3\n")   # happy (idx 3), neutral (idx 6)
    _clip(dfew / "Clip" / "jpg_256" / "00001", 140)                     # -> brightness class 3 of 7
    _clip(dfew / "Clip" / "jpg_256" / "00002", 140)                     # wrong for neutral
    daisee = tmp_path / "DAiSEE"
    (daisee / "Labels").mkdir(parents=True)
    (daisee / "Labels" / "TestLabels.csv").write_text(
        "ClipID,Boredom,Engagement,Confusion,Frustration \n1100011001.avi,0,0,0,0\n1100011002.avi,0,3,0,0\n")
    _clip(daisee / "DataSet" / "Test" / "110001" / "1100011001", 10)    # very low
    _clip(daisee / "DataSet" / "Test" / "110001" / "1100011002", 250)   # very high
    cfg = {"evaluation.bootstrap": 0, "run.seed": 0}
    fer = evaluate_benchmarks(_MeanBrightness(7, 2), f"dfew={dfew}", None, cfg)["dfew"]
    assert fer["n"] == 2 and fer["war"] == fer["accuracy"] == 0.5 and fer["uar"] == 0.5
    engaged = evaluate_benchmarks(_MeanBrightness(4, 2), f"daisee={daisee}", None, cfg)["daisee"]
    assert engaged["war"] == 1.0 and engaged["uar"] == 1.0 and len(engaged["per_class_recall"]) == 4
    with pytest.raises(ValueError, match="reads clips"):
        from shared_models.evaluation import evaluate_model
        evaluate_model(_MeanBrightness(7, 2), [(torch.zeros(3, SIDE, SIDE), 0)], num_classes=7, n_boot=0)


def test_mafnet_on_a_clip_folder_uses_landmarks_beside_the_frames(tmp_path: Path, caplog) -> None:
    root = tmp_path / "clipfolder"
    for name, value in (("a", 30), ("b", 200)):
        _clip(root / name, value, frames=4)
    np.save(root / "a" / "landmarks.npy", np.full((4, 68, 2), 24.0, np.float32))
    (root / "labels.csv").write_text("clip,label\na,happy\nb,sad\n")
    model = registry.build("mafnet", 7, "dp")
    cache: dict = {}
    with caplog.at_level(logging.WARNING, logger="fedfer"):
        result = evaluate_benchmarks(model, f"clipfolder={root}", None, {"evaluation.bootstrap": 0, "run.seed": 0},
                                     cache)["clipfolder"]
    assert result["n"] == 2 and not caplog.records      # the row is there (absent for b): no warning
    dataset = next(iter(cache.values()))
    s = model.input_size
    (with_marks, _), (without, _) = dataset[0], dataset[1]
    assert with_marks.shape == (16, 3, s + 1, s)          # the reader's 16 frames (4 on disk, repeated)
    assert with_marks[:, 0, s, 0].tolist() == [1.0] * 16 and with_marks[0, 0, s, 1] == pytest.approx(24.0 / SIDE)
    assert without[:, :, s].abs().sum() == 0            # no landmarks.npy: the row says absent
    model(torch.zeros(1, 3, 8, model.input_size, model.input_size))
    model(torch.zeros(1, 3, 8, model.input_size, model.input_size))
    assert len([r for r in caplog.records if "deep stream alone" in r.getMessage()]) == 1


def test_task_key_sets_outputs_and_needs_a_clip_model_for_engagement() -> None:
    cfg = load_config(None, {"model.name": "mafnet", "model.preset": "dp", "model.task": "engagement",
                             "evaluation.benchmarks": "synthetic-daisee"})
    assert registry.build_from_config(cfg).num_classes == 4 and registry.model_info(cfg)["num_classes"] == 4
    with pytest.raises(ConfigError, match="model.task' engagement needs a clip model"):
        load_config(None, {"model.name": "hafnet", "model.task": "engagement"})
    with pytest.raises(ConfigError, match="model.task"):
        load_config(None, {"model.task": "boredom"})
    with pytest.raises(ConfigError, match="mafnet dp reads clips; 'synthetic-fer2013' holds single images"):
        load_config(None, {"model.name": "mafnet", "model.preset": "dp", "evaluation.benchmarks": "synthetic-fer2013"})
    with pytest.raises(ConfigError, match="does not score model.task fer7"):
        load_config(None, {"model.name": "mafnet", "model.preset": "dp", "evaluation.benchmarks": "synthetic-daisee"})


def test_clip_folder_label_naming_a_clip_outside_the_folder_is_skipped(tmp_path: Path) -> None:
    from shared_models.datasets import open_benchmark

    root = tmp_path / "clipfolder"
    _clip(root / "a", 30)
    _clip(tmp_path / "outside", 200)
    (root / "labels.csv").write_text(f"clip,label\na,happy\n../outside,sad\n{tmp_path / 'outside'},sad\n")
    bench = open_benchmark(f"clipfolder={root}")
    assert len(bench) == 1 and bench.skipped == 2
    assert all("leaves" in why for _, why in bench.skipped_files), bench.skipped_files
