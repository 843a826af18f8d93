"""Deliberately broken copies of the student-level DP trainer, for proving the canary audit has power.

Each is the clients' trainer class with one bug planted through its public construction (or, for the
per-frame bug, its sampler), recording the same (σ, q) a correct trainer would, so its ledger claims
the privacy of the correct mechanism while it delivers less. None of this is shipped to schools; only
tests and benchmarks import it.

* ``per_frame_clipping``: students are sampled, but every frame is clipped on its own and the frames
  are summed unclipped — a student with f frames moves the sum by up to f·C.
* ``half_noise``: the optimizer adds noise at σ/2 while σ is recorded.
* ``no_clipping``: gradients are never clipped; the noise is still σ·C.
* ``sample_rate_recorded_low``: the trainer samples at q but records q/2.

The next three break only the CSPRNG path a school trains with (privacy/secure_random.py, privacy/noise.py,
``PoissonUnits``); with ``randomness="reproducible"`` (torch generators) each is the correct trainer, so an
audit on seeded torch generators cannot see them and one on the production randomness must:

* ``secure_half_noise``: the CSPRNG noise stream's normals have std 1/2, so the noise is σC/2 on both
  clipping paths while σ is recorded (as a wrong scale in the four-draw form would).
* ``secure_double_sample_rate``: the CSPRNG Poisson sampler takes each unit at 2q (at most 1) while q
  is recorded. At q = 1 (the audit's default) this changes nothing: audit it at q ≤ 1/2.
* ``secure_no_noise_per_sample``: the per-sample clipping path (Opacus' ``DPOptimizer``, taken by models the
  book-keeping path cannot handle) adds no noise when its generator is a CSPRNG stream; the book-keeping path
  is untouched. Audit it with ``clipping="per-sample"``.
"""

from __future__ import annotations

import types
from typing import Callable

from privacy.canary_audit import build_private_trainer
from privacy.engine import PoissonUnits
from privacy.secure_random import SecureRandom

MUTATIONS = ("per_frame_clipping", "half_noise", "no_clipping", "sample_rate_recorded_low")


def correct_trainer(model, optimizer, frames, unit_ids, **kw):
    return build_private_trainer(model, optimizer, frames, unit_ids, **kw)


def half_noise_trainer(model, optimizer, frames, unit_ids, **kw):
    trainer = correct_trainer(model, optimizer, frames, unit_ids, **kw)
    trainer.optimizer.noise_multiplier = trainer.noise_multiplier / 2  # recorded σ stays
    return trainer


def no_clipping_trainer(model, optimizer, frames, unit_ids, **kw):
    trainer = correct_trainer(model, optimizer, frames, unit_ids, **kw)
    # Opacus clips at max_grad_norm and adds noise of std noise_multiplier·max_grad_norm: a huge clip
    # norm with the multiplier scaled down keeps the noise at σ·C and never clips
    blow_up = 1e6
    trainer.optimizer.max_grad_norm = trainer.max_grad_norm * blow_up
    trainer.optimizer.noise_multiplier = trainer.noise_multiplier / blow_up
    return trainer


def sample_rate_recorded_low_trainer(model, optimizer, frames, unit_ids, **kw):
    trainer = correct_trainer(model, optimizer, frames, unit_ids, **kw)
    trainer.sample_rate = trainer.sample_rate / 2
    return trainer


class _HalfScaleNormals(SecureRandom):
    """An AES-256-CTR stream like any other, whose normals are scaled by 1/2 (std 1/2): the planted bug. Every
    normal draw (``normal`` too) goes through ``normal_sums_into``, the one the noise calls."""

    def normal_sums_into(self, out, terms: int = 1, scale: float = 1.0):
        return super().normal_sums_into(out, terms, scale * 0.5)


