"""The DP engine: THE one rule for q, steps and σ, and the DP-SGD trainer that follows it.

Everything that decides how a school's round is protected lives here, so the sampling the code does is
the sampling the accountant records, and the planner, the ClientApp and the harnesses cannot disagree.

The rule (:func:`sampling`, :func:`plan_round`):
  * q = expected units per step / the school's DECLARED size (a public number from its policy, e.g. a
    size bucket), never its exact count. Poisson subsampling's guarantee depends on q alone; the true
    count only moves the realised batch size, which never leaves the school.
  * steps per local epoch = round(1 / q); steps per round = local epochs × that. Empty Poisson batches
    still take a (noise-only) step, so the number of steps is a function of public values.
  * σ is calibrated from (target ε, δ, q, steps × rounds), or fixed by the caller.

The trainer (:class:`PrivateTrainer`, privacy unit ``student``): each step
  1. samples units by Poisson sampling at rate q over the units the school actually has (over the *units*,
     not the frames: :class:`PoissonUnits`, Opacus' ``UniformWithReplacementSampler`` rule on the CSPRNG);
  2. draws ``frames_per_unit`` of each sampled unit's frames (without replacement; all of them if it
     has fewer);
  3. computes each unit's gradient — the gradient of the sum of its frames' losses — and clips it to
     ``max_grad_norm`` C, by one of two exact paths (``clipping``, config ``privacy.clipping``):
       * ``per-sample``: per-frame gradients from Opacus' ``GradSampleModule``, summed per unit, clipped
         by Opacus ``DPOptimizer`` (whose clipping operates on whatever rows ``p.grad_sample`` holds:
         here one row per unit);
       * ``ghost`` (book-keeping with per-layer ghost norms, privacy/student_clipping.py): the units'
         norms without per-frame gradients where a norm is cheaper, then the clipped sum straight into
         ``p.grad``, taken by Opacus ``DPOptimizerFastGradientClipping``. ``auto`` (default) is ghost,
         or per-sample for a model with a layer ghost cannot take. Both give the same clipped sum
         (tests/test_student_clipping.py); only the time and memory differ.
     On both, a unit whose gradient is not finite (inf or NaN: a model overflowing on its frames)
     contributes zero, never a NaN sum;
  4. adds N(0, σ²C²) to the clipped sum and divides by the expected number of units q × declared size —
     a public constant (the same noise code on both paths: privacy/noise.py ``CSPRNGNoise``, in Opacus'
     ``secure_mode`` form, four draws per coordinate summed and halved).
One student changes at most one clipped row of one step's sum, so the sampled Gaussian mechanism at
(σ, q) per step is exactly what the accountant composes. ``image`` is the same code with every frame its
own unit (standard Opacus DP-SGD with Poisson sampling).

Randomness: by default every draw of a step comes from a cryptographically secure generator, AES-256 in
counter mode keyed from ``os.urandom`` (privacy/secure_random.py), one fresh stream per source per trainer: the
unit sampling, the frame choice and the noise, and the seeds of torch's CPU generator, which the frames'
transform (augmentation) and the forward (dropout) draw from and which takes no CSPRNG (re-seeded before every
frame and every forward: :meth:`PrivateTrainer._collate`). The amplification-by-sampling argument needs the
sample to be secret, and noise that anyone can regenerate or predict protects nothing: torch's generators are
Mersenne Twisters, whose state follows from 624 outputs, and torch keeps only 32 bits of a CPU generator's seed.
``reproducible=True`` uses torch generators seeded from ``seed`` instead (Opacus' own sampler and noise, bit for
bit) and leaves the global generator to the caller, for tests and experiments only. What the CSPRNG does not
cover: docs/privacy.md, "The random numbers".
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from privacy.noise import CSPRNGNoise
from privacy.secure_random import SecureRandom

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# Post-processing of a step's noised, scaled gradient (``p.grad`` of the trained parameters) before the
# optimizer uses it, e.g. privacy/public_subspace.py's projection. It may depend on public values only
# (the model, public data): then it is post-processing of the Gaussian mechanism and costs no privacy.
AfterNoise = Callable[[list[nn.Parameter]], None]
PRIVACY_UNITS = ("student", "image")


# ------------------------------------------------------------------------------------- the rule
def sampling(declared_units: int, units_per_batch: int) -> tuple[float, int]:
    """(q, steps per local epoch): q = min(1, units_per_batch / declared_units), steps = round(1/q).

    ``declared_units`` is the school's public declared size, not its exact count."""
    if declared_units < 1 or units_per_batch < 1:
        raise ValueError(f"need a declared size of at least one unit and a batch of at least one "
                         f"(got {declared_units} units, batch {units_per_batch})")
    q = min(1.0, units_per_batch / declared_units)
    return q, max(1, round(1 / q))


