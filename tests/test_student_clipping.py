"""The book-keeping clipping path (privacy/student_clipping.py) gives the per-sample path's clipped, noised,
per-student sum on every model and preset, in float64, with the models' auxiliary losses; each layer rule
(ghost norm, direct per-frame gradients, Opacus-sampler fallback) is checked on its own; models it cannot
take fall back to per-sample clipping under ``auto``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from privacy.engine import PrivateTrainer
from privacy.student_clipping import StudentClipper, UnsupportedModel
from shared_models.models import registry
from shared_models.training import per_sample_loss

warnings.filterwarnings("ignore", message=".*full backward hook.*")

# 7 frames of 3 students, interleaved and uneven (3, 2, 2 frames)
STUDENTS = ["a", "b", "a", "c", "b", "a", "c"]


def _frames(size: int, n: int = len(STUDENTS), seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1
    return TensorDataset(x, torch.randint(0, 7, (n,), generator=g))


def _one_step(model: nn.Module, frames: TensorDataset, clipping: str, clip: float, loss=per_sample_loss,
              students: list[str] = STUDENTS) -> tuple[list, str]:
    """One DP step over every student with noise σ = 1 from a fixed seed; returns the parameters after it."""
    model = copy.deepcopy(model)
    units = len(set(students))
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), frames, students,
                             units_per_batch=units, frames_per_unit=3, noise_multiplier=1.0, max_grad_norm=clip,
                             seed=7, declared_units=units, reproducible=True, clipping=clipping)
    trainer.step(list(range(units)), loss)
    used = trainer.clipping
    trainer.close()
    return [p.detach().clone() for p in model.parameters()], used


def _assert_same_update(start: nn.Module, a: list, b: list, what: str) -> None:
    for (name, p0), pa, pb in zip(start.named_parameters(), a, b):
        step_a, step_b = p0.detach() - pa, p0.detach() - pb
        err = float((step_a - step_b).norm() / step_b.norm().clamp_min(1e-30))
        assert err < 1e-9, f"{what} {name}: relative difference {err:.1e}"


CASES = [("hafnet", "cpu"), ("hafnet", "dp"), ("sfer_mdfae", "cpu"), ("sfer_mdfae", "dp")]


@pytest.mark.parametrize("name,preset", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_ghost_step_equals_per_sample_step(name: str, preset: str) -> None:
    """Same seed, same sampled students, same noise: the two paths move every weight identically, both with
    a bound that clips every student (0.05) and one that clips none (1e6)."""
    torch.manual_seed(0)
    model = registry.build(name, 7, preset).double()
    frames = _frames(model.input_size)
    for clip in (0.05, 1e6):
        reference, used_ref = _one_step(model, frames, "per-sample", clip)
        fast, used_fast = _one_step(model, frames, "auto", clip)
        assert (used_ref, used_fast) == ("per-sample", "ghost")
        _assert_same_update(model, fast, reference, f"{name}-{preset} C={clip}")


@pytest.mark.parametrize("name", ["hafnet", "sfer_mdfae"])
def test_ghost_step_equals_per_sample_step_at_the_paper_preset(name: str) -> None:
    """The paper presets (224 px ResNet-18 heads, 112 px IR-50 + routing attention), 3 frames of 2 students."""
    torch.manual_seed(0)
    model = registry.build(name, 7, "paper").double()
    frames = _frames(model.input_size, n=3)
    reference, _ = _one_step(model, frames, "per-sample", 0.05, students=["a", "b", "a"])
    fast, used = _one_step(model, frames, "auto", 0.05, students=["a", "b", "a"])
    assert used == "ghost"
    _assert_same_update(model, fast, reference, f"{name}-paper")


def _reference_clipped_sum(model: nn.Module, x, y, rows: torch.Tensor, count: int, clip: float) -> list:
    """Per-student gradients one student at a time (plain autograd), clipped and summed."""
    per_student = []
    for u in range(count):
        model.zero_grad(set_to_none=True)
        sel = rows == u
        per_sample_loss(model, x[sel], y[sel]).sum().backward()
        per_student.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                            for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    total = []
    for grads in per_student:
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [factor * g for g in grads] if not total else [t + factor * g for t, g in zip(total, grads)]
    return total


@pytest.mark.parametrize("policy", ["ghost", "direct"])
@pytest.mark.parametrize("name", ["hafnet", "sfer_mdfae"])
def test_every_layer_rule_is_exact(name: str, policy: str) -> None:
    """All-ghost and all-direct (the mixed default picks per layer between the two) against autograd one
    student at a time; with the backbone frozen as ``train.trainable: last`` does for part of the model."""
    torch.manual_seed(1)
    model = registry.build(name, 7, "dp").double()
    if policy == "direct":
        for p in list(model.parameters())[:6]:
            p.requires_grad_(False)
    x, y = _frames(model.input_size, n=4).tensors
    rows = torch.tensor([0, 1, 1, 0])   # two students of two frames: diagonal and cross-frame ghost terms
    reference = _reference_clipped_sum(model, x, y, rows, 2, clip=0.5)
    clipper = StudentClipper(model, layer_policy=policy)
    with clipper.capture():
        losses = per_sample_loss(model, x, y)
    clipper.clip_and_sum(losses, rows, 2, 0.5)
    kinds = clipper.kinds()
    clipper.close()
    assert kinds.get(f"conv2d-{policy}", 0) > 0 and kinds.get(f"linear-{policy}", 0) > 0, kinds
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


class _TwiceConv(nn.Module):
    """One conv applied twice (its gradient sums both calls), a PReLU-free custom layer Opacus has no sampler
    for (functorch fallback), and a Linear on a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.scale = _Scale()
        self.head = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        return self.head(self.scale(h).flatten(2).transpose(1, 2)).mean(dim=1)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([0.7, -1.3], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.view(1, -1, 1, 1) ** 2


def _toy_loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def test_shared_layer_and_custom_layer_match_per_sample():
    torch.manual_seed(2)
    model = _TwiceConv().double()
    g = torch.Generator().manual_seed(3)
    frames = TensorDataset(torch.randn(7, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (7,), generator=g))
    reference, _ = _one_step(model, frames, "per-sample", 0.1, _toy_loss)
    for policy in ("ghost", "auto"):
        fast, used = _one_step(model, frames, policy, 0.1, _toy_loss)
        assert used == "ghost"
        _assert_same_update(model, fast, reference, f"twice-conv {policy}")


class _Gated(nn.Module):
    """Trainable parameters of its own AND in a child: one hook would see both, so ghost refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(2, dtype=torch.float64))
        self.inner = nn.Linear(2, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.gain


def test_auto_falls_back_to_per_sample_for_a_layer_it_cannot_take_and_ghost_refuses():
    frames = TensorDataset(torch.randn(7, 2, dtype=torch.float64), torch.randint(0, 4, (7,)))
    torch.manual_seed(4)
    model = nn.Sequential(_Gated(), nn.Linear(2, 4).double())
    updated, used = _one_step(model, frames, "auto", 1.0, _toy_loss)
    assert used == "per-sample"
    assert all(not torch.equal(a, b.detach()) for a, b in zip(updated, model.parameters()))
    with pytest.raises(UnsupportedModel, match="of its own and in its children"):
        _one_step(model, frames, "ghost", 1.0, _toy_loss)
    with pytest.raises(ValueError, match="privacy.clipping must be one of"):
        _one_step(model, frames, "fast", 1.0, _toy_loss)


def _four_frames_of_two_students(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four float64 2-channel frames (size x size), labels of 4 classes, frames 0 and 3 of student 0."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 2, size, size, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g)
    return x, y, torch.tensor([0, 1, 1, 0])


def test_norms_are_taken_during_the_backward_and_nothing_is_held_after_the_step():
    """Only the first layers' outputs are kept for the backward (the rest keep their shape), every layer is
    processed as its output gradient arrives, and after the step no call holds a tensor; a model input that
    needs a gradient itself (a leaf) makes its first layer a source, with the same result."""
    torch.manual_seed(5)
    model = _TwiceConv().double()
    x, y, rows = _four_frames_of_two_students(6, size=5)
    reference = _reference_clipped_sum_toy(model, x, y, rows)
    clipper = StudentClipper(model)
    with clipper.capture():
        losses = _toy_loss(model, x.clone().requires_grad_(), y)
    calls = [c for cs in clipper.calls.values() for c in cs]
    assert [c.source for c in calls] == [True, False, False, False]
    assert [c.output is not None for c in calls] == [True, False, False, False]
    clipper.clip_and_sum(losses, rows, 2, 0.1)
    assert all(not cs for cs in clipper.calls.values()) and all(not c.inputs and c.output is None for c in calls)
    clipper.close()
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)


def _reference_clipped_sum_toy(model: nn.Module, x, y, rows: torch.Tensor) -> list:
    total = []
    for u in range(2):
        model.zero_grad(set_to_none=True)
        _toy_loss(model, x[rows == u], y[rows == u]).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        factor = min(1.0, 0.1 / (float(torch.sqrt(sum((g ** 2).sum() for g in grads))) + 1e-6))
        total = [factor * g for g in grads] if not total else [t + factor * g for t, g in zip(total, grads)]
    model.zero_grad(set_to_none=True)
    return total


class _Detour(nn.Module):
    """A Linear's weight used outside the Linear: the head's input gradient reaches no layer output."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(2, 2).double()
        self.head = nn.Linear(2, 4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x @ self.side.weight.t()))


