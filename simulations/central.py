"""Centralised reference training: all synthetic schools pooled, one model, the same training code and
the same evaluation as the federation, so federated and private figures have a baseline."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from privacy.engine import plan_from_config, train_private
from torch.utils.data import Dataset

from shared_models.datasets.school_folder import SchoolClips, SchoolData, load_school, load_school_clips
from shared_models.evaluation import evaluate_benchmarks
from shared_models.models import registry
from shared_models.training import FaceDataset, clip_dataset, make_optimizer, train_plain
from shared_models.transforms import train_transform


def pooled_schools(root: Path) -> SchoolData:
    """Every school's frames in one SchoolData; student ids stay unique by school prefix."""
    parts = [load_school(d) for d in sorted((root / "schools").iterdir()) if d.is_dir()]
    return SchoolData(
        data_dir=root / "schools",
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        student_ids=[f"{p.data_dir.name}/{s}" for p in parts for s in p.student_ids],
        fingerprint="+".join(p.fingerprint[:12] for p in parts),
    )


def pooled_school_clips(root: Path, frames: int, task: str) -> SchoolClips:
    """Every school's clips in one SchoolClips (student ids prefixed by school); landmarks only if every
    school has them."""
    parts = [load_school_clips(d, frames, task) for d in sorted((root / "schools").iterdir()) if d.is_dir()]
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError(f"{root / 'schools'}: no clips (set data.clips_per_student > 0)")
    marks = [p.landmarks for p in parts]
    return SchoolClips(
        data_dir=root / "schools", clips=np.concatenate([p.clips for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        student_ids=[f"{p.data_dir.name}/{s}" for p in parts for s in p.student_ids],
        landmarks=None if any(m is None for m in marks) else np.concatenate(marks), task=task)


def _training_set(data: SchoolData | SchoolClips, model: torch.nn.Module, cfg: Mapping[str, Any]) -> Dataset:
    if isinstance(data, SchoolClips):
        return clip_dataset(data, model)
    return FaceDataset(data.images, data.labels, train_transform(model.input_size, bool(cfg["train.augment"])))


def train_central(cfg: Mapping[str, Any], root: Path, epochs: int, dp: bool,
                  echo: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(int(cfg["run.seed"]))
    from shared_models.threads import apply_threads

    apply_threads(int(cfg["train.threads"]))
    clip_frames = registry.config_clip_frames(cfg)
    data = (pooled_school_clips(root, clip_frames, str(cfg.get("model.task", "fer7"))) if clip_frames
            else pooled_schools(root))
    model = registry.build_from_config(cfg)
    started = time.perf_counter()
    history = []
    epsilon = None
    plan = None
    if dp:
        unit = str(cfg["privacy.unit"])
        # the pooled reference is not a school: its declared size is its true number of units
        num_units = data.num_students if unit == "student" else len(data)
        # the engine's rule with one local epoch per "round", `epochs` rounds
        plan = plan_from_config({**cfg, "train.local_epochs": 1, "federation.rounds": epochs}, num_units)
        frames = _training_set(data, model, cfg)
        steps_total = 0
    # one optimiser for the whole run, as a school keeps its own within a round: its momentum (or Adam's
    # moments) carries over from one epoch to the next instead of restarting every epoch
    optimizer = make_optimizer(model, cfg, plan.noise_multiplier if plan else None)
    for epoch in range(1, epochs + 1):
        if dp:
            result = train_private(model, frames, data.student_ids if unit == "student" else None, plan,
                                   optimizer, local_epochs=1, clipping=str(cfg["privacy.clipping"]))
            steps_total += result.steps
            stats = {"loss": result.mean_loss}
        else:
            dataset = _training_set(data, model, cfg)
            stats = train_plain(model, dataset, cfg, epochs=1, seed=epoch, optimizer=optimizer)
        if epoch == epochs or epoch % max(1, epochs // 5) == 0:
            results = evaluate_benchmarks(model, str(cfg["evaluation.benchmarks"]), root, cfg)
            accs = {b: round(m["accuracy"], 4) for b, m in results.items()}
            history.append({"epoch": epoch, "loss": stats["loss"], **accs})
            echo(f"epoch {epoch}/{epochs}: loss {stats['loss']:.3f} accuracy {accs} ({time.perf_counter() - started:.0f} s)")
    if dp:
        from opacus.accountants import PRVAccountant

        acct = PRVAccountant()
        acct.history = [(plan.noise_multiplier, plan.sample_rate, steps_total)]
        epsilon = float(acct.get_epsilon(float(cfg["privacy.delta"])))
    return {
        "command": " ".join(["fedfer", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("fedfer") else "train_central()",
        "model": cfg["model.name"], "preset": cfg["model.preset"], "dp": dp, "epochs": epochs,
        "privacy_unit": cfg["privacy.unit"] if dp else None,
        "noise_multiplier": plan.noise_multiplier if plan else None,
        "epsilon": epsilon, "delta": float(cfg["privacy.delta"]) if dp else None,
        "train_frames": len(data), "train_students": data.num_students,
        "final": {b: {k: m[k] for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "uar", "war", "macro_f1", "n")}
                  for b, m in results.items()},
        "history": history, "seconds": round(time.perf_counter() - started, 1),
    }
