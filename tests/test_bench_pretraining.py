"""simulations/bench/pretraining.py's server-side post-processing: FedAvgM and the tail average of rounds."""

import torch

from simulations.bench.pretraining import ServerAdam, fedavgm, tail_average


def test_tail_average_is_the_mean_of_the_rounds_models_with_integer_buffers_rounded():
    rounds = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)},
              {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(2)},
              {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(4)}]
    mean = tail_average(rounds)
    assert torch.allclose(mean["w"], torch.tensor([3.0, 3.0])) and mean["w"].dtype == torch.float32
    assert int(mean["n"]) == 2 and mean["n"].dtype == torch.int64   # 7/3 rounds to 2
    assert torch.equal(tail_average(rounds[-1:])["w"], rounds[-1]["w"])


def test_weighted_average_blends_the_start_and_the_federated_model():
    """`--interpolate α`: (1 - α)·start + α·final; α = 0 is the start, α = 1 the federated model."""
    start = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(0)}
    final = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(3)}
    blend = tail_average([start, final], [0.25, 0.75])
    assert torch.allclose(blend["w"], torch.tensor([1.5, 1.0])) and int(blend["n"]) == 2   # 2.25 rounds to 2
    assert torch.equal(tail_average([start, final], [1.0, 0.0])["w"], start["w"])
    assert torch.equal(tail_average([start, final], [0.0, 1.0])["w"], final["w"])


def test_fedavgm_adds_the_momentum_share_of_the_previous_step():
    start = {"w": torch.tensor([0.0])}
    velocity: dict[str, torch.Tensor] = {}
    first = fedavgm(start, [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}], velocity, momentum=0.5)
    assert torch.allclose(first["w"], torch.tensor([2.0]))          # plain average in round 1
    second = fedavgm(first, [{"w": torch.tensor([3.0])}], velocity, momentum=0.5)
    assert torch.allclose(second["w"], torch.tensor([4.0]))         # step 1 + 0.5 x previous step 2


def test_server_adam_first_step_is_lr_times_the_sign_of_the_average_update_then_adapts():
    """`--server-opt adam`: with bias correction the first step is lr·Δ/(|Δ| + τ) per coordinate (a
    signed step of size lr), whatever Δ's scale; FedYogi's first step is the same. Integer buffers average."""
    start = {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(0)}
    schools = [{"w": torch.tensor([0.02, -4.0]), "n": torch.tensor(2)}, {"w": torch.tensor([0.04, -2.0]), "n": torch.tensor(2)}]
    for yogi in (False, True):
        adam = ServerAdam(lr=0.1, tau=1e-9, yogi=yogi)
        first = adam(start, schools, {}, 0.0)
        assert torch.allclose(first["w"], torch.tensor([0.1, -0.1]), atol=1e-6) and int(first["n"]) == 2
        # a second, opposite update: it follows the new sign, but m still holds the first one, so it is far below lr
        second = adam(first, [{"w": first["w"] - torch.tensor([0.03, -3.0]), "n": torch.tensor(2)}], {}, 0.0)
        moved = second["w"] - first["w"]
        assert (moved.abs() < 0.1).all() and (moved.sign() == torch.tensor([-1.0, 1.0])).all()


def test_train_public_shows_every_epochs_model_in_eval_mode_and_then_trains_on():
    """The hook behind (b)'s learning curve (simulations/bench/central_epochs.py): called once per epoch,
    in eval mode, with weights that move between calls; training resumes after it."""
    from shared_models.models import registry
    from simulations.pretrain import train_public

    model = registry.build("hafnet", num_classes=7, preset="dp")
    size = int(model.input_size)
    images = torch.rand(16, 3, size, size)
    labels = torch.arange(16) % 7
    seen: list[tuple[int, bool, torch.Tensor]] = []

    def after_epoch(epoch: int, m: torch.nn.Module) -> None:
        seen.append((epoch, m.training, next(m.parameters()).detach().clone()))

    stats = train_public(model, images, labels, epochs=3, batch_size=8, lr=1e-2, seed=0, after_epoch=after_epoch)
    assert [e for e, _, _ in seen] == [1, 2, 3] and not any(training for _, training, _ in seen)
    assert not torch.equal(seen[0][2], seen[1][2]) and not torch.equal(seen[1][2], seen[2][2])
    assert stats["steps"] == 6 and not model.training


