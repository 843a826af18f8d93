"""The CSPRNG stream (privacy/secure_random.py) and the trainer's use of it: every draw of a school's DP-SGD that
is not ``reproducible`` — Poisson sampling, frame choice, noise — comes from AES-256-CTR, with the right laws."""

from __future__ import annotations

import copy
import math
import pickle
from collections import Counter
from itertools import permutations

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from privacy.engine import PoissonUnits, PrivateTrainer
import privacy.secure_random as secure_random
from privacy.noise import gaussian_noise, gaussian_noise_like
from privacy.secure_random import SecureRandom

N = 1_000_000


# ------------------------------------------------------------------------------------------ the stream
def test_the_bits_are_the_aes256_ctr_keystream():
    """Known answer without CTR mode: block i of the stream is AES-256(key, counter + i), the 128-bit counter
    carrying across its low 64 bits."""
    key = bytes(range(32))
    start = (2**64 - 2).to_bytes(16, "big")
    got = SecureRandom(_key=key, _counter=start).random_bytes(64)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    blocks = b"".join(ecb.update((2**64 - 2 + i).to_bytes(16, "big")) for i in range(4))
    assert got == blocks


def test_every_stream_has_its_own_key():
    a, b = SecureRandom(), SecureRandom()
    assert a.random_bytes(32) != b.random_bytes(32)
    assert a.random_bytes(32) != a.random_bytes(32)   # a stream moves on


def test_a_stream_cannot_be_copied():
    s = SecureRandom()
    for copier in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match="never copied"):
            copier(s)


def test_a_forked_child_cannot_draw(monkeypatch):
    """Every draw, the normals' buffered path too, refuses to run in another process than the one that keyed the
    stream (a forked child would repeat its parent's numbers)."""
    import os

    s = SecureRandom()
    s.normal(3)                                        # the normal buffers exist before the fork
    monkeypatch.setattr(os, "getpid", lambda: -1)
    for draw in (lambda: s.random_bytes(8), lambda: s.normal(3), lambda: s.normal_sums_into(torch.empty(2), 4)):
        with pytest.raises(RuntimeError, match="forked child"):
            draw()


def test_uniforms_carry_53_random_bits_and_respect_their_open_end():
    s = SecureRandom()
    u = s.uniform(N)
    assert u.dtype == torch.float64 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    k = u * 2.0**53
    assert torch.equal(k, k.floor())                      # multiples of 2^-53 ...
    assert 0.49 < float((k % 2 == 1).double().mean()) < 0.51   # ... using the last bit (a float32 draw would not)
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / N)
    left = s.uniform(N, open_at="left")
    assert float(left.min()) > 0.0 and float(left.max()) <= 1.0
    with pytest.raises(ValueError):
        s.uniform(3, open_at="both")


def test_normals_are_standard_normal():
    """10^6 draws: mean, variance, tails and the KS distance to N(0, 1). The bounds are ~5 standard errors:
    uniforms, a variance 10 % off (KS ≈ 0.011) or a transform with short tails fail them."""
    z = SecureRandom().normal(N)
    assert z.shape == (N,) and z.dtype == torch.float64
    assert abs(float(z.mean())) < 5 / math.sqrt(N)
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2 / N)
    beyond3 = int((z.abs() > 3).sum())                     # expected 2700, sd 52
    assert abs(beyond3 - N * 2 * stats.norm.sf(3)) < 5 * math.sqrt(N * 2 * stats.norm.sf(3))
    assert stats.kstest(z.numpy(), "norm").statistic < 0.0035   # P(false alarm) < 1e-10
    assert SecureRandom().normal(7).shape == (7,)        # odd counts: half a Box-Muller pair dropped


def _box_muller_by_hand(key: bytes, pairs: int) -> list[float]:
    """The transform written out one number at a time from the AES-256 blocks (ECB on the counter) with
    Python's math: pair i takes word i (u1 = (k + 1)·2^-53, k = the word's top 53 bits) and word pairs + i
    (u2 = k·2^-53); the draws are the cos outputs, then the sin outputs."""
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    stream = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(pairs))
    k = [int.from_bytes(stream[8 * i:8 * i + 8], "little") >> 11 for i in range(2 * pairs)]
    radius = [math.sqrt(-2.0 * math.log((k[i] + 1) * 2.0**-53)) for i in range(pairs)]
    angle = [k[pairs + i] * 2.0**-53 * (2 * math.pi) for i in range(pairs)]
    return ([r * math.cos(a) for r, a in zip(radius, angle)] + [r * math.sin(a) for r, a in zip(radius, angle)])


