"""Noise in fewer dimensions: project each DP step's noised gradient onto a subspace found from public data.

The idea of projected DP-SGD (Zhou, Wu and Banerjee 2021, "Bypassing the ambient dimension"; Yu et al.
2021's GEP is its relative): the Gaussian noise of DP-SGD has the same size in every one of the model's
d coordinates, while the gradients of a pre-trained model live mostly in a few directions. The top-k
right singular vectors of a matrix of *public* per-sample gradients span those directions; projecting
the noised gradient onto them keeps k/d of the noise's energy and most of the signal's.

Privacy: the basis depends on the model the school received and on public data only, and the projection
is applied after the noise (``privacy.engine.AfterNoise``), so it is post-processing of the sampled
Gaussian mechanism: the accountant's record is unchanged.

Measured on the default district (docs/experiments.md, "Session 10"): it does *not* help there. The
public faces' subspace holds 86 % of the energy of a school's mean clipped gradient at k = 256, but the
remaining 14 % is the classroom domain the fine-tuning is for, and the in-domain accuracy falls. It is
kept as an option of the in-process benchmark (`simulations/bench/pretraining.py --subspace`), not of
the federation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from privacy.engine import LossFn


def trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DP-SGD updates (and the basis spans), in the model's order."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                  params: list[nn.Parameter]) -> torch.Tensor:
    """The gradient of the summed loss of (x, y) with respect to ``params``, as one vector (zeros where unused)."""
    grads = torch.autograd.grad(loss_fn(model, x, y).sum(), params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def public_gradient_basis(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, dims: int,
                          loss_fn: LossFn) -> torch.Tensor:
    """(k, d) orthonormal rows: the top-``dims`` right singular vectors of the public samples' per-sample
    gradients at ``model``'s current weights (k = min(dims, samples)). ``images`` are model inputs."""
    if dims < 1:
        raise ValueError(f"the subspace needs at least one dimension, got {dims}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need public samples with one label each (got {len(images)} images, {len(labels)} labels)")
    params = trained_parameters(model)
    was_training = model.training
    model.eval()   # norms use running statistics: one sample's gradient does not depend on the others
    try:
        rows = [flat_gradient(model, x[None], y.view(1), loss_fn, params) for x, y in zip(images, labels)]
    finally:
        model.train(was_training)
    _, _, vh = torch.linalg.svd(torch.stack(rows).double(), full_matrices=False)
    return vh[:dims].to(torch.float32).contiguous()


def projection(basis: torch.Tensor) -> Callable[[list[nn.Parameter]], None]:
    """An ``after_noise`` hook replacing the parameters' ``grad`` by its projection V^T V g onto ``basis``."""

    def project(params: list[nn.Parameter]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if flat.numel() != basis.shape[1]:
            raise ValueError(f"the subspace spans {basis.shape[1]} coordinates, the trained parameters have "
                             f"{flat.numel()}: it was computed for another model or another train.trainable")
        flat = basis.T @ (basis @ flat.to(basis.dtype))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    return project