@dataclass(frozen=True)
class DPPlan:
    """What one round of DP training will do, fixed from public values before it runs."""

    unit: str               # student | image
    declared_units: int     # the public size q is taken from
    units_per_batch: int    # expected units per step (= q × declared_units)
    sample_rate: float      # Poisson rate over units: the q the accountant records
    steps: int              # DP steps this round
    noise_multiplier: float
    max_grad_norm: float
    frames_per_unit: int    # student unit: frames drawn per sampled student per step (1 for image)

    @property
    def steps_per_epoch(self) -> int:
        return sampling(self.declared_units, self.units_per_batch)[1]


def plan_round(*, unit: str, declared_units: int, units_per_batch: int, local_epochs: int, rounds: int,
               target_epsilon: float, delta: float, noise_multiplier: float, max_grad_norm: float,
               frames_per_unit: int = 1, accountant: str = "prv") -> DPPlan:
    """The round's q, steps and σ. σ = ``noise_multiplier`` if > 0, else calibrated so that
    ``rounds`` such rounds end at ``target_epsilon`` at ``delta``."""
    if unit not in PRIVACY_UNITS:
        raise ValueError(f"privacy unit must be one of {PRIVACY_UNITS}, got {unit!r}")
    if local_epochs < 1 or rounds < 1:
        raise ValueError(f"local epochs and rounds must be >= 1 (got {local_epochs}, {rounds})")
    batch = max(1, min(int(units_per_batch), int(declared_units)))
    q, per_epoch = sampling(int(declared_units), batch)
    steps = int(local_epochs) * per_epoch
    sigma = float(noise_multiplier)
    if sigma <= 0.0:
        from privacy.accounting import calibrate_noise  # cached: a school's plan is the same every round

        sigma = calibrate_noise(float(target_epsilon), float(delta), q, steps * int(rounds), accountant=accountant)
    return DPPlan(unit, int(declared_units), batch, q, steps, sigma, float(max_grad_norm),
                  int(frames_per_unit) if unit == "student" else 1)


def plan_from_config(cfg: Mapping[str, Any], declared_units: int, *, delta: float | None = None, unit: str | None = None) -> DPPlan:
    """:func:`plan_round` with the run's training settings (``train.*``, ``privacy.*``, ``federation.rounds``)."""
    return plan_round(unit=str(unit or cfg["privacy.unit"]), declared_units=declared_units,
                      units_per_batch=int(cfg["train.batch_size"]), local_epochs=int(cfg["train.local_epochs"]),
                      rounds=int(cfg["federation.rounds"]), target_epsilon=float(cfg["privacy.target_epsilon"]),
                      delta=float(cfg["privacy.delta"] if delta is None else delta),
                      noise_multiplier=float(cfg["privacy.noise_multiplier"]),
                      max_grad_norm=float(cfg["privacy.max_grad_norm"]),
                      frames_per_unit=int(cfg["train.frames_per_student"]), accountant=str(cfg["privacy.accountant"]))


