"""Behaviour of the model parts that the losses and the routing attention rely on."""

from __future__ import annotations

import pytest
import torch

from shared_models.models import registry
from shared_models.models.hafnet import ClassCentres, HAFNet, partition_per_sample
from shared_models.output import FEROutput
from shared_models.models.sfer_mdfae import BiLevelRoutingAttention


def _x(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, model.input_size, model.input_size, generator=g) * 2 - 1


# ------------------------------------------------------------------ registry surface

def test_registry_lists_models_and_presets() -> None:
    assert registry.available()[:2] == ["hafnet", "sfer_mdfae"]
    assert {"mafnet", "resnet50_cbam", "r2plus1d_sta"} <= set(registry.available())
    for name in registry.available():
        presets = registry.presets(name)
        assert {"paper", "cpu"} <= set(presets)
        for preset in presets.values():
            assert isinstance(preset.input_size, int) and preset.input_size > 0
            assert str(preset.input_size) in preset.description and "\n" not in preset.description
    assert registry.presets("hafnet")["paper"].input_size == 224
    assert registry.presets("sfer_mdfae")["paper"].input_size == 112


@pytest.mark.parametrize("name", ["hafnet", "sfer_mdfae"])
def test_build_forward_and_loss_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = registry.build(name, num_classes=5, preset="cpu")
    assert model.input_size == registry.presets(name)["cpu"].input_size
    out = model(_x(model, 3))
    assert isinstance(out, FEROutput)
    assert out.logits.shape == (3, 5)
    assert all(v.shape[0] == 3 for v in out.aux.values())
    loss = registry.per_sample_loss(model, out, torch.tensor([0, 4, 2]))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    terms = registry.loss_terms(model, out, torch.tensor([0, 4, 2]))
    assert "ce" in terms and all(t.shape == (3,) for t in terms.values())