def secure_half_noise_trainer(model, optimizer, frames, unit_ids, **kw):
    trainer = correct_trainer(model, optimizer, frames, unit_ids, **kw)
    if isinstance(trainer.optimizer.generator, SecureRandom):   # the seeded torch path stays correct
        # both: the optimizer's stream, and the one a fallback to per-sample clipping would be built with
        trainer.optimizer.generator = trainer._noise_generator = _HalfScaleNormals()
    return trainer


def secure_double_sample_rate_trainer(model, optimizer, frames, unit_ids, **kw):
    trainer = correct_trainer(model, optimizer, frames, unit_ids, **kw)
    sampler = trainer._sampler
    if isinstance(sampler, PoissonUnits):   # the CSPRNG sampler; Opacus' seeded sampler stays correct
        trainer._sampler = PoissonUnits(sampler.num_units, min(1.0, 2 * sampler.sample_rate), sampler.steps,
                                        sampler.stream)
    return trainer   # trainer.sample_rate, the recorded q, stays


def secure_no_noise_per_sample_trainer(model, optimizer, frames, unit_ids, **kw):
    trainer = correct_trainer(model, optimizer, frames, unit_ids, **kw)
    opt = trainer.optimizer
    if trainer.clipping == "per-sample" and isinstance(opt.generator, SecureRandom):
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        def add_no_noise(self) -> None:   # the clipped sum goes out as it is; σ is still recorded
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                p.grad = p.summed_grad.view_as(p)
                _mark_as_processed(p.summed_grad)

        opt.add_noise = types.MethodType(add_no_noise, opt)
    return trainer


def per_frame_clipping_trainer(model, optimizer, frames, unit_ids, *, units_per_batch, frames_per_unit,
                               declared_units, **kw):
    """Every frame its own clipping row, while sampling (and the record) stay per student."""
    import torch
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from privacy.engine import sampling

    students: dict[str, list[int]] = {}
    for frame, uid in enumerate(unit_ids):
        students.setdefault(str(uid), []).append(frame)
    frame_units = [f"{uid}#{frame}" for frame, uid in enumerate(unit_ids)]
    trainer = correct_trainer(model, optimizer, frames, frame_units, units_per_batch=units_per_batch,
                              frames_per_unit=1, declared_units=len(frame_units), **kw)
    q, per_epoch = sampling(declared_units, units_per_batch)
    members = list(students.values())  # frame unit index == frame index (one unit per frame, in order)
    student_sampler: PoissonUnits | UniformWithReplacementSampler
    if kw.get("randomness", "secure") == "secure":   # students sampled from the CSPRNG, as the trainer's own
        student_sampler = PoissonUnits(len(members), q, per_epoch, SecureRandom())
    else:
        generator = torch.Generator().manual_seed(int(kw.get("seed") or 0) + 17)
        student_sampler = UniformWithReplacementSampler(num_samples=len(members), sample_rate=q, generator=generator,
                                                        steps=per_epoch)

    class FramesOfSampledStudents:
        # where the student sample draws from, for PrivateTrainer.randomness_sources
        stream = getattr(student_sampler, "stream", None)
        generator = getattr(student_sampler, "generator", None)

        def __iter__(self):
            for batch in student_sampler:
                yield [frame for s in batch for frame in members[int(s)][:frames_per_unit]]

    trainer._sampler = FramesOfSampledStudents()
    trainer.sample_rate, trainer.steps_per_epoch = q, per_epoch
    return trainer


FACTORIES: dict[str, Callable] = {
    "correct": correct_trainer,
    "per_frame_clipping": per_frame_clipping_trainer,
    "half_noise": half_noise_trainer,
    "no_clipping": no_clipping_trainer,
    "sample_rate_recorded_low": sample_rate_recorded_low_trainer,
    "secure_half_noise": secure_half_noise_trainer,
    "secure_double_sample_rate": secure_double_sample_rate_trainer,
    "secure_no_noise_per_sample": secure_no_noise_per_sample_trainer,
}