def _check_step_settings(units_per_batch: int, frames_per_unit: int, noise_multiplier: float,
                         max_grad_norm: float) -> None:
    if units_per_batch < 1:
        raise ValueError(f"units_per_batch must be >= 1, got {units_per_batch}")
    if frames_per_unit < 1:
        raise ValueError(f"frames_per_unit must be >= 1, got {frames_per_unit}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")


#: Opacus' ``secure_mode`` noise: each Gaussian coordinate is the sum of four draws, halved (Holohan et al. 2021,
#: n = 2), which closes the floating-point attacks on sampled Gaussians (Mironov 2012; Jin et al. 2022) at the
#: cost of four draws instead of one per coordinate per step. By default the draws come from an AES-256-CTR
#: stream (privacy/noise.py ``CSPRNGNoise``, privacy/secure_random.py), where Opacus would take torchcsprng's
#: generator (unmaintained).
SECURE_NOISE = True

#: Where a randomness source draws from: a CSPRNG stream (training), or a seeded torch generator (``reproducible``).
Randomness = torch.Generator | SecureRandom


def _randomness(seed: int | None, reproducible: bool, offset: int) -> Randomness:
    """A fresh AES-256-CTR stream keyed from the OS (privacy/secure_random.py), or, when ``reproducible`` (tests
    and experiments only), a torch generator seeded from ``seed`` and ``offset``."""
    if reproducible and seed is not None:
        g = torch.Generator()
        g.manual_seed(int(seed) * 1_000_003 + offset)
        return g
    return SecureRandom()


def _source_kind(draws: object) -> str:
    """``"csprng"`` for a :class:`SecureRandom` stream, ``"torch"`` for a torch generator, else the type's name
    (``"NoneType"``: a source with no generator of its own, e.g. a torch sampler on the global generator)."""
    if isinstance(draws, SecureRandom):
        return "csprng"
    if isinstance(draws, torch.Generator):
        return "torch"
    return type(draws).__name__


def dp_optimizer(optimizer: torch.optim.Optimizer, **kwargs: Any) -> torch.optim.Optimizer:
    """Opacus' ``DPOptimizer`` (the per-sample path's clipping, noise and scaling) with :class:`CSPRNGNoise`."""
    return _dp_optimizer_class()(optimizer, **kwargs)


@functools.cache
def _dp_optimizer_class() -> type:
    """Defined on first use: importing Opacus is left to the paths that use it."""
    from opacus.optimizers import DPOptimizer

    class CSPRNGDPOptimizer(CSPRNGNoise, DPOptimizer):
        pass

    return CSPRNGDPOptimizer


class PoissonUnits:
    """Poisson sampling of units from a CSPRNG stream: ``steps`` batches, each unit in each independently with
    probability ``sample_rate`` — the rule of Opacus' ``UniformWithReplacementSampler`` (which draws
    ``torch.rand(n) < q`` from a torch generator), with 53-bit uniforms from ``stream``."""

    def __init__(self, num_units: int, sample_rate: float, steps: int, stream: SecureRandom) -> None:
        self.num_units, self.sample_rate, self.steps, self.stream = num_units, sample_rate, steps, stream

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.stream.bernoulli(self.num_units, self.sample_rate).nonzero().flatten().tolist()


