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
    default = load_config(None, [])   # power 1: lr × σ, the noise a step adds to the weights, held at the reference's
    assert step_size(default, 7.0) * 7.0 == pytest.approx(float(default["train.lr"]) * 1.4)
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


# a synthetic classroom of two schools of six students (seconds to build)
_TINY = ["federation.schools=2", "data.students_per_school=6", "data.frames_per_student=2", "data.public_students=2",
         "data.public_frames=7", "data.public_train_students=2", "data.public_train_frames=7",
         "data.heldout_students=2", "data.school_size_spread=0", "data.image_size=32", "evaluation.bootstrap=10",
         "model.preset=dp", "model.pretrain=", "train.batch_size=4"]


def test_the_central_dp_reference_trains_at_the_step_size_of_its_sigma(tmp_path, monkeypatch):
    """`fedfer train-central --dp` follows the same rule as a school: its σ 5 lowers the step."""
    from simulations import central, synth

    cfg = load_config(None, _TINY + ["privacy.noise_multiplier=5.0", f"data.root={tmp_path / 'data'}"])
    built: list[float] = []

    def recording(model, cfg, noise_multiplier=None):  # noqa: ANN001, ANN202
        optimizer = make_optimizer(model, cfg, noise_multiplier)
        built.append(optimizer.param_groups[0]["lr"])
        return optimizer

    monkeypatch.setattr(central, "make_optimizer", recording)
    result = central.train_central(cfg, synth.ensure_for_config(cfg), epochs=1, dp=True, echo=lambda line: None)
    assert result["noise_multiplier"] == 5.0
    assert built == [pytest.approx(step_size(cfg, 5.0))] and built[0] < float(cfg["train.lr"])


@pytest.mark.parametrize("dp", [True, False])
def test_the_central_reference_keeps_one_optimiser_over_its_epochs(tmp_path, monkeypatch, dp):
    """`fedfer train-central` builds its optimiser once: momentum carries over epochs as within a school's
    round (it restarted every epoch before)."""
    from simulations import central, synth

    cfg = load_config(None, _TINY + [f"data.root={tmp_path / 'data'}"])
    built: list[torch.optim.Optimizer] = []

    def recording(model, cfg, noise_multiplier=None):  # noqa: ANN001, ANN202
        built.append(make_optimizer(model, cfg, noise_multiplier))
        return built[-1]

    monkeypatch.setattr(central, "make_optimizer", recording)
    result = central.train_central(cfg, synth.ensure_for_config(cfg), epochs=3, dp=dp, echo=lambda line: None)
    assert result["epochs"] == 3 and len(built) == 1
    assert any("momentum_buffer" in state for state in built[0].state.values())   # it stepped with momentum
