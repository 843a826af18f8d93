"""Local training of one school's model: DP-SGD through privacy.student_dp, or plain SGD.

The same functions serve the federated client, `fedfer train-central` and the benchmarks, so a
centralised figure and a federated figure are measured the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared_models.datasets.school_folder import SchoolData
from shared_models.models import registry
from shared_models.transforms import eval_transform, to_tensor_image, train_transform


class FaceDataset(Dataset):
    """In-memory uint8 faces -> (float tensor (3, S, S), label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(to_tensor_image(self.images[index])), int(self.labels[index])


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's full training loss (CE + its auxiliary terms), one value per frame."""
    return registry.per_sample_loss(model, model(x), y)


@dataclass(frozen=True)
class DPPlan:
    """What one round of DP training at a school will do, known before it runs (for the budget guard)."""

    unit: str               # student | image
    num_units: int
    units_per_batch: int
    sample_rate: float      # Poisson rate over units: the q the accountant uses
    steps: int              # DP steps this round
    noise_multiplier: float
    max_grad_norm: float


def plan_round(data: SchoolData, cfg: Mapping[str, Any]) -> DPPlan:
    """Sampling rate, steps and noise for one round at this school.

    Noise is calibrated so that a school sampled in every one of `federation.rounds` rounds ends at
    `privacy.target_epsilon` (unless `privacy.noise_multiplier` fixes it).
    """
    unit = cfg["privacy.unit"]
    num_units = data.num_students if unit == "student" else len(data)
    units_per_batch = max(1, min(int(cfg["train.batch_size"]), num_units))
    sample_rate = units_per_batch / num_units
    steps = int(cfg["train.local_epochs"]) * max(1, round(1.0 / sample_rate))
    sigma = float(cfg["privacy.noise_multiplier"])
    if sigma <= 0.0:
        sigma = _calibrated_noise(float(cfg["privacy.target_epsilon"]), float(cfg["privacy.delta"]), sample_rate,
                                  steps * int(cfg["federation.rounds"]), str(cfg["privacy.accountant"]))
    return DPPlan(unit, num_units, units_per_batch, sample_rate, steps, sigma, float(cfg["privacy.max_grad_norm"]))


@functools.lru_cache(maxsize=64)
def _calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The PRV search takes seconds; a school's plan is the same every round, so do it once per process."""
    from privacy.accounting import calibrate_noise

    return calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                           accountant=accountant)


def make_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    if cfg["train.optimizer"] == "adam":
        # Adam's per-coordinate step size moves a model trained from scratch in far fewer steps, which
        # matters under DP where every step costs privacy. The DP noise is added before Adam sees the
        # gradient (Opacus DPOptimizer wraps it), so the guarantee is the same as for SGD.
        return torch.optim.Adam(model.parameters(), lr=float(cfg["train.lr"]),
                                weight_decay=float(cfg["train.weight_decay"]))
    return torch.optim.SGD(
        model.parameters(),
        lr=float(cfg["train.lr"]),
        momentum=float(cfg["train.momentum"]),
        weight_decay=float(cfg["train.weight_decay"]),
    )


def train_private(model: nn.Module, data: SchoolData, cfg: Mapping[str, Any], plan: DPPlan, seed: int) -> dict[str, float]:
    """One round of DP-SGD at the privacy unit of `plan`; returns steps, mean loss and frames seen."""
    from privacy.student_dp import PrivateTrainer

    frames = FaceDataset(data.images, data.labels, train_transform(model.input_size, bool(cfg["train.augment"])))
    trainer = PrivateTrainer(
        model,
        make_optimizer(model, cfg),
        frames,
        unit_ids=data.student_ids if plan.unit == "student" else None,
        units_per_batch=plan.units_per_batch,
        frames_per_unit=int(cfg["train.frames_per_student"]) if plan.unit == "student" else 1,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        seed=seed,
    )
    steps = 0
    losses: list[float] = []
    frames_seen = 0
    try:
        for _ in range(int(cfg["train.local_epochs"])):
            stats = trainer.train_epoch(per_sample_loss)
            steps += int(stats["steps"])
            losses.append(float(stats["loss"]))
            frames_seen += int(stats["frames"])
    finally:
        trainer.close()  # detach Opacus' hooks: the model is evaluated, sent or trained again afterwards
    return {"steps": steps, "loss": float(np.mean(losses)) if losses else float("nan"), "frames": frames_seen}


def train_plain(model: nn.Module, dataset: Dataset, cfg: Mapping[str, Any], epochs: int, seed: int) -> dict[str, float]:
    """Non-private minibatch SGD (privacy.enabled=false, and the centralised reference)."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=int(cfg["train.batch_size"]) * int(cfg["train.frames_per_student"]),
                        shuffle=True, generator=generator, drop_last=False)
    optimizer = make_optimizer(model, cfg)
    model.train()
    total, count, steps = 0.0, 0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = per_sample_loss(model, x, y).mean()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
            steps += 1
    return {"steps": steps, "loss": total / max(count, 1), "frames": count}


def eval_dataset(data: SchoolData, input_size: int) -> FaceDataset:
    return FaceDataset(data.images, data.labels, eval_transform(input_size))
