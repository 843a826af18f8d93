"""Parameter and MAC counts: the paper presets reproduce the published sizes; the counter is right."""

from __future__ import annotations

import pytest
from torch import nn

from shared_models.models import registry
from shared_models.models.complexity import Complexity, complexity, count_macs, count_params


@pytest.fixture(scope="module")
def paper() -> dict[str, tuple[nn.Module, Complexity]]:
    """Each paper model built and counted once for the module (they are large)."""
    out = {}
    for name in registry.available():
        model = registry.build(name, 7, "paper")
        out[name] = (model, complexity(model))
    return out


@pytest.mark.parametrize("name,params_m,gmacs,size", [
    ("sfer_mdfae", 31.975, 6.362, 112),  # Table 4 of the SFER-MDFAE paper (its "FLOPs" are MACs)
    ("hafnet", 19.72, 2.24, 224),         # DAN with 4 heads, 7 classes, counted with thop (DAN publishes no size)
])
def test_paper_presets_match_published_size(paper, name: str, params_m: float, gmacs: float, size: int) -> None:
    model, c = paper[name]
    assert c.input_size == size == model.input_size
    assert abs(c.params_m - params_m) / params_m <= 0.02, f"{name}: {c.params_m:.3f} M params"
    assert abs(c.gmacs - gmacs) / gmacs <= 0.05, f"{name}: {c.gmacs:.3f} GMACs"


def test_paper_backbones_are_the_reference_networks(paper) -> None:
    hafnet = paper["hafnet"][0]
    assert count_params(hafnet.backbone) == 11_176_512  # torchvision ResNet-18 without fc
    sfer = paper["sfer_mdfae"][0]
    assert count_params(sfer.backbone) == 30_727_360  # face.evoLVe IR-50, four stages
    assert count_params(sfer.kroafe) == 1_063_936  # BRA at 512 channels (BiFormer formula)
    assert sfer.fc.in_features == 960 + 512


def test_cpu_presets_are_much_smaller(paper) -> None:
    for name in registry.available():
        big = paper[name][1]
        cpu = complexity(registry.build(name, 7, "cpu"))
        # a clip model's cpu preset also halves the frames (x2 MACs) but keeps 8 of them to model time
        factor = 50 if registry.presets(name)["cpu"].clip_frames else 100
        assert cpu.params * 20 < big.params and cpu.macs * factor < big.macs


def test_mac_counter_on_a_hand_counted_network() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),   # out 8x4x4: 128 outputs x 27 = 3456
        nn.Conv2d(8, 8, 3, padding=1, groups=8),   # depthwise: 128 x 9 = 1152
        nn.Flatten(),
        nn.Linear(128, 10),                        # 1280
    )
    assert count_macs(net, 8) == 3456 + 1152 + 1280
    assert count_params(net) == (3 * 8 * 9 + 8) + (8 * 9 + 8) + (128 * 10 + 10)
    net.train()
    count_macs(net, 8)
    assert net.training
    assert all(not m._forward_hooks for m in net.modules())