@pytest.fixture(params=[True, False], ids=["tan-half-angle", "cos-sin"])
def angle_path(request, monkeypatch):
    """Both ways the stream computes cos θ and sin θ (one is chosen per machine: privacy/secure_random.py
    ``_TAN_HALF_ANGLE``), so that each is checked on any machine."""
    monkeypatch.setattr(secure_random, "_TAN_HALF_ANGLE", request.param)
    return request.param


def test_normals_known_answer_under_a_fixed_key(angle_path):
    """Pins the transform: the first draws under the all-zero key, the same numbers as the transform written out
    by hand, and the secure-mode sums (four draws of four distinct pairs: the cos outputs of pairs j and m + j,
    the sin outputs of pairs j + 1 and m + j + 1, mod m; never both outputs of one pair). A change of the bits
    used, their order, the transform or which draws are summed moves these far beyond the ulp-level tolerance
    (numpy's and torch's float64 kernels may differ from libm in the last bit)."""
    key = bytes(32)
    want = [-0.18485579951287515, -1.0860893866037513, -1.0992769206036046, -0.31358290911733927]
    assert SecureRandom(_key=key).normal(4).tolist() == pytest.approx(want, rel=1e-14)
    assert _box_muller_by_hand(key, 2) == pytest.approx(want, rel=1e-14)
    z = _box_muller_by_hand(key, 4)                    # m = 2 values: cos 0..3, then sin 0..3
    by_hand = [(z[0] + z[2] + z[5] + z[7]) * 0.5, (z[1] + z[3] + z[4] + z[6]) * 0.5]   # pairs 0, 2, 1, 3 | 1, 3, 0, 2
    assert by_hand == pytest.approx([-0.7589096276250814, 0.29551624842896573], rel=1e-14)
    sums64 = SecureRandom(_key=key).normal_sums_into(torch.empty(2, dtype=torch.float64), terms=4, scale=0.5)
    assert sums64.tolist() == pytest.approx(by_hand, rel=1e-14)
    sums32 = SecureRandom(_key=key).normal_sums_into(torch.empty(2, dtype=torch.float32), terms=4, scale=0.5)
    assert torch.equal(sums32, sums64.to(torch.float32))   # one rounding, from the float64 value
    lone = SecureRandom(_key=key).normal_sums_into(torch.empty(1, dtype=torch.float64), terms=4, scale=0.5)
    assert lone.tolist() == pytest.approx(by_hand[:1], rel=1e-14)   # drawn as the first of two: distinct pairs too


def test_normal_sums_check_their_arguments():
    s = SecureRandom()
    for bad in (torch.empty(3, dtype=torch.int64), torch.empty(3, dtype=torch.float16), torch.empty(4, 2).t()):
        with pytest.raises(ValueError, match="contiguous float32/float64 CPU tensor"):
            s.normal_sums_into(bad)
    for terms in (0, 3):   # an odd number of terms would pair a draw with its own pair's other output
        with pytest.raises(ValueError, match="terms"):
            s.normal_sums_into(torch.empty(3), terms=terms)