def test_a_gradient_that_bypasses_the_layers_is_refused_not_dropped():
    model = _Detour()
    clipper = StudentClipper(model)
    x, y = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0, 1, 2])
    with clipper.capture():
        losses = _toy_loss(model, x, y)
    with pytest.raises(UnsupportedModel, match="did not reach"):
        clipper.clip_and_sum(losses, torch.arange(3), 3, 1.0)
    clipper.close()


@pytest.mark.parametrize("secure_mode,sigma", [(False, 1.3), (True, 1.3), (False, 0.0)])
def test_clipped_sum_optimizer_steps_exactly_as_opacus(secure_mode: bool, sigma: float) -> None:
    """Same seed, same clipped sums: clipped_sum_optimizer's noised gradients and weights are Opacus'
    DPOptimizerFastGradientClipping's bit for bit, over two steps, one of them accumulated over two batches
    (a skipped step, as a virtual batch does)."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from privacy.student_clipping import clipped_sum_optimizer

    def run(make) -> list:
        torch.manual_seed(8)
        model = nn.Sequential(nn.Linear(5, 3), nn.Conv1d(3, 2, 1)).double()
        opt = make(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=sigma, max_grad_norm=0.7,
                   expected_batch_size=4, generator=torch.Generator().manual_seed(9), secure_mode=secure_mode)
        g = torch.Generator().manual_seed(10)
        seen = []
        for skip in (True, False, False):
            opt.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.signal_skip_step(skip)
            opt.step()
            if not skip:
                seen += [p.grad.clone() for p in model.parameters()] + [p.detach().clone() for p in model.parameters()]
        return seen

    for a, b in zip(run(clipped_sum_optimizer), run(DPOptimizerFastGradientClipping)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                    (torch.float32, torch.float64)])
def test_clipped_sum_optimizer_with_a_csprng_stream_noises_and_scales_each_coordinate(dtypes) -> None:
    """With a CSPRNG stream the step's gradient is (noise + clipped sum) / expected batch for every coordinate,
    the noise the stream's one draw for all parameters in their order: whether the division runs once over the
    draw's tensor (every p.grad a view of it: one dtype) or per tensor (mixed dtypes: the noise is converted)."""
    from privacy.secure_random import SecureRandom
    from privacy.student_clipping import clipped_sum_optimizer

    key, sigma, bound, batch = bytes(range(32)), 1.3, 0.7, 4
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 3).to(dtypes[0]), nn.Conv1d(3, 2, 1).to(dtypes[1]))
    opt = clipped_sum_optimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=sigma,
                                max_grad_norm=bound, expected_batch_size=batch, generator=SecureRandom(_key=key),
                                secure_mode=True)
    params = list(model.parameters())
    sums = [torch.randn(p.shape, dtype=p.dtype) for p in params]
    for p, s in zip(params, sums):
        p.grad = s.clone()
    opt.step()
    draw_dtype = dtypes[0] if dtypes[0] == dtypes[1] else torch.float64
    noise = SecureRandom(_key=key).normal_sums_into(torch.empty(sum(p.numel() for p in params), dtype=draw_dtype),
                                                    terms=4, scale=0.5 * sigma * bound)
    for p, s, n in zip(params, sums, noise.split([p.numel() for p in params])):
        want = (n.view(p.shape).to(p.dtype) + s) / (batch * opt.accumulated_iterations)
        assert p.grad.dtype == p.dtype and torch.equal(p.grad, want)
    assert opt.noised_grads is None   # the draw's tensor is not held past the step


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,size", [
    (3, 1, 1, 1, 1, 4), ((3, 1), 1, (1, 0), 1, 2, 4), (1, 2, 0, 1, 1, 8), (1, 1, 0, 1, 4, 4), (3, 1, 2, 2, 1, 6),
    (3, 1, 0, 1, 2, 5), (2, 1, 1, 1, 1, 3), ((1, 3), 1, (0, 1), 1, 4, 4), (3, 1, (0, 1), 1, 1, 4),
    (3, 2, 1, 1, 1, 9)])
