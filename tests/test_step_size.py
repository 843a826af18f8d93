"""shared_models/training.step_size: the schools' lr falls with the round's σ above a reference."""

import pytest
import torch

from shared_models.config import load_config
from shared_models.training import make_optimizer, step_size


def test_the_lr_is_train_lr_up_to_the_reference_and_falls_as_a_power_of_sigma_above_it():
    cfg = load_config(None, ["train.lr=1.5", "train.lr_noise_reference=1.4", "train.lr_noise_power=0.75"])
    assert step_size(cfg) == 1.5                         # non-private training: no σ
    assert step_size(cfg, 1.02) == 1.5 and step_size(cfg, 1.4) == 1.5   # the default district at ε 8
    assert step_size(cfg, 7.58) == pytest.approx(1.5 * (1.4 / 7.58) ** 0.75)   # ε 1: ~0.42
    assert step_size(cfg, 4.12) < step_size(cfg, 2.33) < 1.5
    off = load_config(None, ["train.lr_noise_reference=0"])
    assert step_size(off, 7.58) == float(off["train.lr"])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_optimiser_is_built_at_the_rounds_step_size(optimizer):
    cfg = load_config(None, [f"train.optimizer={optimizer}", "train.lr=1.5"])
    model = torch.nn.Linear(3, 2)
    assert make_optimizer(model, cfg).param_groups[0]["lr"] == 1.5
    assert make_optimizer(model, cfg, 5.0).param_groups[0]["lr"] == pytest.approx(step_size(cfg, 5.0))


@pytest.mark.parametrize("bad", ["train.lr_noise_reference=-1", "train.lr_noise_power=-0.5", "train.lr_noise_power=9"])
def test_bad_rule_settings_are_refused(bad):
    from shared_models.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(None, [bad])