def test_the_two_angle_paths_give_the_same_normals(monkeypatch):
    """cos θ, sin θ from torch's cos and sin, or from t = tan(θ/2) as (1 − t²)/(1 + t²), 2t/(1 + t²): the same
    float64 normals to a few units in the last place (both are the exact transform up to rounding), and the same
    float32 secure-mode noise bit for bit over 2^18 coordinates (a float64 difference of ~1e-15 moves a float32
    rounding with probability ~1e-8 per coordinate); and the extremes of the angle, where t is 0, about 1.6e16
    (θ = fl(π): no float64 is π exactly, so t is finite) and just below 0."""
    key = bytes(range(32))
    drawn = {}
    for tan in (True, False):
        monkeypatch.setattr(secure_random, "_TAN_HALF_ANGLE", tan)
        drawn[tan] = (SecureRandom(_key=key).normal(1 << 17),
                      SecureRandom(_key=key).normal_sums_into(torch.empty(1 << 18), terms=4, scale=0.5),
                      SecureRandom(_key=key).normal_sums_into(torch.empty(1 << 18, dtype=torch.float32), terms=4,
                                                              scale=0.5))
    (new64, new_sums, new32), (old64, old_sums, old32) = drawn[True], drawn[False]
    assert float((new64 - old64).abs().max()) < 4e-15
    assert float((new_sums - old_sums).abs().max()) < 8e-15
    assert torch.equal(new32, old32)
    for tan in (True, False):   # the extremes of t = tan(θ/2): 0 (u2 = 0), about 1.6e16 (u2 = 1/2: θ = fl(π)), and
        monkeypatch.setattr(secure_random, "_TAN_HALF_ANGLE", tan)   # just below 0 (u2 = 1 − 2^-53)
        stream = SecureRandom()
        stream._box_muller(6)                        # makes the buffers
        stream._encryptor = _KeepTheBuffer()         # the next pass reads the words written here
        stream._buffers().words[:6] = [(2 ** 52 - 1) << 11] * 3 + [0, 2 ** 52 << 11, (2 ** 53 - 1) << 11]  # u1 = 1/2
        cos0, cos_half, cos_end, sin0, sin_half, sin_end = stream._box_muller(6).tolist()
        r = math.sqrt(2 * math.log(2))
        assert cos0 == pytest.approx(r, rel=1e-15) and sin0 == 0.0
        assert cos_half == pytest.approx(-r, rel=1e-15) and sin_half == pytest.approx(r * math.sin(math.pi), rel=1e-6)
        assert cos_end == pytest.approx(r, rel=1e-15)
        assert sin_end == pytest.approx(-r * 2 * math.pi * 2.0 ** -53, abs=2e-15) and sin_end <= 0.0


class _KeepTheBuffer:
    """An encryptor that leaves the keystream buffer as it is."""

    def update_into(self, data: object, buffer: object) -> None:
        return None


@pytest.mark.parametrize("broken", ["uniform", "variance"])
def test_the_normal_checks_catch_a_broken_transform(broken):
    """The same KS bound on what a broken transform would give: the check above can fail."""
    s = SecureRandom()
    z = (s.uniform(N) - 0.5) * math.sqrt(12) if broken == "uniform" else s.normal(N) * math.sqrt(1.1)
    assert stats.kstest(z.numpy(), "norm").statistic > 0.0035


def test_bernoulli_has_rate_q():
    s = SecureRandom()
    for q in (0.1, 0.5, 2 / 3):
        hits = int(s.bernoulli(N, q).sum())
        assert abs(hits - N * q) < 5 * math.sqrt(N * q * (1 - q))
    assert not s.bernoulli(1000, 0.0).any() and s.bernoulli(1000, 1.0).all()
    with pytest.raises(ValueError):
        s.bernoulli(3, 1.5)


def test_randperm_is_a_uniform_permutation():
    s = SecureRandom()
    for n in (1, 2, 10, 1000):
        assert torch.equal(s.randperm(n).sort().values, torch.arange(n))
    draws = 24_000   # all 24 orders of 4, about 1000 each: chi-square with 23 degrees of freedom
    counts = Counter(tuple(s.randperm(4).tolist()) for _ in range(draws))
    assert set(counts) == set(permutations(range(4)))
    chi2 = sum((c - draws / 24) ** 2 / (draws / 24) for c in counts.values())
    assert chi2 < stats.chi2.isf(1e-6, 23)