@pytest.mark.parametrize("offset_sum", ["default", "sliced"])
def test_ghost_conv_input_gram_without_unfolding_equals_the_unfolded_one(kernel, stride, padding, dilation, groups,
                                                                          size, offset_sum) -> None:
    """Conv2dRule's Gram matrices from the inputs' Gram over input positions, summed over kernel offsets
    (no im2col), equal those of the unfolded inputs, for every frame with itself and for cross-frame pairs:
    with the offset sums as one product with the fixed 0/1 matrix (maps of at most 16 positions, kernels of
    at least 2x2) and as sliced adds (forced: ``small_map = 0``), incl. kernels without a centre tap
    (2x2), asymmetric padding and dilation; where they would cost more (stride 2, 3x3 on a 9x9 map) the
    rule unfolds."""
    from privacy.student_clipping import Conv2dRule

    torch.manual_seed(11)
    layer = nn.Conv2d(4, 8, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups).double()
    rule = Conv2dRule(layer, "ghost")
    if offset_sum == "sliced":
        rule.small_map = 0
    x = torch.randn(3, 4, size, size, dtype=torch.float64)
    gram = rule._shifted_gram(x, layer(x).shape[2:])
    if stride == 2 and kernel == 3:
        assert gram is None
        return
    a = rule._unfold(x).transpose(2, 3)   # (B, groups, T, d)
    unfolded = nn.functional.unfold(x, kernel, dilation, padding, stride)
    torch.testing.assert_close(a, unfolded.view(3, groups, -1, a.shape[2]).transpose(2, 3))
    i, j = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 2, 2, 1])
    torch.testing.assert_close(gram(None, None), a @ a.transpose(-1, -2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram(i, j), a[i] @ a[j].transpose(-1, -2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cin,cout,kernel,stride,padding,groups,size", [
    (4, 6, 1, 2, 0, 2, 7),      # 1x1 strided grouped: a product with the subsampled input
    (3, 8, 3, 2, 1, 1, 9),      # an RGB stem's 27-value fields: copied, in chunks
    (8, 8, 3, 1, 1, 1, 5),      # narrow: one grouped convolution-backward call
    (6, 6, 5, 1, 2, 6, 6),      # depthwise 5x5 (25 values per field, groups = channels): the same call
    (8, 40, 3, 1, 1, 1, 4)])    # wide: copied fields
def test_per_frame_conv_weight_gradients_equal_opacus(cin, cout, kernel, stride, padding, groups, size) -> None:
    """Each per-frame weight gradient rule of Conv2dRule (and the ghost 1x1 clipped sum by one product)
    against Opacus' conv sampler and the convolution kernel."""
    from opacus.grad_sample import GradSampleModule

    from privacy.student_clipping import Conv2dRule

    torch.manual_seed(13)
    layer = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups).double()
    x = torch.randn(5, cin, size, size, dtype=torch.float64)
    g = torch.randn(layer(x).shape, dtype=torch.float64)
    rule = Conv2dRule(layer, "direct")
    rule.fields_budget = 2 * 27 * 25   # the stem case: two frames per chunk
    expected = GradSampleModule.GRAD_SAMPLERS[nn.Conv2d](layer, [x], g)[layer.weight]
    torch.testing.assert_close(rule._per_frame_weight(x, g), expected, rtol=1e-12, atol=1e-12)
    scale = torch.rand(5, dtype=torch.float64)
    rule.ghost = [(x, g)]
    rule.clipped_sum(scale)
    torch.testing.assert_close(layer.weight.grad, (expected * scale.view(-1, 1, 1, 1, 1)).sum(dim=0),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,frozen_bias", [((5, 6, 3, 3), False), ((5, 6, 2, 3, 3), False), ((5, 6, 3, 3), True)])
def test_group_norm_rule_equals_opacus_sampler(shape, frozen_bias) -> None:
    """The GroupNorm rule's per-student gradients (one GroupNorm backward kernel with the frames as groups, on
    the statistics the forward saved) are Opacus' sampler's, summed per student; also for a video model's
    5-D input, a frozen bias, and without saved statistics (recomputed)."""
    from opacus.grad_sample import GradSampleModule

    from privacy.student_clipping import Call, GroupNormRule, Units

    torch.manual_seed(12)
    layer = nn.GroupNorm(2, 6).double()
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    layer.bias.requires_grad_(not frozen_bias)
    x, g = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    units = Units(torch.tensor([0, 1, 0, 2, 1]), 3)
    rule = GroupNormRule(layer)
    saved = rule.keep(layer(x.clone().requires_grad_()))
    assert saved is not None and saved[0].shape == (5, 2)
    expected = GradSampleModule.GRAD_SAMPLERS[nn.GroupNorm](layer, [x], g)
    for stats in (saved, None):
        rule.sq_norms([Call([x], g.shape, g.dtype, True, grad=g, saved=stats)], units)
        assert set(rule.kept) == ({layer.weight} if frozen_bias else {layer.weight, layer.bias})
        for p, per_student in rule.kept.items():
            torch.testing.assert_close(per_student, units.per_unit(expected[p]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["resnet50_cbam", "r2plus1d_sta"])
def test_ghost_clipped_sum_is_exact_on_the_other_zoo_models(name: str) -> None:
    """ResNet-50 + CBAM (53 GroupNorms, direct and ghost convs) and R(2+1)D + attention (GroupNorm on 5-D
    clips, Conv3d on the per-sample fallback): the clipped per-student sum equals autograd one student at a
    time, 3 frames of 2 students."""
    torch.manual_seed(0)
    model = registry.build(name, 7, "cpu").double()
    frames = registry.clip_frames(model)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, *((frames,) if frames else ()), model.input_size, model.input_size, generator=g,
                   dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 7, (3,), generator=g)
    rows = torch.tensor([0, 1, 0])
    reference = _reference_clipped_sum(model, x, y, rows, 2, clip=0.05)
    clipper = StudentClipper(model)
    with clipper.capture():
        losses = per_sample_loss(model, x, y)
    clipper.clip_and_sum(losses, rows, 2, 0.05)
    kinds = clipper.kinds()
    clipper.close()
    assert kinds.get("group-norm", 0) > 30, kinds
    for p, r in zip([p for p in model.parameters() if p.requires_grad], reference):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)


