"""`fedfer models`: table and JSON listing of the model zoo."""

from __future__ import annotations

import json

from fedfer.cli import main
from shared_models.models import registry


def test_models_json_lists_each_model_and_preset(capsys) -> None:
    assert main(["models", "--json", "--preset", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["preset"]) for r in rows] == [(name, "cpu") for name in registry.available()]
    assert {"hafnet", "sfer_mdfae", "mafnet", "resnet50_cbam", "r2plus1d_sta"} <= {r["model"] for r in rows}
    for r in rows:
        assert r["input_size"] == registry.presets(r["model"])["cpu"].input_size
        assert r["clip_frames"] == registry.presets(r["model"])["cpu"].clip_frames
        assert r["params"] > 0 and r["macs"] > 0 and r["description"]


def test_models_table_and_errors(capsys) -> None:
    assert main(["models", "--model", "hafnet", "--preset", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "hafnet" in out and "64x64" in out and "MACs" in out and "sfer_mdfae" not in out
    assert main(["models", "--model", "vgg"]) == 2
    assert "unknown model 'vgg'" in capsys.readouterr().err
    assert main(["models", "--model", "hafnet", "--preset", "tiny"]) == 2
    assert "unknown preset 'tiny'" in capsys.readouterr().err