def test_poisson_units_take_each_unit_at_rate_q():
    sampler = PoissonUnits(num_units=1000, sample_rate=0.1, steps=200, stream=SecureRandom())
    batches = list(sampler)
    assert len(batches) == len(sampler) == 200
    assert all(b == sorted(set(b)) and all(0 <= u < 1000 for u in b) for b in batches)
    total = sum(len(b) for b in batches)                 # 200 000 coin flips at q = 0.1
    assert abs(total - 20_000) < 5 * math.sqrt(200_000 * 0.1 * 0.9)
    per_unit = Counter(u for b in batches for u in b)    # no unit favoured: each ~ Binomial(200, 0.1)
    assert max(per_unit.values()) < 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_noise_has_std_and_the_reference_shape_and_dtype(dtype):
    ref = torch.zeros(300, 1000, dtype=dtype)
    for secure in (True, False):
        noise = gaussian_noise(0.7, ref, SecureRandom(), secure)
        assert noise.shape == ref.shape and noise.dtype == dtype
        assert float(noise.std()) == pytest.approx(0.7, rel=5 * math.sqrt(1 / (2 * ref.numel())))


def test_the_noised_gradient_is_the_sum_plus_one_draw_of_noise():
    """CSPRNGNoise.add_noise: each p.grad is its clipped sum plus its piece of the step's one noise draw (std σC,
    read back under the same key), shaped like p; the sums themselves are left as they were."""
    from opacus.optimizers import DPOptimizer

    from privacy.engine import dp_optimizer

    key = bytes(range(32))
    params = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5))]
    opt = dp_optimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.5, max_grad_norm=2.0, expected_batch_size=1,
                       generator=SecureRandom(_key=key), secure_mode=True)
    assert isinstance(opt, DPOptimizer)
    sums = [torch.arange(12.0).view(3, 4), -torch.arange(5.0)]
    for p, s in zip(params, sums):
        p.summed_grad = s.clone()
    opt.add_noise()
    want = gaussian_noise_like(3.0, sums, SecureRandom(_key=key), True)
    for p, s, n in zip(params, sums, want):
        assert p.grad.shape == p.shape and torch.equal(p.grad, s + n)
        assert torch.equal(p.summed_grad, s)


# ------------------------------------------------------------------------------------------ the trainer
def _data(frames_per_student: int = 5, students: int = 8):
    g = torch.Generator().manual_seed(1)
    n = frames_per_student * students
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(x, y), [f"s{i % students}" for i in range(n)]


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _trainer(clipping: str = "ghost", reproducible: bool = False, sigma: float = 2.0, width: int = 4,
             seed: int | None = 0) -> PrivateTrainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, width))
    ds, ids = _data()
    return PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), ds, ids, units_per_batch=2,
                          frames_per_unit=2, noise_multiplier=sigma, max_grad_norm=0.5, seed=seed,
                          declared_units=8, reproducible=reproducible, clipping=clipping)


def _noise_of_an_empty_step(trainer: PrivateTrainer) -> torch.Tensor:
    """lr 1 and no units: the weights move by exactly the scaled noise."""
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.step([], _loss)
    return before - torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def _refuse_torch_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("a DP draw came from torch's generator")

    for name in ("normal", "rand", "randperm"):   # Opacus' noise, Opacus' Poisson sampler, the frame choice
        monkeypatch.setattr(torch, name, refuse)


@pytest.mark.parametrize("clipping", ["per-sample", "ghost"])
def test_training_draws_sampling_frames_and_noise_from_the_csprng(clipping, monkeypatch):
    """With torch's draws made to raise, a non-reproducible epoch runs, and each source drew from its stream;
    the reproducible path does hit the patched functions (so this test can fail)."""
    trainer = _trainer(clipping)
    calls: Counter[str] = Counter()
    for name in ("normal_sums_into", "bernoulli", "randperm"):
        original = getattr(SecureRandom, name)
        monkeypatch.setattr(SecureRandom, name, lambda self, *a, _o=original, _n=name, **k: (
            calls.update([_n]), _o(self, *a, **k))[1])
    _refuse_torch_draws(monkeypatch)
    stats_ = trainer.train_epoch(_loss)
    assert stats_["steps"] == trainer.steps_per_epoch == 4 and stats_["units"] > 0
    assert calls["bernoulli"] == 4                        # one Poisson draw per step
    assert calls["normal_sums_into"] == 4                 # weight and bias in one draw, every step
    assert calls["randperm"] == stats_["units"]           # every sampled student has 5 > 2 frames
    monkeypatch.undo()
    seeded = _trainer(clipping, reproducible=True)
    _refuse_torch_draws(monkeypatch)
    with pytest.raises(AssertionError, match="torch's generator"):
        seeded.train_epoch(_loss)


