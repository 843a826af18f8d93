"""Public pre-training, then private fine-tuning: what trains, and the checkpoint the federation starts from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared_models.models import registry


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["hafnet", "sfer_mdfae"])
def test_freezing_leaves_exactly_the_chosen_parameters_trainable(name: str) -> None:
    model = registry.build(name, preset="dp")
    names = [n for n, _ in model.named_parameters()]
    outside = {n for n in names if not n.startswith("backbone.")}
    norms = {f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, (nn.GroupNorm, nn.LayerNorm))
             for p, _ in module.named_parameters(recurse=False)}
    if name == "hafnet":
        last = {n for n in names if n.startswith("backbone.layer4.")}
    else:   # IR50 dp preset: units (1, 2, 2, 1) -> the last stage is body unit 5
        last = {n for n in names if n.startswith("backbone.body.5.")}
    assert last and outside and norms - outside

    counts = registry.freeze_for_finetuning(model, "last")
    assert _trainable(model) == outside | last
    assert counts == {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    registry.freeze_for_finetuning(model, "norms+head")
    assert _trainable(model) == outside | norms
    assert not any(".conv" in n and n.startswith("backbone.") for n in _trainable(model))
    registry.freeze_for_finetuning(model, "all")
    assert _trainable(model) == set(names)
    with pytest.raises(ValueError, match="train.trainable must be one of"):
        registry.freeze_for_finetuning(model, "first")


def test_frozen_parameters_do_not_move_under_dp_sgd() -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from shared_models.config import load_config

    cfg = load_config(overrides=["train.trainable=norms+head", "model.preset=dp"])
    model = registry.build_from_config(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=4)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    optimizer.zero_grad()
    registry.per_sample_loss(wrapped, wrapped(x), y).mean().backward()
    optimizer.step()
    wrapped._close()
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        assert moved == p.requires_grad, n
