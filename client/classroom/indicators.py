"""The learning-status indicators of seed 001 (section C, "online learning status assessment"),
computed from one student's samples at a fixed rate.

- focus: faces are checked in 10-second windows; a student whose face is detected in less than half
  of a window's samples (undetected more than half the time) is *inattentive* in that window;
- difficulty: 30 detections in a row showing anger or distress mean the topic is hard for the student;
  fedfer reads "distress" as the FER7 classes sad and fear (`DIFFICULTY_CLASSES`). Samples without a
  detected face neither extend nor break a run (they are not detections); a detection of any other
  class breaks it. A run triggers once, at its 30th detection;
- engagement: the share of detections showing happy or surprise;
- involvement: the share of the time the head is bowed; more than 50 % means a *passive* learner.
  The time counted is the time the student is in the seat (an absent student is not passive).

Everything here is plain numpy on arrays the caller built; nothing reads images or leaves the school.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared_models.labels import FER7

FOCUS_WINDOW_SECONDS = 10.0
DIFFICULTY_RUN = 30
DIFFICULTY_CLASSES = ("angry", "sad", "fear")
ENGAGED_CLASSES = ("happy", "surprise")
PASSIVE_SHARE = 0.5

NO_LABEL = -1           # a sample without a classified face


def window_size(fps: float, seconds: float = FOCUS_WINDOW_SECONDS) -> int:
    """Samples in a focus window at `fps` (at least one)."""
    return max(1, int(round(seconds * fps)))


def windows(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) windows of `size` samples covering 0..n (the last one may be short)."""
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def inattentive(detected: np.ndarray, size: int) -> np.ndarray:
    """Per window of `size` samples: True when the face was detected in less than half of the window's samples."""
    detected = np.asarray(detected, bool)
    return np.array([2 * int(detected[a:b].sum()) < (b - a) for a, b in windows(len(detected), size)], bool)


def difficulty_triggers(labels: np.ndarray, run: int = DIFFICULTY_RUN) -> list[int]:
    """Sample indices where a run of `run` consecutive distress detections completes.

    `labels` holds FER7 indices per sample, NO_LABEL where no face was detected (skipped)."""
    hard = {FER7.index(name) for name in DIFFICULTY_CLASSES}
    out: list[int] = []
    count = 0
    for i, label in enumerate(np.asarray(labels, np.int64).tolist()):
        if label == NO_LABEL:
            continue
        if label in hard:
            count += 1
            if count == run:
                out.append(i)
        else:
            count = 0
    return out


def engagement(labels: np.ndarray) -> float:
    """Share of detections (labels other than NO_LABEL) that are happy or surprise; NaN without detections."""
    labels = np.asarray(labels, np.int64)
    seen = labels[labels != NO_LABEL]
    if seen.size == 0:
        return float("nan")
    engaged = np.isin(seen, [FER7.index(name) for name in ENGAGED_CLASSES])
    return float(engaged.mean())


def bowed_share(bowed: np.ndarray, present: np.ndarray) -> float:
    """Share of the present samples with the head bowed; NaN if the student was never present."""
    present = np.asarray(present, bool)
    if not present.any():
        return float("nan")
    return float(np.asarray(bowed, bool)[present].mean())


def passive(bowed: np.ndarray, present: np.ndarray) -> bool:
    """Seed 001's passive learner: head bowed more than half of the time in the seat."""
    share = bowed_share(bowed, present)
    return bool(share == share and share > PASSIVE_SHARE)


@dataclass
class StudentSeries:
    """One student's samples over a lesson (all arrays of the same length, one entry per sample)."""

    student: str
    detected: np.ndarray        # bool: a frontal face was found
    present: np.ndarray         # bool: the student is in the seat (detected, turned or bowed)
    bowed: np.ndarray           # bool: in the seat, head down (no frontal or profile face)
    labels: np.ndarray          # int: FER7 index of the classified face, NO_LABEL otherwise