def test_central_epochs_bench_refuses_bad_epoch_lists(capsys):
    import pytest

    from simulations.bench.central_epochs import main

    for bad in ("0,2", "two"):
        with pytest.raises(SystemExit):
            main(["--epochs", bad])
        assert "--epochs" in capsys.readouterr().err


def test_public_preconditioner_scales_noised_gradients_by_the_public_second_moment():
    """`--precondition P`: coordinates the public gradients move a lot get a smaller step, the factor has
    mean 1 (inside its clamp), and the hook multiplies each parameter's grad by its slice."""
    from torch import nn

    from simulations.bench.pretraining import PublicPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(m(xb), yb, reduction="none")

    flat = PublicPreconditioner(x, y, power=0.0, loss_fn=loss).scale(model)
    assert torch.allclose(flat, torch.ones(15))                      # P = 0: plain DP-SGD
    factor = PublicPreconditioner(x, y, power=1.0, cap=1e6, loss_fn=loss).scale(model)
    assert factor.shape == (15,) and abs(float(factor.mean()) - 1.0) < 1e-4
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(model, x[i:i + 1], y[i:i + 1]).sum(),
                                                                    list(model.parameters()))]) for i in range(16)]
    v = sum((g / max(1.0, float(g.norm()))) ** 2 for g in grads)   # each public gradient clipped to 1, as DP-SGD's
    assert int(torch.argmax(factor)) == int(torch.argmin(v)) and int(torch.argmin(factor)) == int(torch.argmax(v))
    capped = PublicPreconditioner(x, y, power=1.0, cap=2.0, loss_fn=loss).scale(model)
    assert float(capped.max()) <= 2.0 + 1e-6 and float(capped.min()) >= 0.5 - 1e-6
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    PublicPreconditioner(x, y, power=1.0, cap=1e6, loss_fn=loss).hook(model)(list(model.parameters()))
    after = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(after, factor, atol=1e-6)


def test_public_rehearsal_follows_the_fedavgm_step_with_plain_steps_on_public_faces_outside_the_momentum():
    """`--rehearse K`: the server's FedAvgM step, then K Adam steps on public faces (no privacy cost); the
    momentum keeps only the schools' update, so the rehearsal is not carried into the next round."""
    from shared_models.config import load_config
    from shared_models.models import registry
    from shared_models.training import per_sample_loss
    from simulations.bench.pretraining import PublicRehearsal
    from simulations.references import model_from

    torch.manual_seed(0)
    cfg = load_config(None, ["model.preset=dp", "model.pretrain="])
    model = registry.build_from_config(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    school = {k: v + 0.01 if v.is_floating_point() else v for k, v in start.items()}
    faces = torch.randn(32, 3, model.input_size, model.input_size)
    labels = torch.randint(0, 7, (32,))

    def public_loss(state: dict) -> float:
        with torch.no_grad():
            return float(per_sample_loss(model_from(cfg, state).eval(), faces, labels).mean())

    plain_velocity: dict[str, torch.Tensor] = {}
    plain = fedavgm(start, [school], plain_velocity, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(PublicRehearsal(cfg, faces, labels, 0, 1e-3)(start, [school], {}, 0.5).values(),
                                                 plain.values()))
    velocity: dict[str, torch.Tensor] = {}
    rehearsed = PublicRehearsal(cfg, faces, labels, steps=20, lr=1e-3)(start, [school], velocity, 0.5)
    assert public_loss(rehearsed) < public_loss(plain)
    assert all(torch.equal(velocity[k], plain_velocity[k]) for k in plain_velocity)