@pytest.mark.parametrize("clipping", ["per-sample", "ghost"])
def test_the_csprng_noise_keeps_the_four_draw_form_and_the_scale_sigma_c_over_b(clipping, monkeypatch):
    """Four standard normals per coordinate (secure_mode's form), and the noise std of a step is Opacus'
    σ·C / expected batch (here 2 × 0.5 / 2), as on the seeded path; 36 000 coordinates: ±0.4 % at 1 sd. The four
    draws are counted where they cannot be faked: under a known key, the stream's next block after the step must
    be block 2 × (coordinates) of the AES-CTR stream — one 16-byte block per Box–Muller pair, two normals."""
    drawn: list[tuple[int, int]] = []
    original = SecureRandom.normal_sums_into
    monkeypatch.setattr(SecureRandom, "normal_sums_into", lambda self, out, terms=1, scale=1.0: (
        drawn.append((out.numel(), terms)), original(self, out, terms, scale))[1])
    trainer = _trainer(clipping, width=1000)
    opt = trainer.optimizer
    key = bytes(range(32))
    opt.generator = SecureRandom(_key=key)
    want = opt.noise_multiplier * opt.max_grad_norm / opt.expected_batch_size
    assert want == pytest.approx(2.0 * 0.5 / 2)
    noise = _noise_of_an_empty_step(trainer)
    coordinates = sum(p.numel() for p in trainer.model.parameters())
    assert drawn == [(coordinates, 4)]                  # one draw for all parameters, four normals each
    next_block = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update((2 * coordinates).to_bytes(16, "big"))
    assert opt.generator.random_bytes(16) == next_block
    assert noise.dtype == torch.float32
    assert float(noise.std()) == pytest.approx(want, rel=0.02)
    assert abs(float(noise.mean())) < 5 * want / math.sqrt(noise.numel())
    assert stats.kstest(noise.double().numpy() / want, "norm").statistic < 0.015
    seeded = _noise_of_an_empty_step(_trainer(clipping, reproducible=True, width=1000))
    assert float(seeded.std()) == pytest.approx(want, rel=0.02)


def test_two_trainers_never_draw_the_same_noise():
    """Same seed, same model: two trainers' noise (and one trainer's two steps) are unrelated; only the
    reproducible path repeats itself."""
    a, b = _trainer(width=1000), _trainer(width=1000)
    na, nb, na2 = _noise_of_an_empty_step(a), _noise_of_an_empty_step(b), _noise_of_an_empty_step(a)
    for x, y in ((na, nb), (na, na2)):
        assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 5 / math.sqrt(x.numel())
    r1 = _noise_of_an_empty_step(_trainer(width=1000, reproducible=True))
    r2 = _noise_of_an_empty_step(_trainer(width=1000, reproducible=True))
    assert torch.equal(r1, r2)


def test_the_frame_choice_is_uniform_over_a_students_frames():
    trainer = _trainer()
    members = set(trainer._members[0].tolist())
    counts: Counter[int] = Counter()
    for _ in range(3000):
        frames, rows = trainer._frames_of([0])
        assert len(frames) == len(set(frames)) == 2 and set(frames) <= members and rows == [0, 0]
        counts.update(frames)
    for m in members:   # each of 5 frames in 2/5 of the draws: sd 0.009
        assert counts[m] / 3000 == pytest.approx(0.4, abs=0.045)


class _Augmented(torch.utils.data.Dataset):
    """Frames whose transform draws from torch's global generator, as torchvision's augmentation does; each
    draw is kept so the test can see where it came from."""

    def __init__(self) -> None:
        self.base, self.drawn = _data()[0], []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        jitter = torch.rand(())
        self.drawn.append(float(jitter))
        return x + jitter, y


