"""Every model and preset is trainable with Opacus: the validator reports nothing, and the per-sample
gradients Opacus computes (GradSampleModule, hooks mode) of the FULL training loss (cross-entropy plus
the auxiliary terms) equal gradients computed one sample at a time.

float64 keeps the comparison about correctness rather than float32 summation order; the paper presets
run with a batch of 2 to stay light.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from shared_models.models import registry


warnings.filterwarnings("ignore", message=".*full backward hook.*")

CASES = [("hafnet", "cpu", 3), ("hafnet", "dp", 3), ("sfer_mdfae", "cpu", 3), ("sfer_mdfae", "dp", 3), ("hafnet", "paper", 2), ("sfer_mdfae", "paper", 2)]


def _batch(model: torch.nn.Module, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = model.input_size
    x = torch.rand(batch, 3, s, s, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.tensor([3, 0, 5][:batch])
    return x, y


def per_sample_reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Gradients of each sample's loss, one backward pass per sample (no Opacus)."""
    grads = []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        out = model(x[i:i + 1])
        registry.per_sample_loss(model, out, y[i:i + 1]).sum().backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name,preset,batch", CASES, ids=[f"{n}-{p}" for n, p, _ in CASES])
def test_opacus_per_sample_gradients_match_loop(name: str, preset: str, batch: int) -> None:
    torch.manual_seed(0)
    model = registry.build(name, 7, preset).double()
    assert ModuleValidator.validate(model, strict=False) == []
    x, y = _batch(model, batch)

    reference = per_sample_reference(model, x, y)

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    out = gsm(x)
    loss = registry.per_sample_loss(gsm, out, y)
    assert loss.shape == (batch,)
    loss.mean().backward()
    checked = 0
    for pname, p in model.named_parameters():
        assert p.grad_sample is not None, f"{pname}: Opacus produced no per-sample gradient"
        assert p.grad_sample.shape == (batch, *p.shape), pname
        for i in range(batch):
            ref = reference[i][pname]
            err = (p.grad_sample[i] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert err <= 1e-5, f"{name}-{preset} {pname} sample {i}: relative error {float(err):.2e}"
        checked += 1
    assert checked == len(list(model.parameters()))
    gsm._close()


@pytest.mark.parametrize("name", ["hafnet", "sfer_mdfae"])
def test_dp_optimizer_step_runs_and_changes_every_parameter_group(name: str) -> None:
    """A full DP-SGD step (per-sample clipping + noise) goes through; no parameter is left without
    a per-sample gradient (DPOptimizer would raise) and the weights move."""
    torch.manual_seed(0)
    model = registry.build(name, 7, "cpu")
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.rand(4, 3, model.input_size, model.input_size) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])
    opt.zero_grad()
    registry.per_sample_loss(gsm, gsm(x), y).mean().backward()
    opt.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(moved)
    gsm._close()


def test_no_inplace_or_batch_norm_anywhere() -> None:
    for name in registry.available():
        for preset in registry.presets(name):
            model = registry.build(name, 7, preset)
            for mname, m in model.named_modules():
                assert not isinstance(m, torch.nn.modules.batchnorm._BatchNorm), f"{name}-{preset}: {mname}"
                assert not getattr(m, "inplace", False), f"{name}-{preset}: in-place {mname}"
            assert len(list(model.buffers())) == 0, f"{name}-{preset} holds buffers (Opacus cannot handle them)"
