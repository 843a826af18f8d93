"""Student-level DP-SGD: the per-unit gradient is the clipped sum of that unit's per-frame gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from privacy.engine import PrivateTrainer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (12,), generator=g)
    # uneven students: a has 5 frames, b 4, c 3 (interleaved, so grouping by id matters)
    ids = ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b", "a"]
    return TensorDataset(x, y), ids


def _unit_grad(model: nn.Module, ds, frames: list[int]) -> list[torch.Tensor]:
    m = copy.deepcopy(model)
    x = torch.stack([ds[i][0] for i in frames])
    y = torch.stack([ds[i][1] for i in frames])
    m.zero_grad()
    _loss(m, x, y).sum().backward()
    return [p.grad.detach().clone() for p in m.parameters()]


def _clip(grads: list[torch.Tensor], c: float) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    factor = min(1.0, c / (float(norm) + 1e-6))
    return [g * factor for g in grads]


@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_student_update_is_clipped_sum_of_its_frames(clip):
    ds, ids = _data()
    model = _model()
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = PrivateTrainer(model, opt, ds, ids, units_per_batch=2, frames_per_unit=10,
                             noise_multiplier=0.0, max_grad_norm=clip, seed=0, declared_units=3, reproducible=True,
                             clipping="per-sample")   # this test reads the per-unit rows Opacus clips
    assert trainer.num_units == 3 and trainer.sample_rate == pytest.approx(2 / 3)
    seen = {}
    trainer.optimizer.attach_step_hook(lambda o: seen.update(rows=[p.grad_sample.clone() for p in o.params]))
    units = [0, 2]  # students "a" and "c"
    trainer.step(units, _loss)

    frames_a = [i for i, s in enumerate(ids) if s == "a"]
    frames_c = [i for i, s in enumerate(ids) if s == "c"]
    g_a, g_c = _unit_grad(start, ds, frames_a), _unit_grad(start, ds, frames_c)
    # the rows Opacus clipped: one per student, each the sum over that student's frames only
    for row, (ga, gc) in zip(seen["rows"], zip(g_a, g_c)):
        assert row.shape[0] == 2
        torch.testing.assert_close(row[0], ga, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(row[1], gc, rtol=1e-4, atol=1e-6)
    expected = [(ca + cc) / trainer.expected_units for ca, cc in zip(_clip(g_a, clip), _clip(g_c, clip))]
    for p0, p1, e in zip(start.parameters(), model.parameters(), expected):
        torch.testing.assert_close(p0.detach() - p1.detach(), e, rtol=1e-4, atol=1e-7)
    if clip < 1:
        # separately clipped != clipped together (the units really are separate rows)
        together = _clip([a + c for a, c in zip(g_a, g_c)], clip)
        diff = max(float((x - y).abs().max()) for x, y in zip(expected, [t / trainer.expected_units for t in together]))
        assert diff > 1e-4


def test_frames_per_unit_caps_frames_and_image_unit_is_one_frame_per_unit():
    ds, ids = _data()
    model = _model()
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ds, ids, units_per_batch=3,
                             frames_per_unit=2, noise_multiplier=1.0, max_grad_norm=1.0, seed=3, declared_units=3,
                             reproducible=True)
    _, n = trainer.step([0, 1, 2], _loss)
    assert n == 6
    image = PrivateTrainer(_model(), torch.optim.SGD(model.parameters(), lr=0.1), ds, None, units_per_batch=3,
                           frames_per_unit=4, noise_multiplier=1.0, max_grad_norm=1.0, seed=3, declared_units=12,
                           reproducible=True)
    assert image.num_units == 12 and image.privacy_unit == "image"
    assert image.sample_rate == pytest.approx(0.25) and image.steps_per_epoch == 4
    _, n = image.step([0, 5], _loss)
    assert n == 2


def test_empty_poisson_batch_is_a_noise_only_step():
    ds, ids = _data()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), ds, ids, units_per_batch=1,
                             frames_per_unit=2, noise_multiplier=0.0, max_grad_norm=1.0, seed=0, declared_units=3,
                             reproducible=True)
    trainer.step([], _loss)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    trainer.close()  # hooks off, so the same model can be wrapped again
    noisy = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), ds, ids, units_per_batch=1,
                           frames_per_unit=2, noise_multiplier=1.0, max_grad_norm=1.0, seed=0, declared_units=3,
                           reproducible=True)
    noisy.step([], _loss)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("clipping", ["per-sample", "ghost"])
def test_the_noise_is_opacus_secure_mode_with_the_planned_scale(clipping):
    """Each noise coordinate is Opacus' secure_mode draw (four Gaussians summed and halved, robust to the
    floating-point attacks on sampled Gaussians) and still has standard deviation σC / (q × declared size)."""
    ds, ids = _data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 400, bias=False))
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), ds, ids, units_per_batch=1,
                             frames_per_unit=2, noise_multiplier=2.0, max_grad_norm=0.5, seed=0, declared_units=3,
                             reproducible=True, clipping=clipping)
    assert trainer.optimizer.secure_mode
    before = model[1].weight.detach().clone()
    trainer.step([], lambda m, x, y: nn.functional.cross_entropy(m(x), y, reduction="none"))
    moved = (before - model[1].weight.detach()).flatten()   # an empty step: lr 1 times the noise alone
    assert float(moved.std()) == pytest.approx(2.0 * 0.5 / 1, rel=0.05)   # 14,400 draws: ±2 % at 1 sd


def test_train_epoch_runs_steps_per_epoch_and_rejects_a_mean_loss():
    ds, ids = _data()
    model = _model()
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ds, ids, units_per_batch=1,
                             frames_per_unit=2, noise_multiplier=1.0, max_grad_norm=1.0, seed=5, declared_units=3,
                             reproducible=True)
    stats = trainer.train_epoch(_loss)
    assert stats["steps"] == trainer.steps_per_epoch == 3
    assert stats["frames"] <= 2 * stats["units"]
    with pytest.raises(ValueError, match="one loss per frame"):
        trainer.step([0], lambda m, x, y: _loss(m, x, y).mean())


def test_bad_inputs_name_the_problem():
    ds, ids = _data()
    model = _model()
    with pytest.raises(ValueError, match="unit_ids has 3 entries for 12 frames"):
        PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ds, ids[:3], 1, 1, 1.0, 1.0, 0, declared_units=3)


def test_q_and_steps_come_from_the_declared_size_not_the_true_count():
    """The one rule: q = batch / declared size. Schools with 3 or 5 real students that declare 10 sample at
    the same q, take the same number of steps and get the same σ; only their realised batches differ."""
    from privacy.engine import plan_round, sampling, train_private

    assert sampling(10, 2) == (pytest.approx(0.2), 5)
    ds, ids = _data()
    plans = [plan_round(unit="student", declared_units=10, units_per_batch=2, local_epochs=2, rounds=3,
                        target_epsilon=4.0, delta=1e-5, noise_multiplier=0.0, max_grad_norm=1.0, frames_per_unit=2)
             for _ in range(2)]
    assert plans[0] == plans[1] and plans[0].sample_rate == pytest.approx(0.2) and plans[0].steps == 10
    results = []
    for keep in ("abc", "ab"):   # 3 students, then one student (all of c's frames) removed
        rows = [i for i, s in enumerate(ids) if s in keep]
        subset = torch.utils.data.Subset(ds, rows)
        model = _model()
        results.append(train_private(model, subset, [ids[i] for i in rows], plans[0],
                                     torch.optim.SGD(model.parameters(), lr=0.1), local_epochs=2, loss_fn=_loss))
    for r in results:   # what the accountant records is what ran, and it is the plan for both datasets
        assert (r.sample_rate, r.steps, r.noise_multiplier) == (plans[0].sample_rate, 10, plans[0].noise_multiplier)


def _overflowing_round(with_student_a: bool, clipping: str) -> list[torch.Tensor]:
    """One noiseless round (q = 1) from a model the coordinator crafted so that logit 0 = 1e38 · x_0: student
    a's frames (x_0 = 10) overflow it to inf, an ordinary student's (x_0 = 0.1) do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0] = 1e38
        model[0].bias.zero_()
    x, ids = torch.tensor([[0.1, 1.0, 2.0, 3.0]] * 2), ["b", "b"]
    if with_student_a:
        x, ids = torch.cat([x, torch.tensor([[10.0, 0.0, 0.0, 0.0]] * 2)]), ids + ["a", "a"]
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorDataset(x, torch.ones(len(x), dtype=torch.long)),
                             ids, units_per_batch=2, frames_per_unit=2, noise_multiplier=0.0, max_grad_norm=1.0,
                             declared_units=2, clipping=clipping)
    trainer.train_epoch(_loss)
    trainer.close()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("clipping", ["per-sample", "ghost"])
def test_a_student_whose_gradient_overflows_adds_nothing_not_a_nan(clipping):
    """Clipping cannot bound an inf or NaN gradient (0 × inf is NaN), and one NaN in the clipped sum makes the
    whole release NaN: the weights would say whether student a was sampled, whatever the noise. Such a unit
    contributes zero, a function of its own data only, so its contribution stays bounded."""
    without, with_a = _overflowing_round(False, clipping), _overflowing_round(True, clipping)
    assert all(torch.isfinite(p).all() for p in with_a)
    for p, q in zip(without, with_a):
        torch.testing.assert_close(p, q)
