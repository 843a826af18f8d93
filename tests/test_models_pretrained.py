"""`registry.load_pretrained`: partial, name- and shape-matched loading of user checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared_models.models import registry
from shared_models.models.backbones.resnet import ResNet18
from shared_models.models.pretrained import PretrainedError


def _params_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def test_round_trip_of_a_fedfer_checkpoint_under_each_wrapper_key(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = registry.build("hafnet", 7, "cpu")
    for i, wrap in enumerate((lambda s: s, lambda s: {"state_dict": s, "epoch": 3}, lambda s: {"model": s},
                              lambda s: {f"module.{k}": v for k, v in s.items()})):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(wrap(source.state_dict()), path)
        torch.manual_seed(100 + i)
        target = registry.build("hafnet", 7, "cpu")
        report = registry.load_pretrained(target, path)
        assert report.missing == [] and report.shape_mismatched == [] and report.unused == []
        assert report.matched == sorted(source.state_dict())
        for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
            assert _params_equal(a, b), name


def test_partial_load_reports_matched_missing_mismatched_and_unused(tmp_path: Path) -> None:
    """A bare torchvision-layout ResNet-18 (as an MS-Celeb checkpoint) into HAFNet-paper: the backbone
    loads through the `backbone.` alias, the 1000-class fc does not fit, BN running stats are unused,
    heads and centres keep their initial values."""
    torch.manual_seed(0)
    backbone = ResNet18()
    state = dict(backbone.state_dict())
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    state["bn1.running_mean"] = torch.zeros(64)
    path = tmp_path / "resnet18_msceleb.pth"
    torch.save({"state_dict": state}, path)

    model = registry.build("hafnet", 7, "paper")
    heads_before = model.heads.sa.conv_3x3[0].weight.detach().clone()
    report = registry.load_pretrained(model, path)

    assert report.matched == sorted(f"backbone.{k}" for k in backbone.state_dict())
    assert {m["key"] for m in report.shape_mismatched} == {"fc.weight", "fc.bias"}
    assert {"key": "fc.weight", "checkpoint": [1000, 512], "model": [7, 512]} in report.shape_mismatched
    assert report.unused == ["bn1.running_mean"]
    assert "clustering.centres" in report.missing and "heads.sa.conv_3x3.0.weight" in report.missing
    assert not any(k.startswith("backbone.") for k in report.missing)
    assert _params_equal(model.backbone.layer3[1].conv2.weight, backbone.layer3[1].conv2.weight)
    assert _params_equal(model.heads.sa.conv_3x3[0].weight, heads_before)
    assert "loaded 60 tensors" in report.summary()


def test_dan_style_checkpoint_loads_heads_into_the_stacked_layers(tmp_path: Path) -> None:
    """DAN keeps heads as cat_head{i}.* and the backbone as features.N.*; both map onto HAFNet."""
    torch.manual_seed(0)
    source = registry.build("hafnet", 7, "cpu", num_heads=1)
    target = registry.build("hafnet", 7, "cpu", num_heads=2)
    dan: dict[str, torch.Tensor] = {}
    for i in range(2):
        for k, v in source.heads.state_dict().items():
            dan[f"cat_head{i}.{k}"] = v + i  # head i distinguishable
    dan["cat_head0.ca.attention.0.weight"] = dan["cat_head0.ca.attention.0.weight"].flatten(1)  # a DAN Linear
    dan["cat_head1.ca.attention.0.weight"] = dan["cat_head1.ca.attention.0.weight"].flatten(1)
    dan["features.0.weight"] = source.backbone.conv1.weight.detach()
    path = tmp_path / "dan.pth"
    torch.save({"model_state_dict": 0, "state_dict": dan}, path)
    report = registry.load_pretrained(target, path)
    assert "backbone.conv1.weight" in report.matched
    assert all(f"heads.{k}" in report.matched for k in source.heads.state_dict())
    assert report.unused == [] and report.shape_mismatched == []
    w = target.heads.sa.conv_3x3[0].weight
    half = w.shape[0] // 2
    assert _params_equal(w[:half], source.heads.sa.conv_3x3[0].weight)
    assert _params_equal(w[half:], source.heads.sa.conv_3x3[0].weight + 1)


def test_ir50_checkpoint_loads_into_sfer_mdfae_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = registry.build("sfer_mdfae", 7, "cpu")
    bare = {k[len("backbone."):]: v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    bare["output_layer.3.weight"] = torch.randn(4, 4)  # face.evoLVe's unused head
    path = tmp_path / "ir50.pth"
    torch.save(bare, path)
    target = registry.build("sfer_mdfae", 7, "cpu")
    report = registry.load_pretrained(target, path)
    assert len(report.matched) == len(bare) - 1
    assert report.unused == ["output_layer.3.weight"]
    assert all(k.startswith(("mdpfa.", "kroafe.", "fc.")) for k in report.missing)


def test_unusable_files_give_one_line_errors(tmp_path: Path) -> None:
    model = registry.build("hafnet", 7, "cpu")
    with pytest.raises(PretrainedError, match="nothere.pt: checkpoint file not found"):
        registry.load_pretrained(model, tmp_path / "nothere.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedError, match="junk.pt: not a readable PyTorch checkpoint"):
        registry.load_pretrained(model, junk)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(PretrainedError, match="empty.pt: no tensors found"):
        registry.load_pretrained(model, empty)
    assert issubclass(PretrainedError, ValueError)