class _ByFrameNet(nn.Module):
    """A first conv (hooked: its input needs no gradient), then a narrow 3x3 conv with a bias applied twice
    (run by frame: its backward gives the per-frame gradients) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(2, 8, 3, padding=1)
        self.narrow = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.narrow(torch.tanh(self.narrow(torch.tanh(self.first(x))))))
        return self.head(h.mean(dim=(2, 3)))


def test_a_narrow_conv_run_by_frame_gives_the_exact_clipped_sum_and_input_gradient():
    """Conv2dRule's by-frame path (_ConvByFrame: the layer's own backward, one grouped convolution-backward
    call, gives its input gradient and per-frame weight and bias gradients, no hooks) is taken for a narrow
    conv called twice and gives autograd's clipped per-student sum; outside capture the layer is unchanged."""
    torch.manual_seed(14)
    model = _ByFrameNet().double()
    x, y, rows = _four_frames_of_two_students(15, size=6)
    reference = _reference_clipped_sum_toy(model, x, y, rows)
    clipper = StudentClipper(model)
    rule = clipper.rules[model.narrow]
    with clipper.capture():
        losses = _toy_loss(model, x, y)
    assert rule.by_frame and rule.by_frame_calls == 2 and not clipper.calls[model.narrow]
    assert clipper.rules[model.first] not in clipper.by_frame   # 18 values per receptive field: copied fields
    assert "forward" not in vars(model.narrow)
    clipper.clip_and_sum(losses, rows, 2, 0.1)
    assert clipper.kinds()["conv2d-direct"] >= 1
    clipper.close()
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("policy", ["ghost", "direct"])
def test_a_student_with_a_non_finite_gradient_adds_nothing(policy: str) -> None:
    """A frame that makes the gradient inf or NaN (a crafted model overflowing on it; here an inf pixel) would
    turn the whole clipped sum into NaN — a release that says the student was in the batch. Its student's
    clipped gradient is zero instead, in ghost and direct layers alike: the others' sum is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    x[1, 0, 2, 2] = float("inf")    # a frame of student 1
    grads, norms = [], []
    for frames, rows, count in (([0, 1, 2, 3], [0, 1, 1, 0], 2), ([0, 3], [0, 0], 1)):
        model.zero_grad(set_to_none=True)
        clipper = StudentClipper(model, layer_policy=policy)
        with clipper.capture():
            losses = _toy_loss(model, x[frames], y[frames])
        norms.append(clipper.clip_and_sum(losses, torch.tensor(rows), count, 0.5))
        assert clipper.kinds() == {f"conv2d-{policy}": 1, f"linear-{policy}": 1}
        clipper.close()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.isfinite(norms[0]).tolist() == [True, False]   # student 1's gradient really is not finite
    for with_inf, without in zip(*grads):
        assert torch.isfinite(with_inf).all()
        torch.testing.assert_close(with_inf, without)


class _NormsNet(nn.Module):
    """A GroupNorm on the model's input (a leaf: hooked), a conv, then one GroupNorm applied twice after it (run
    by frame: its input needs a gradient from the conv) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.first_norm = nn.GroupNorm(1, 2)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(self.first_norm(x)))
        h = torch.tanh(self.norm(h)) + self.norm(h * 2.0)
        return self.head(h.mean(dim=(2, 3)))


