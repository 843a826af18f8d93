"""A lesson straight from its frames to what the report needs, without writing crops to disk.

`fedfer classroom report` on a frame folder or a video: the frames are analysed (`analyse_lesson`, in
worker processes for a folder), every face's seed-004 crop is classified in memory in batches as the
samples arrive, and only the states and the labels are kept: the same `Lesson` and labels
`fedfer classroom ingest` + `load_lesson` + `classify_lesson` give, minus the images/ folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from client.classroom import indicators as ind
from client.classroom.analyse import analyse_lesson
from client.classroom.report import Classifier, Lesson
from client.classroom.tracks import IouTracker, Seat


class _Labels:
    """Crops waiting for the classifier, and the labels it gave: unit -> {step: FER7 index}."""

    def __init__(self, classify: Classifier, batch: int) -> None:
        self.classify, self.batch = classify, batch
        self.pending: list[tuple[str, int, np.ndarray]] = []
        self.labels: dict[str, dict[int, int]] = {}

    def add(self, unit: str, step: int, crop: np.ndarray) -> None:
        self.pending.append((unit, step, crop))
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        found = np.asarray(self.classify(np.stack([crop for _, _, crop in self.pending]))).tolist()
        for (unit, step, _), label in zip(self.pending, found):
            self.labels.setdefault(unit, {})[step] = int(label)
        self.pending = []


def lesson_from_source(source: Path, *, seats: list[Seat] | None, empty: np.ndarray | None, size: int,
                       classify: Classifier, fps: float = 1.0, workers: int = 1, batch: int = 256,
                       warn: Callable[[str], None] = print) -> tuple[Lesson, dict[str, np.ndarray]]:
    """(the lesson, unit -> FER7 index per step) from frames or a video; units are the seat map's students,
    or anonymous face tracks without one (as `ingest` makes them)."""
    rows: dict[str, list[tuple[int, str]]] = {s.student_id: [] for s in seats} if seats is not None else {}
    faces_per_step: dict[int, int] = {}
    labels = _Labels(classify, batch)
    tracker = IouTracker()
    last_step = -1
    digests: dict[int, str] = {}
    for sample in analyse_lesson(Path(source), seats=seats, empty=empty, size=size, fps=fps, workers=workers, warn=warn):
        last_step = sample.step
        digests[sample.step] = sample.digest
        faces_per_step[sample.step] = len(sample.faces)
        if seats is None:
            crops = {id(face): crop for _, face, crop in sample.faces}
            named = [(unit, face, crops[id(face)])
                     for unit, face in tracker.update(sample.step, [f for _, f, _ in sample.faces]).items()]
        else:
            named = [(str(unit), face, crop) for unit, face, crop in sample.faces]
        for unit, _, crop in named:
            rows.setdefault(unit, []).append((sample.step, "face"))
            labels.add(unit, sample.step, crop)
        for unit, state in sample.states:
            rows[unit].append((sample.step, state))
    labels.flush()
    steps = last_step + 1
    lesson = Lesson(Path(source), fps, steps, seats is not None, empty is not None, list(rows), {}, {},
                    np.zeros(steps, np.int64), [digests.get(step, "") for step in range(steps)])
    for step, count in faces_per_step.items():
        lesson.faces_per_step[step] = count
    out = {}
    for unit, unit_rows in rows.items():
        lesson.states[unit] = [""] * steps
        for step, state in unit_rows:
            lesson.states[unit][step] = state
        out[unit] = np.full(steps, ind.NO_LABEL, np.int64)
        for step, label in labels.labels.get(unit, {}).items():
            out[unit][step] = label
    return lesson, out
