"""Image transforms shared by school training, the evaluation node and `fedfer evaluate`.

Every reader yields faces as uint8 numpy arrays, (H, W) grayscale or (H, W, 3) RGB, of any size.
They become float tensors (3, S, S) scaled to [-1, 1]; S is the model preset's input size.
Grayscale is replicated to three channels so FER2013-style data fits RGB models.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def to_tensor_image(face: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, 3) -> uint8 tensor (3, H, W)."""
    if face.ndim == 2:
        face = np.repeat(face[:, :, None], 3, axis=2)
    if face.ndim != 3 or face.shape[2] != 3:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {face.shape}")
    return torch.from_numpy(np.ascontiguousarray(face)).permute(2, 0, 1)


def eval_transform(input_size: int) -> v2.Compose:
    """Resize and normalise; no randomness."""
    return v2.Compose([
        v2.Resize((input_size, input_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def train_transform(input_size: int, augment: bool = True) -> v2.Compose:
    """The eval transform plus the HAFNet paper's augmentation (flip p=0.5, small rotation),
    and an occasional grayscale so models trained on colour cameras also read FER2013-style data."""
    if not augment:
        return eval_transform(input_size)
    return v2.Compose([
        v2.Resize((input_size, input_size), antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.RandomRotation(15)], p=0.5),
        v2.RandomGrayscale(p=0.1),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])