def test_a_group_norm_after_a_layer_runs_by_frame_without_hooks_and_gives_the_exact_clipped_sum():
    """GroupNormRule's by-frame path (_GroupNormByFrame: the layer's own backward runs the GroupNorm backward
    kernel for the input gradient and once more with the frames as groups for the per-frame weight and bias
    gradients) is taken for a GroupNorm whose input comes from a layer, also when it is called twice; a
    GroupNorm on the model's input keeps the hooks. Layers that may run by frame carry no forward hook (they
    record a call that does not run by frame themselves). The clipped per-student sum is autograd's."""
    torch.manual_seed(16)
    model = _NormsNet().double()
    for norm in (model.first_norm, model.norm):
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x, y, rows = _four_frames_of_two_students(17, size=5)
    reference = _reference_clipped_sum_toy(model, x, y, rows)
    clipper = StudentClipper(model)
    assert not model.norm._forward_hooks and not model.first_norm._forward_hooks and model.head._forward_hooks
    with clipper.capture():
        losses = _toy_loss(model, x, y)
    norm_rule, first_rule = clipper.rules[model.norm], clipper.rules[model.first_norm]
    assert norm_rule.by_frame and norm_rule.by_frame_calls == 2 and not clipper.calls[model.norm]
    assert not first_rule.by_frame and len(clipper.calls[model.first_norm]) == 1   # recorded by its forward
    clipper.clip_and_sum(losses, rows, 2, 0.1)
    clipper.close()
    assert "forward" not in vars(model.norm)
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)