class PrivateTrainer:
    """DP-SGD over privacy units. See the module docstring for what one step does.

    ``frames`` yields ``(tensor, label)``; ``unit_ids`` holds one unit id per frame (the student id),
    or None for unit ``image``. ``units_per_batch`` is the *expected* number of units per step out of
    ``declared_units`` (the public size): q = units_per_batch / declared_units (:func:`sampling`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, frames: Dataset,
                 unit_ids: Sequence[str] | None, units_per_batch: int, frames_per_unit: int,
                 noise_multiplier: float, max_grad_norm: float, seed: int | None = None, *,
                 declared_units: int, reproducible: bool = False, grad_sample_mode: str = "hooks",
                 clipping: str = "auto", after_noise: AfterNoise | None = None) -> None:
        n_frames = len(frames)  # type: ignore[arg-type]
        if n_frames == 0:
            raise ValueError("the school has no training frames")
        unit_ids = self._unit_of_each_frame(unit_ids, n_frames)
        _check_step_settings(units_per_batch, frames_per_unit, noise_multiplier, max_grad_norm)
        self._group_frames_by_unit(unit_ids)
        if units_per_batch > declared_units:
            warnings.warn(f"units_per_batch {units_per_batch} exceeds the {declared_units} declared "
                          f"{self.privacy_unit}s; every unit is sampled every step (q = 1)", stacklevel=2)
        self.declared_units = int(declared_units)
        self.sample_rate, self.steps_per_epoch = sampling(self.declared_units, units_per_batch)
        # the normaliser of the noisy sum: public (q × declared size), never the realised batch or true count
        self.expected_units = self.sample_rate * self.declared_units
        self.frames_per_unit = frames_per_unit if self.privacy_unit == "student" else 1
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.frames = frames
        if reproducible and seed is None:
            raise ValueError("reproducible=True needs a seed")
        self.after_noise = after_noise
        self._attach_opacus(model, optimizer, seed, reproducible, grad_sample_mode, clipping)
        self.steps_done = 0

    def _unit_of_each_frame(self, unit_ids: Sequence[str] | None, n_frames: int) -> Sequence[str]:
        """One unit id per frame; unit ``image`` when none are given (every frame its own unit)."""
        if unit_ids is None:
            self.privacy_unit = "image"
            return [str(i) for i in range(n_frames)]
        self.privacy_unit = "student"
        if len(unit_ids) != n_frames:
            raise ValueError(f"unit_ids has {len(unit_ids)} entries for {n_frames} frames (one per frame needed)")
        return unit_ids

    def _group_frames_by_unit(self, unit_ids: Sequence[str]) -> None:
        """Each unit's frame indices, units numbered in order of first appearance."""
        index: dict[str, int] = {}
        members: list[list[int]] = []
        for frame, uid in enumerate(unit_ids):
            u = index.setdefault(str(uid), len(index))
            if u == len(members):
                members.append([])
            members[u].append(frame)
        self._members = [torch.tensor(m, dtype=torch.long) for m in members]
        self.num_units = len(members)

    def _attach_opacus(self, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int | None,
                       reproducible: bool, grad_sample_mode: str, clipping: str) -> None:
        """The frame-choice stream, the Poisson unit sampler, the clipping path and the noisy optimizer. Each
        randomness source has its own stream: a CSPRNG keyed afresh (privacy/secure_random.py), or with
        ``reproducible`` a torch generator seeded from ``seed`` (offsets 1, 2, 3) and Opacus' own sampler."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        from privacy.student_clipping import CLIPPING_MODES

        if clipping not in CLIPPING_MODES:
            raise ValueError(f"privacy.clipping must be one of {', '.join(CLIPPING_MODES)}, got {clipping!r}")
        self._frame_gen = _randomness(seed, reproducible, 1)
        units = _randomness(seed, reproducible, 2)
        self._sampler: PoissonUnits | UniformWithReplacementSampler
        if isinstance(units, SecureRandom):
            self._sampler = PoissonUnits(self.num_units, self.sample_rate, self.steps_per_epoch, units)
        else:
            self._sampler = UniformWithReplacementSampler(num_samples=self.num_units, sample_rate=self.sample_rate,
                                                          generator=units, steps=self.steps_per_epoch)
        self.model = model
        model.train()
        self._base_optimizer, self._noise_generator = optimizer, _randomness(seed, reproducible, 3)
        # seeds torch's CPU generator for each frame's transform and each forward (see _collate)
        self._torch_seeds = None if reproducible else SecureRandom()
        self._grad_sample_mode, self.clipper = grad_sample_mode, None
        if clipping != "per-sample" and grad_sample_mode == "hooks":
            self._attach_book_keeping(model, required=clipping == "ghost")
        if self.clipper is None:
            self._attach_per_sample(model)

    def _attach_per_sample(self, model: nn.Module) -> None:
        """Opacus per-sample gradients (GradSampleModule) summed per unit, clipped by DPOptimizer."""
        from opacus import GradSampleModule

        self.clipping = "per-sample"
        self.private_model = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True,
                                              force_functorch=self._grad_sample_mode == "functorch")
        self.optimizer = dp_optimizer(self._base_optimizer, noise_multiplier=self.noise_multiplier,
                                      max_grad_norm=self.max_grad_norm, expected_batch_size=self.expected_units,
                                      loss_reduction="mean", generator=self._noise_generator,
                                      secure_mode=SECURE_NOISE)
        self._hook_after_noise()

    def _hook_after_noise(self) -> None:
        """Opacus calls a step hook after adding the noise and scaling, before the step (skipped steps: never)."""
        if self.after_noise is not None:
            after_noise = self.after_noise
            self.optimizer.attach_step_hook(lambda _optimizer: after_noise(self._params()))

    def _attach_book_keeping(self, model: nn.Module, required: bool) -> None:
        """privacy/student_clipping.py computes the clipped sum into p.grad; Opacus'
        DPOptimizerFastGradientClipping (``clipped_sum_optimizer``: minus a deep copy per parameter) adds the
        same noise, scales and steps. ``required`` False (auto): a model it cannot handle falls back to
        per-sample clipping."""
        from privacy.student_clipping import StudentClipper, UnsupportedModel, clipped_sum_optimizer

        try:
            self.clipper = StudentClipper(model)
        except UnsupportedModel:
            if required:
                raise
            return
        self.clipping = "ghost"
        self.private_model = model
        self.optimizer = clipped_sum_optimizer(
            self._base_optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_units, loss_reduction="mean", generator=self._noise_generator,
            secure_mode=SECURE_NOISE)
        self._hook_after_noise()

    # ------------------------------------------------------------------------------------------
    def _frames_of(self, units: list[int]) -> tuple[list[int], list[int]]:
        """Frame indices for the sampled units, and for each frame its row (0..len(units)-1)."""
        frame_idx: list[int] = []
        row_of_frame: list[int] = []
        for row, u in enumerate(units):
            members = self._members[u]
            if len(members) > self.frames_per_unit:
                order = (self._frame_gen.randperm(len(members)) if isinstance(self._frame_gen, SecureRandom)
                         else torch.randperm(len(members), generator=self._frame_gen))
                pick = order[: self.frames_per_unit]
                chosen = members[pick].tolist()
            else:
                chosen = members.tolist()
            frame_idx.extend(chosen)
            row_of_frame.extend([row] * len(chosen))
        return frame_idx, row_of_frame

    def _collate(self, frame_idx: list[int]) -> Any:
        """The frames through their transform, as one batch. The transform's augmentation and the forward's
        dropout draw from torch's global CPU generator, which takes no CSPRNG; unless ``reproducible``, it is
        seeded from the CSPRNG before each frame and once more before the forward. So each frame's augmentation
        is its own (a student's presence does not shift other frames' draws) and no draw follows from another
        one or from a seed outside the trainer; the reproducible path leaves the generator to the caller."""
        if self._torch_seeds is None:
            return default_collate([self.frames[i] for i in frame_idx])
        seeds = self._torch_seeds.seeds(len(frame_idx) + 1)
        cpu = torch.default_generator
        batch = []
        for i, s in zip(frame_idx, seeds):
            cpu.manual_seed(s)
            batch.append(self.frames[i])
        cpu.manual_seed(seeds[-1])
        return default_collate(batch)

    def randomness_sources(self) -> dict[str, str]:
        """Where each randomness source of a step draws from, as it is wired now: ``"csprng"`` (a
        :class:`SecureRandom` stream, how a school trains) or ``"torch"`` (a seeded torch generator, the
        ``reproducible`` path); ``transform-seeds`` is ``"caller"`` when the trainer leaves torch's global
        generator to the caller. Read from the objects the step uses (the sampler's stream, the optimizer's
        generator), so an audit can refuse a trainer that would silently draw from elsewhere."""
        sampler_draws = getattr(self._sampler, "stream", None)
        if sampler_draws is None:   # Opacus' UniformWithReplacementSampler keeps its torch generator here
            sampler_draws = getattr(self._sampler, "generator", None)
        return {"unit-sampling": _source_kind(sampler_draws),
                "frame-choice": _source_kind(self._frame_gen),
                "noise": _source_kind(getattr(self.optimizer, "generator", None)),
                "transform-seeds": "caller" if self._torch_seeds is None else _source_kind(self._torch_seeds)}

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.optimizer.params if p.requires_grad]

    def step(self, units: list[int], loss_fn: LossFn) -> tuple[float, int]:
        """One DP step on the given unit indices. Returns (sum of frame losses, frames used)."""
        from privacy.student_clipping import UnsupportedModel

        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, n_frames = 0.0, 0
        if units:
            frame_idx, rows = self._frames_of(units)
            x, y = self._collate(frame_idx)
            row_index = torch.tensor(rows, dtype=torch.long)
            try:
                losses = self._clipped_sum(loss_fn, x, y, row_index, len(units))
            except UnsupportedModel:   # auto: a layer the book-keeping path cannot take; nothing applied yet
                if self.clipper is None:
                    raise
                self.clipper.close()
                self.clipper = None
                self._attach_per_sample(self.model)
                self.optimizer.zero_grad(set_to_none=True)
                losses = self._clipped_sum(loss_fn, x, y, row_index, len(units))
            loss_sum, n_frames = float(losses.detach().sum()), len(frame_idx)
        else:
            for p in self._params():  # empty Poisson batch: clipped sum is zero, the step adds noise only
                if self.clipper is None:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                else:
                    p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return loss_sum, n_frames

    def _losses(self, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = loss_fn(self.private_model, x, y)
        if not isinstance(losses, torch.Tensor) or losses.shape != (len(x),):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return one loss per frame, shape ({len(x)},); got {got}")
        return losses

    def _clipped_sum(self, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, row_index: torch.Tensor,
                     n_units: int) -> torch.Tensor:
        """Forward and backward; leaves what the optimizer clips (per-sample path: one ``grad_sample`` row per
        unit) or has clipped (book-keeping path: ``p.grad`` = the clipped sum). Returns the frame losses."""
        if self.clipper is not None:
            with self.clipper.capture():
                losses = self._losses(loss_fn, x, y)
            # the optimizer's bound, read at each step like DPOptimizer's own clipping does
            self.clipper.clip_and_sum(losses, row_index, n_units, float(self.optimizer.max_grad_norm))
            for p in self._params():   # an optimised parameter the model did not use: zero for every unit
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return losses
        losses = self._losses(loss_fn, x, y)
        losses.sum().backward()
        for p in self._params():
            gs = p.grad_sample
            if gs is None:  # parameter not used in this forward: zero gradient for every unit
                p.grad_sample = torch.zeros((n_units, *p.shape), dtype=p.dtype)
                continue
            if isinstance(gs, list):
                gs = torch.cat(gs, dim=0)
            # the unit's gradient = sum of its frames' gradients (then clipped per unit by DPOptimizer)
            p.grad_sample = torch.zeros((n_units, *gs.shape[1:]), dtype=gs.dtype).index_add_(0, row_index, gs)
        self._zero_non_finite_units(n_units)
        return losses

    def _zero_non_finite_units(self, n_units: int) -> None:
        """A unit whose gradient holds an inf or NaN (e.g. a crafted model overflowing on its frames) gets a
        zero row in every parameter: DPOptimizer's clipping cannot bound it (0 x inf is NaN), and one NaN in
        the clipped sum would make the release say the unit was sampled. Zero is a function of the unit's own
        frames, so its contribution stays bounded; the book-keeping path does the same (student_clipping.py)."""
        params = self._params()
        finite = torch.ones(n_units, dtype=torch.bool)
        for p in params:
            finite &= torch.isfinite(p.grad_sample.reshape(n_units, -1)).all(dim=1)
        if not bool(finite.all()):
            for p in params:
                p.grad_sample = torch.where(finite.view(-1, *[1] * (p.grad_sample.dim() - 1)), p.grad_sample, 0.0)

    def train_epoch(self, loss_fn: LossFn) -> dict:
        """``steps_per_epoch`` DP steps; each step's units are a fresh Poisson sample."""
        self.model.train()
        total_loss, total_frames, steps, units_seen, empty = 0.0, 0, 0, 0, 0
        for units in self._sampler:
            loss_sum, n = self.step(list(units), loss_fn)
            total_loss += loss_sum
            total_frames += n
            units_seen += len(units)
            empty += not units
            steps += 1
        return {"steps": steps, "loss": total_loss / max(total_frames, 1), "frames": total_frames,
                "units": units_seen, "empty_steps": empty}

    def close(self) -> None:
        """Detach the clipping hooks from ``model`` (call before evaluating or reusing it elsewhere)."""
        if self.clipper is not None:
            self.clipper.close()
        else:
            self.private_model._close()


