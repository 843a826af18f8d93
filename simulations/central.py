"""Centralised reference training: all synthetic schools pooled, one model, the same training code and
the same evaluation as the federation, so federated and private figures have a baseline."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from shared_models.datasets.school_folder import SchoolData, load_school
from client.training import DPPlan, FaceDataset, train_plain, train_private
from shared_models.models import registry
from shared_models.evaluation import evaluate_benchmarks
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


def train_central(cfg: Mapping[str, Any], root: Path, epochs: int, dp: bool,
                  echo: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(int(cfg["run.seed"]))
    torch.set_num_threads(max(1, int(cfg["train.threads"])))
    data = pooled_schools(root)
    model = registry.build_from_config(cfg)
    started = time.perf_counter()
    history = []
    epsilon = None
    plan = None
    if dp:
        from privacy.accounting import calibrate_noise, SchoolAccountant

        unit = str(cfg["privacy.unit"])
        num_units = data.num_students if unit == "student" else len(data)
        units_per_batch = min(int(cfg["train.batch_size"]), num_units)
        q = units_per_batch / num_units
        steps_per_epoch = max(1, round(1 / q))
        sigma = calibrate_noise(float(cfg["privacy.target_epsilon"]), float(cfg["privacy.delta"]), q,
                                steps_per_epoch * epochs, accountant=str(cfg["privacy.accountant"]))
        plan = DPPlan(unit, num_units, units_per_batch, q, steps_per_epoch, sigma, float(cfg["privacy.max_grad_norm"]))
        steps_total = 0
    one_epoch = {**cfg, "train.local_epochs": 1}
    for epoch in range(1, epochs + 1):
        if dp:
            stats = train_private(model, data, one_epoch, plan, seed=epoch)
            steps_total += int(stats["steps"])
        else:
            dataset = FaceDataset(data.images, data.labels, train_transform(model.input_size, bool(cfg["train.augment"])))
            stats = train_plain(model, dataset, cfg, epochs=1, seed=epoch)
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
        "final": {b: {k: m[k] for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "uar", "macro_f1", "n")}
                  for b, m in results.items()},
        "history": history, "seconds": round(time.perf_counter() - started, 1),
    }
