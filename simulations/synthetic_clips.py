"""In-memory synthetic expression clips for the clip models' tests and central references.

Each clip is one synthetic student (the classroom's identities, expression styles and cameras,
`simulations.synth`) going from the resting face to the apex of one expression over 16 frames
(`synth._clip_frames`: onset, smooth ramp, slight head drift, an occasional blink), drawn by
`simulations.faces` and sub-sampled to T frames. Labels are balanced over FER7.

The federation reads clips from the school folders (`clips.csv`, `clips/<clip_id>/frame_NN.png`); this
module only saves the tests and `simulations.bench.central_clips` a disk round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared_models.labels import FER7
from simulations import faces as F
from simulations import synth


@dataclass(frozen=True)
class Clips:
    """uint8 clips (N, T, S, S, 3), int labels (N,), the student of each clip (N,)."""

    frames: np.ndarray
    labels: np.ndarray
    student_ids: list[str]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x: float (N, 3, T, S, S) in [-1, 1], y: long (N,)) as the clip models read them."""
        x = torch.from_numpy(self.frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        return x, torch.from_numpy(self.labels).long()


def make_clips(students: int, clips_per_student: int, size: int, frames: int, seed: int = 0,
               school: int = 0, first_student: int = 0) -> Clips:
    """Students first_student .. first_student + students - 1 of synthetic school `school`,
    `clips_per_student` onset -> apex clips each, `frames` frames (a divisor of 16) of `size` px.
    Deterministic in (seed, school, student); disjoint student ranges give disjoint identities."""
    if synth.CLIP_LENGTH % frames:
        raise ValueError(f"frames must divide {synth.CLIP_LENGTH}, got {frames}")
    params = synth.SynthParams(schools=school + 1, students_per_school=first_student + students,
                               image_size=size, seed=seed)
    profile = synth.school_profile(params, school)
    renderer = F.Renderer(size, seed=seed)
    step = synth.CLIP_LENGTH // frames
    out, labels, ids = [], [], []
    for j in range(first_student, first_student + students):
        st = synth.student(params, school, j, profile)
        rng = np.random.default_rng(np.random.SeedSequence([seed, school, j, 7]))
        background = F.draw_background(st.background, renderer.canvas)
        for _ in range(clips_per_student):
            label = int(rng.integers(len(FER7)))
            clip = synth._clip_frames(FER7[label], st.style, st.camera, rng)[step - 1::step]
            images, _ = renderer.render_batch(st.identity, clip, rng, background)
            out.append(images)
            labels.append(label)
            ids.append(st.student_id)
    return Clips(np.stack(out), np.asarray(labels, dtype=np.int64), ids)