@pytest.mark.parametrize("reproducible", [False, True])
def test_augmentation_is_seeded_per_frame_from_the_csprng(reproducible, monkeypatch):
    """Not reproducible: torch's global generator is seeded from the CSPRNG before every frame and before the
    forward, so the same global seed outside gives other augmentations; reproducible: the caller's seed decides
    (the contrast shows the check can fail)."""
    seeds: list[int] = []
    original = SecureRandom.seeds
    monkeypatch.setattr(SecureRandom, "seeds", lambda self, n: (seeds.append(n), original(self, n))[1])
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4))
        ds = _Augmented()
        trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ds, _data()[1],
                                 units_per_batch=8, frames_per_unit=2, noise_multiplier=1.0, max_grad_norm=1.0,
                                 seed=3, declared_units=8, reproducible=reproducible)
        torch.manual_seed(0)
        trainer.step([0, 1, 2], _loss)
        runs.append(ds.drawn)
    assert len(runs[0]) == 6
    if reproducible:
        assert runs[0] == runs[1] and seeds == []
    else:
        assert set(runs[0]).isdisjoint(runs[1]) and seeds == [7, 7]   # 6 frames + the forward, per step


def test_gaussian_noise_in_passes_is_still_iid(monkeypatch):
    """More coordinates than one pass of the stream's buffers: every coordinate drawn once, the passes' noise
    unrelated (a pass reusing its predecessor's numbers would correlate them)."""
    import privacy.secure_random

    monkeypatch.setattr(privacy.secure_random, "_PAIRS_PER_PASS", 1000)   # 500 coordinates a pass, at four draws
    noise = gaussian_noise(2.0, torch.zeros(25, 999), SecureRandom(), True).flatten()
    assert float(noise.std()) == pytest.approx(2.0, rel=5 * math.sqrt(1 / (2 * noise.numel())))
    first, second = noise[:500], noise[500:1000]
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.23   # 5 sd at n = 500
    assert int((noise == 0).sum()) == 0
    ones = SecureRandom().normal(4001)   # one draw a value: passes of 2000, the last one an odd count
    assert ones.shape == (4001,) and bool(ones.isfinite().all()) and float(ones[-1]) != 0.0
    assert abs(float(torch.corrcoef(torch.stack([ones[:2000], ones[2000:4000]]))[0, 1])) < 0.12   # 5 sd at 2000


def test_one_draw_for_several_tensors_is_their_concatenation():
    """gaussian_noise_like: the noise of several references is one draw cut in their order, each shaped, typed
    and placed like its reference; mixed dtypes are drawn in float64 and rounded once to each."""
    key = bytes(range(32))
    refs = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 2, 2)]
    noise = gaussian_noise_like(0.7, refs, SecureRandom(_key=key), True)
    assert [n.shape for n in noise] == [r.shape for r in refs] and all(n.dtype == torch.float32 for n in noise)
    whole = gaussian_noise(0.7, torch.zeros(25), SecureRandom(_key=key), True)
    assert torch.equal(torch.cat([n.flatten() for n in noise]), whole)
    mixed = gaussian_noise_like(0.7, [torch.zeros(12, dtype=torch.float64), torch.zeros(13)], SecureRandom(_key=key),
                                True)
    as64 = gaussian_noise(0.7, torch.zeros(25, dtype=torch.float64), SecureRandom(_key=key), True)
    assert mixed[0].dtype == torch.float64 and mixed[1].dtype == torch.float32
    assert torch.equal(mixed[0], as64[:12]) and torch.equal(mixed[1], as64[12:].to(torch.float32))
    assert torch.equal(whole, as64.to(torch.float32))


@pytest.mark.parametrize("clipping", ["per-sample", "ghost"])
def test_the_trainer_says_where_each_source_draws_from(clipping):
    """``randomness_sources`` reads the objects a step uses: every source a CSPRNG stream by default, every one a
    seeded torch generator (the transform's left to the caller) when reproducible, and a stream swapped for a
    torch generator afterwards shows up (what the canary audit checks before it trains)."""
    secure = _trainer(clipping)
    assert secure.randomness_sources() == {"unit-sampling": "csprng", "frame-choice": "csprng", "noise": "csprng",
                                           "transform-seeds": "csprng"}
    assert _trainer(clipping, reproducible=True).randomness_sources() == {
        "unit-sampling": "torch", "frame-choice": "torch", "noise": "torch", "transform-seeds": "caller"}
    secure.optimizer.generator = torch.Generator()
    assert secure.randomness_sources()["noise"] == "torch"
    secure.optimizer.generator = None     # Opacus would then draw from torch's global generator
    assert secure.randomness_sources()["noise"] == "NoneType"
