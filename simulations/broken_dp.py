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
"""

from __future__ import annotations

from typing import Callable

from privacy.canary_audit import build_private_trainer

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
    generator = torch.Generator().manual_seed(int(kw.get("seed") or 0) + 17)
    student_sampler = UniformWithReplacementSampler(num_samples=len(members), sample_rate=q, generator=generator,
                                                    steps=per_epoch)

    class FramesOfSampledStudents:
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
}