def test_build_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        registry.build("resnet")
    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        registry.build("hafnet", 7, "gpu")
    with pytest.raises(ValueError, match="unknown option.*heads_count"):
        registry.build("hafnet", 7, "cpu", heads_count=2)
    with pytest.raises(ValueError, match="num_classes"):
        registry.build("hafnet", 1, "cpu")
    model = registry.build("hafnet", 7, "cpu")
    out = model(_x(model))
    with pytest.raises(ValueError, match="labels must lie in 0..6"):
        registry.per_sample_loss(model, out, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        registry.per_sample_loss(model, out, torch.tensor([0]))


def test_per_sample_loss_unwraps_opacus_and_uses_configured_weights() -> None:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = registry.build("hafnet", 7, "cpu", affinity_weight=0.5, partition_weight=2.0)
    x, y = _x(model), torch.tensor([1, 2])
    out = model(x)
    terms = registry.loss_terms(model, out, y)
    expected = terms["ce"] + 0.5 * terms["affinity"] + 2.0 * terms["partition"]
    torch.testing.assert_close(registry.per_sample_loss(model, out, y), expected)
    gsm = GradSampleModule(model)
    torch.testing.assert_close(registry.per_sample_loss(gsm, gsm(x), y), expected)
    gsm._close()


# ------------------------------------------------------------------ HAFNet losses

def test_head_count_changes_partition_loss_and_one_head_has_none() -> None:
    values = {}
    for heads in (1, 2, 4):
        torch.manual_seed(0)
        model = registry.build("hafnet", 7, "cpu", num_heads=heads)
        out = model(_x(model))
        values[heads] = out.aux["partition"]
        assert values[heads].shape == (2,)
    assert torch.equal(values[1], torch.zeros(2))
    assert (values[2] > 0).all() and (values[4] > 0).all()
    assert not torch.allclose(values[2], values[4])


def test_partition_loss_is_per_sample_and_rewards_diverse_heads() -> None:
    heads = torch.randn(3, 4, 16)
    alone = partition_per_sample(heads[:1])
    changed = heads.clone()
    changed[1:] = torch.randn(2, 4, 16) * 10
    torch.testing.assert_close(partition_per_sample(changed)[:1], alone)  # no coupling across samples
    same = heads[:1].expand(1, 4, 16).clone()
    same[:, :] = heads[0, 0]  # four identical heads: zero variance -> large loss
    diverse = heads[:1] * 5  # spread-out heads: smaller loss
    assert partition_per_sample(same) > partition_per_sample(heads[:1]) > partition_per_sample(diverse)
    expected = torch.log1p(4 / (heads[0].var(dim=0).mean() + torch.finfo(torch.float64).eps))
    torch.testing.assert_close(alone[0], expected.float())


def test_affinity_falls_as_feature_approaches_its_class_centre() -> None:
    torch.manual_seed(0)
    centres = ClassCentres(7, 16)
    target = centres.centres.detach()[3]
    start = torch.randn(16) * 4
    losses = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        feature = (1 - t) * start + t * target
        with torch.no_grad():
            losses.append(float(centres(feature.unsqueeze(0))[0, 3]))
    assert all(a > b for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 1e-6
    # normalised by the centres' spread: scaling features and centres together leaves it unchanged
    f = torch.randn(2, 16)
    scaled = ClassCentres(7, 16)
    scaled.centres.data = centres.centres.data * 3
    torch.testing.assert_close(scaled(f * 3), centres(f))


def test_affinity_term_is_the_distance_to_the_labelled_centre() -> None:
    torch.manual_seed(0)
    model = registry.build("hafnet", 7, "cpu")
    out = model(_x(model))
    y = torch.tensor([6, 2])
    terms = registry.loss_terms(model, out, y)
    torch.testing.assert_close(terms["affinity"], out.aux["centre_distance"][torch.arange(2), y])


def test_stacked_heads_equal_separate_heads() -> None:
    """The N stacked heads compute exactly what N one-head models with the same weights compute."""
    torch.manual_seed(0)
    four = HAFNet(7, input_size=64, widths=(8, 16, 32, 64), stem="small", strides=(2, 2, 2, 1), num_heads=4, ca_hidden=8)
    x = _x(four)
    features = four.backbone(x)
    stacked = four.heads(features)
    for i in range(4):
        one = HAFNet(7, input_size=64, widths=(8, 16, 32, 64), stem="small", strides=(2, 2, 2, 1), num_heads=1, ca_hidden=8)
        own = one.heads.state_dict()
        for key, value in four.heads.state_dict().items():
            rows = own[key].shape[0]
            own[key] = value[i * rows:(i + 1) * rows].clone()
        one.heads.load_state_dict(own)
        torch.testing.assert_close(one.heads(features)[:, 0], stacked[:, i], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ SFER-MDFAE routing attention

@pytest.mark.parametrize("side,regions,topn", [(7, 7, 15), (8, 4, 5), (12, 3, 4)])
def test_routing_picks_exactly_topn_most_related_regions(side: int, regions: int, topn: int) -> None:
    torch.manual_seed(0)
    bra = BiLevelRoutingAttention(32, regions=regions, topn=topn, num_heads=4)
    x = torch.randn(2, 32, side, side)
    idx = bra.routing_indices(x)
    assert idx.shape == (2, regions * regions, topn)
    for row in idx.reshape(-1, topn):
        assert len(set(row.tolist())) == topn  # distinct regions
    # they are the top-n of the region-level affinity q_region . k_region
    q, k, _ = bra.qkv(x.permute(0, 2, 3, 1)).chunk(3, dim=-1)
    q_win = bra._to_regions(q).mean(dim=2)
    k_win = bra._to_regions(k).mean(dim=2)
    affinity = q_win @ k_win.transpose(-1, -2)
    chosen = affinity.gather(2, idx)
    others_max = affinity.scatter(2, idx, float("-inf")).amax(dim=2, keepdim=True)
    assert (chosen.amin(dim=2, keepdim=True) >= others_max).all()


@pytest.mark.parametrize("side,regions,topn", [(7, 7, 15), (8, 4, 5)])
def test_gather_keeps_samples_separate(side: int, regions: int, topn: int) -> None:
    torch.manual_seed(0)
    bra = BiLevelRoutingAttention(32, regions=regions, topn=topn, num_heads=4)
    x = torch.randn(2, 32, side, side)
    out = bra(x)
    changed = x.clone()
    changed[1] = torch.randn(32, side, side) * 5
    out2 = bra(changed)
    torch.testing.assert_close(out2[0], out[0])
    assert not torch.allclose(out2[1], out[1])
    torch.testing.assert_close(bra(x[:1])[0], out[0], rtol=1e-5, atol=1e-6)  # batch of one agrees


def test_routing_attention_with_all_regions_is_full_attention() -> None:
    """topn = m*m must reduce to ordinary multi-head attention over all tokens (+ LePE, projection)."""
    torch.manual_seed(0)
    bra = BiLevelRoutingAttention(16, regions=2, topn=4, num_heads=2)
    x = torch.randn(1, 16, 4, 4)
    tokens = x.permute(0, 2, 3, 1).reshape(1, 16, 16)
    q, k, v = bra.qkv(tokens).chunk(3, dim=-1)
    heads = lambda t: t.reshape(1, 16, 2, 8).transpose(1, 2)  # noqa: E731
    attn = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) * 8 ** -0.5, dim=-1) @ heads(v)
    attn = attn.transpose(1, 2).reshape(1, 4, 4, 16)
    lepe = bra.lepe(v.reshape(1, 4, 4, 16).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    expected = bra.wo(attn + lepe).permute(0, 3, 1, 2)
    torch.testing.assert_close(bra(x), expected, rtol=1e-5, atol=1e-6)


def test_routing_rejects_maps_that_do_not_split_into_regions() -> None:
    bra = BiLevelRoutingAttention(32, regions=7, topn=15, num_heads=4)
    with pytest.raises(ValueError, match="does not split into 7x7 regions"):
        bra(torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match="does not split into 7x7 regions"):
        registry.build("sfer_mdfae", 7, "paper", input_size=128)


@pytest.mark.parametrize("name", ["hafnet", "sfer_mdfae"])
def test_cpu_preset_fits_a_tiny_batch(name: str) -> None:
    """The full loss trains: a few Adam steps on 8 images drive it well down (no DP, no augmentation)."""
    torch.manual_seed(0)
    model = registry.build(name, 7, "cpu")
    x = _x(model, 8, seed=3)
    y = torch.arange(8) % 7
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = registry.per_sample_loss(model, model(x), y).mean()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    with torch.no_grad():
        out = model(x)
        final = float(registry.per_sample_loss(model, out, y).mean())
    assert final < 0.5 * first
    assert (out.logits.argmax(dim=1) == y).float().mean() >= 0.75