# ------------------------------------------------------------------------------------- one round
@dataclass(frozen=True)
class DPResult:
    """What one private round actually ran: the accountant records exactly these."""

    unit: str
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    mean_loss: float        # un-noised training loss: for the school's own eyes, never sent


def train_private(model: nn.Module, frames: Dataset, unit_ids: Sequence[str] | None, plan: DPPlan,
                  optimizer: torch.optim.Optimizer, local_epochs: int, loss_fn: LossFn | None = None,
                  seed: int | None = None, reproducible: bool = False, clipping: str = "auto",
                  after_noise: AfterNoise | None = None) -> DPResult:
    """One round of DP-SGD following ``plan`` (``unit_ids`` None for unit image); returns the q and
    steps that ran. ``clipping`` picks how the clipped sum is computed (``privacy.clipping``; the
    mechanism, hence the privacy record, is the same for all). ``after_noise``: see :data:`AfterNoise`."""
    if loss_fn is None:
        from shared_models.training import per_sample_loss as loss_fn
    if (unit_ids is None) != (plan.unit == "image"):
        raise ValueError(f"plan is for unit {plan.unit!r} but unit ids were {'not ' if unit_ids is None else ''}given")
    trainer = PrivateTrainer(model, optimizer, frames, unit_ids, units_per_batch=plan.units_per_batch,
                             frames_per_unit=plan.frames_per_unit, noise_multiplier=plan.noise_multiplier,
                             max_grad_norm=plan.max_grad_norm, seed=seed, declared_units=plan.declared_units,
                             reproducible=reproducible, clipping=clipping, after_noise=after_noise)
    steps, losses = 0, []
    try:
        for _ in range(int(local_epochs)):
            stats = trainer.train_epoch(loss_fn)
            steps += int(stats["steps"])
            losses.append(float(stats["loss"]))
    finally:
        trainer.close()  # detach Opacus' hooks: the model is evaluated, sent or trained again afterwards
    return DPResult(unit=trainer.privacy_unit, sample_rate=trainer.sample_rate, steps=steps,
                    noise_multiplier=trainer.noise_multiplier, max_grad_norm=trainer.max_grad_norm,
                    mean_loss=sum(losses) / len(losses) if losses else math.nan)
