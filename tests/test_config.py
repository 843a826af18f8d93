"""The config schema: defaults in one place, one-line errors naming the key or file."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shared_models.config import ConfigError, check_paths, defaults, flatten, from_run_config, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_run_config_mirrors_default_yaml():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mirrored = flatten(pyproject["tool"]["flwr"]["app"]["config"])
    assert mirrored == defaults(), "run scripts/sync_flwr_config.py after editing shared_models/defaults.yaml"


def test_overrides_are_typed():
    cfg = load_config(None, ["federation.rounds=3", "train.lr=0.1", "privacy.enabled=false", "model.name=sfer_mdfae"])
    assert cfg["federation.rounds"] == 3 and cfg["train.lr"] == 0.1
    assert cfg["privacy.enabled"] is False and cfg["model.name"] == "sfer_mdfae"


@pytest.mark.parametrize("override, needle", [
    ("federation.roundz=3", "unknown key 'federation.roundz'"),
    ("federation.rounds=three", "key 'federation.rounds' must be int"),
    ("privacy.unit=classroom", "key 'privacy.unit' must be one of student, image"),
    ("privacy.delta=2", "key 'privacy.delta' must be < 1.0"),
    ("nokeyvalue", "must look like key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  rounds: [1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "line" in str(err.value)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: key 'train.batch_size' must be int"):
        load_config(wrong)


def test_missing_paths_are_named(tmp_path):
    cfg = load_config(None, [f"run.resume={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="key 'run.resume'"):
        check_paths(cfg)
    cfg = load_config(None, [f"data.root={tmp_path / 'a' / 'b'}"])
    with pytest.raises(ConfigError, match="key 'data.root'"):
        check_paths(cfg)


def test_run_config_ignores_flowers_own_keys():
    cfg = from_run_config({"federation.rounds": 2, "some-flower-key": "x"})
    assert cfg["federation.rounds"] == 2


def test_cli_reports_bad_config_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "fedfer", "simulate", "federation.roundz=1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["fedfer: override: unknown key 'federation.roundz'"]


def test_simulate_refuses_a_budget_beyond_any_meaning_before_it_starts(tmp_path, capsys, monkeypatch):
    """`fedfer simulate privacy.budget=1e300` generated ten school policies with that budget (or failed in the
    middle of the launch naming "school-00 policy"); now one line naming the config key, before anything runs."""
    from fedfer.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "privacy.budget=1e300"]) == 2
    out, err = capsys.readouterr()
    assert err == "fedfer: override: key 'privacy.budget' must be an ε of at most 1000 (beyond it the guarantee " \
                  "bounds nothing), got 1e+300\n" and out == "", (out, err)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["-1", str(10**30)])
def test_pretrain_seed_is_checked_like_the_other_seeds(value):
    """pretrain.seed had no rule: a negative or 31-digit seed reached torch.manual_seed and numpy mid-run."""
    from shared_models.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="pretrain.seed"):
        load_config(None, [f"pretrain.seed={value}"])
