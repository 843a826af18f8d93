"""The multi-attention fusion network (seed 004): Opacus per-sample gradients of its full loss equal a
per-sample autograd loop (float64), with and without the landmark row; the fixed shallow features behave."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from shared_models.models import registry
from shared_models.models.mafnet import (
    NUM_LANDMARKS, landmark_distances, lbp_codes, pack_landmarks, unpack_landmarks,
)

warnings.filterwarnings("ignore", message=".*full backward hook.*")
warnings.filterwarnings("ignore", message=".*carry no landmarks.*")


def _clips(model: torch.nn.Module, batch: int, with_marks: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t, s = registry.clip_frames(model), model.input_size
    x = torch.rand(batch, 3, t, s, s, generator=g, dtype=torch.float64) * 2 - 1
    if not with_marks:
        return x
    marks = torch.rand(batch, t, NUM_LANDMARKS, 2, generator=g, dtype=torch.float64) * 40 + 12
    return pack_landmarks(x, marks, 64)


CASES = [("cpu", 3, True), ("dp", 3, True), ("dp", 2, False), ("paper", 2, True)]


@pytest.mark.parametrize("preset,batch,with_marks", CASES, ids=[f"{p}-{'lm' if m else 'nolm'}" for p, _, m in CASES])
def test_per_sample_gradients_exact(preset: str, batch: int, with_marks: bool) -> None:
    torch.manual_seed(0)
    model = registry.build("mafnet", 4, preset).double()
    # move the zero-initialised classifiers off zero so every parameter has a non-trivial gradient
    with torch.no_grad():
        for fc in (model.deep.fc, model.shallow.fc):
            fc.weight.normal_(0, 0.3)
    assert ModuleValidator.validate(model, strict=False) == []
    x = _clips(model, batch, with_marks)
    y = torch.tensor([3, 0, 2][:batch])
    reference = []
    for i in range(batch):
        model.zero_grad(set_to_none=True)
        registry.per_sample_loss(model, model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        reference.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    registry.per_sample_loss(gsm, gsm(x), y).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (batch, *p.shape), name
        for i in range(batch):
            ref = reference[i][name]   # loss_reduction="mean": Opacus rescales to each sample's own gradient
            err = (p.grad_sample[i] - ref).norm() / ref.norm().clamp_min(1e-30)
            if ref.norm() == 0:
                assert p.grad_sample[i].norm() <= 1e-12, name
            else:
                assert err <= 1e-10, f"{preset} {name} sample {i}: relative error {float(err):.2e}"
    gsm._close()


def test_lbp_codes_are_rotation_invariant_uniform_patterns() -> None:
    flat = torch.zeros(1, 5, 5)
    assert lbp_codes(flat).unique().tolist() == [8.0]             # every neighbour >= centre
    peak = flat.clone()
    peak[0, 2, 2] = 1.0
    assert lbp_codes(peak)[0, 2, 2] == 0                          # brighter than all 8 neighbours
    stripes = torch.tensor([[0.0, 1.0] * 3] * 6).unsqueeze(0)     # vertical stripes: 4 transitions
    assert lbp_codes(stripes)[0, 2, 3] == 9                       # a bright stripe pixel: non-uniform
    edge = torch.tensor([[0.0] * 3 + [1.0] * 3] * 6).unsqueeze(0)
    assert lbp_codes(edge)[0, 2, 3] == 5                          # bright side of an edge: 3 right + 2 equal


def test_landmark_distances_ignore_position_and_scale() -> None:
    g = torch.Generator().manual_seed(0)
    marks = torch.rand(2, 3, NUM_LANDMARKS, 2, generator=g)
    moved = marks * 2.5 + torch.tensor([0.3, -0.2])
    assert landmark_distances(marks).shape == (2, 3, 38)
    assert torch.allclose(landmark_distances(marks), landmark_distances(moved), atol=1e-5)


def test_pack_then_unpack_returns_pixels_and_landmarks() -> None:
    x = torch.rand(2, 3, 4, 48, 48) * 2 - 1
    marks = torch.rand(2, 4, NUM_LANDMARKS, 2) * 64
    pixels, back, present = unpack_landmarks(pack_landmarks(x, marks, 64), 48)
    assert torch.equal(pixels, x) and present.tolist() == [1.0, 1.0]
    assert torch.allclose(back * 64, marks, atol=1e-4)
    with pytest.raises(ValueError, match="too small"):
        pack_landmarks(torch.zeros(1, 3, 2, 32, 32), marks[:1, :2], 64)
