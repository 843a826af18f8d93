"""Plain (non-private) training helpers both apps and the harnesses share: the face dataset, the
optimizer from config, the per-frame loss, plain minibatch SGD and the evaluation dataset.

Differentially private training is privacy/engine.py; it uses these pieces.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared_models.models import registry
from shared_models.transforms import eval_transform, to_tensor_image


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


class ClipDataset(Dataset):
    """In-memory uint8 clips (N, T, H, W, 3) -> (float tensor (3, T, S, S) in [-1, 1], label), the input of a
    clip model (`registry.clip_frames(model) > 0`). With `landmarks` (N, T, 68, 2) in pixels of the H x W
    frames, the landmark row of `mafnet.pack_landmarks` is appended (for models with `reads_landmarks`).
    No augmentation: a flip would have to mirror the landmark layout too."""

    def __init__(self, clips: np.ndarray, labels: np.ndarray, input_size: int,
                 landmarks: np.ndarray | None = None) -> None:
        self.clips = clips
        self.labels = labels
        self.landmarks = landmarks
        self.transform = eval_transform(input_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        frames = torch.from_numpy(np.ascontiguousarray(self.clips[index])).permute(0, 3, 1, 2)  # (T, 3, H, W)
        x = self.transform(frames).permute(1, 0, 2, 3).contiguous()  # (3, T, S, S)
        if self.landmarks is not None:
            from shared_models.models.mafnet import pack_landmarks

            marks = torch.from_numpy(self.landmarks[index]).unsqueeze(0)
            x = pack_landmarks(x.unsqueeze(0), marks, float(self.clips.shape[2])).squeeze(0)
        return x, int(self.labels[index])


def clip_dataset(data: Any, model: nn.Module) -> ClipDataset:
    """A school's `SchoolClips` as the model's training set; landmarks only for a model that reads them."""
    reads = bool(getattr(registry.unwrap(model), "reads_landmarks", False))
    if reads and data.landmarks is None:
        import warnings

        warnings.warn(f"{data.data_dir}: no landmarks.npy next to labels.csv: {type(registry.unwrap(model)).__name__} "
                      "trains its deep stream alone", stacklevel=2)
    return ClipDataset(data.clips, data.labels, int(model.input_size), data.landmarks if reads else None)


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's full training loss (CE + its auxiliary terms), one value per frame."""
    return registry.per_sample_loss(model, model(x), y)


def step_size(cfg: Mapping[str, Any], noise_multiplier: float | None = None) -> float:
    """The round's learning rate: ``train.lr``, lowered when the round's σ is above
    ``train.lr_noise_reference`` by (reference / σ) ** ``train.lr_noise_power``. A step that suits σ 1.4
    makes a noisier round a random walk: at ε 1 (σ 7.6) the default district fell from 0.78 to 0.60 with
    lr 1.5 and rose to 0.81 with lr 0.4. Power 1 (the default) keeps lr × σ, the noise a step adds to the
    weights, at the reference's (docs/experiments.md, sessions 14-15). σ is public (the ledger holds
    it), so the rule costs no privacy. No σ (non-private training) or a reference of 0: ``train.lr``."""
    lr = float(cfg["train.lr"])
    reference = float(cfg.get("train.lr_noise_reference", 0.0))
    if noise_multiplier is None or reference <= 0 or noise_multiplier <= reference:
        return lr
    return lr * (reference / float(noise_multiplier)) ** float(cfg["train.lr_noise_power"])


def make_optimizer(model: nn.Module, cfg: Mapping[str, Any],
                   noise_multiplier: float | None = None) -> torch.optim.Optimizer:
    """The schools' optimiser at :func:`step_size` for a round with noise multiplier ``noise_multiplier``."""
    lr = step_size(cfg, noise_multiplier)
    if cfg["train.optimizer"] == "adam":
        # Adam's per-coordinate step size moves a model trained from scratch in far fewer steps, which
        # matters under DP where every step costs privacy. The DP noise is added before Adam sees the
        # gradient (Opacus DPOptimizer wraps it), so the guarantee is the same as for SGD.
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=float(cfg["train.weight_decay"]))
    return torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=float(cfg["train.momentum"]),
        weight_decay=float(cfg["train.weight_decay"]),
    )


def train_plain(model: nn.Module, dataset: Dataset, cfg: Mapping[str, Any], epochs: int, seed: int,
                optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """Non-private minibatch SGD: the centralised reference (never a school's round: schools always use DP).
    `optimizer`: one the caller keeps across calls (a new :func:`make_optimizer` one when None)."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=int(cfg["train.batch_size"]) * int(cfg["train.frames_per_student"]),
                        shuffle=True, generator=generator, drop_last=False)
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
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

