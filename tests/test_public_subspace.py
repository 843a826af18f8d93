"""privacy/public_subspace.py: the public-gradient basis, its projection, and the engine's after-noise hook."""

import pytest
import torch
from torch import nn

from privacy.engine import PrivateTrainer
from privacy.public_subspace import projection, public_gradient_basis, trained_parameters


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _public(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(_loss(model, x, y).sum(), trained_parameters(model))
    return torch.cat([g.reshape(-1) for g in grads])


def test_basis_is_orthonormal_and_spans_the_public_samples_gradients():
    model = _model()
    x, y = _public(10)
    basis = public_gradient_basis(model, x, y, dims=10, loss_fn=_loss)
    d = sum(p.numel() for p in model.parameters())
    assert basis.shape == (10, d)
    assert torch.allclose(basis @ basis.T, torch.eye(10), atol=1e-5)
    g = _flat_grad(model, x[3:4], y[3:4])   # one public sample's gradient lies in the span
    assert torch.allclose(basis.T @ (basis @ g), g, atol=1e-5)
    top2 = public_gradient_basis(model, x, y, dims=2, loss_fn=_loss)
    assert top2.shape == (2, d) and torch.allclose(top2.abs(), basis[:2].abs(), atol=1e-4)


def test_projection_keeps_the_span_and_removes_what_is_orthogonal_to_it():
    model = _model()
    params = trained_parameters(model)
    basis = public_gradient_basis(model, *_public(4), dims=4, loss_fn=_loss)
    inside = basis[0] * 2.0 - basis[3]
    outside = torch.randn(basis.shape[1])
    outside -= basis.T @ (basis @ outside)
    offset = 0
    for p in params:
        p.grad = (inside + outside)[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    projection(basis)(params)
    after = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(after, inside, atol=1e-5)


@pytest.mark.parametrize("clipping", ["ghost", "per-sample"])
def test_the_trainer_steps_only_inside_the_subspace_noise_included(clipping):
    """SGD without momentum: the model moves by -lr x the projected noisy gradient, so every step's change lies in
    the span. The noise (σ = 5, far larger than the signal) would leave it if the hook ran before the noise."""
    model = _model()
    basis = public_gradient_basis(model, *_public(3), dims=3, loss_fn=_loss)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    frames = [(torch.randn(6), int(i % 3)) for i in range(12)]
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.5), frames, [str(i // 2) for i in range(12)],
                             units_per_batch=3, frames_per_unit=2, noise_multiplier=5.0, max_grad_norm=1.0, seed=0,
                             declared_units=6, reproducible=True, clipping=clipping,
                             after_noise=projection(basis))
    for _ in range(3):
        trainer.step([0, 2, 4], _loss)
    trainer.close()
    assert trainer.clipping == clipping
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    assert moved.norm() > 1e-3
    assert torch.allclose(basis.T @ (basis @ moved), moved, atol=1e-5)


def test_a_basis_for_another_model_is_refused_with_a_clear_error():
    model = _model()
    basis = public_gradient_basis(model, *_public(2), dims=2, loss_fn=_loss)
    other = nn.Linear(6, 3)
    other.weight.grad, other.bias.grad = torch.zeros_like(other.weight), torch.zeros_like(other.bias)
    with pytest.raises(ValueError, match="another model"):
        projection(basis)(list(other.parameters()))
