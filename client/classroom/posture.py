"""Is a detected face turned to the camera, or is the head bowed or turned? From where it sits in its seat.

The frontal cascade also fires on heads bowed over the desk and on heads turned to a neighbour. Seed 001
reads a face *detected* as attention (focus), bowed heads as passivity (involvement), and expressions
only from faces the camera sees (difficulty, engagement), so a bowed head found as a face would count
as attentive and not bowed, and lend its expression to the difficulty runs.

A real head pivots on the neck, not about its own face: bowing swings the eyes forward and down, turning
swings them sideways. Under a fixed camera the face therefore leaves the place it has in its seat while
the student looks at the board:

- bowed: the face's centre lies lower than the seat's *upright* height (the `UPRIGHT_QUANTILE` of the
  seat's recent face heights: image y grows downwards, so the upright head is the highest one; a low
  quantile, not the median, because a passive student spends most of the lesson bowed) by more than
  `BOW_DROP` face widths;
- turned: the face's centre lies sideways of the seat's median position by more than `TURN_SHIFT`
  face widths (turns go either way and are brief: the median is the face looking ahead).

The thresholds come from the head's geometry, not from the synthetic scenes: the eyes sit about 0.55
face widths in front of and 0.25 above the joint the head nods on (atlanto-occipital), so a bow of 0.30
rad (17 deg, the bow the ground truth calls bowed) drops them by 0.25 (1 - cos) + 0.55 sin = 0.17 face
widths; they sit about 0.6 face widths in front of the axis the head turns on, so a turn of 0.55 rad
(31 deg, the truth's "turned") moves them 0.6 sin = 0.31 face widths sideways. Each threshold is half of
that (the reference and the cascade's box jitter by a few hundredths of a face width). A forward lean of
the trunk, which real students add when they bow over a desk, only adds to the drop.

The references are per seat and running, in lesson order, over the seat's last `REFERENCE_DETECTIONS`
faces; `PostureFilter` runs on the merged samples in the main process (after the chunks come back from
the workers), so its result does not depend on how many workers there were. A face whose seat has fewer
than `MIN_REFERENCE` earlier faces is taken as it is.
"""

from __future__ import annotations

import numpy as np

from client.classroom.faces import Face

#: faces (per seat, most recent) the seat's reference position and face width are taken over
REFERENCE_DETECTIONS = 300
#: the seat's upright height: this quantile of the recent face centres' heights
UPRIGHT_QUANTILE = 0.2
#: a face lower than the upright height by more than this (face widths) is a bowed head (see the docstring)
BOW_DROP = 0.085
#: a face further sideways from the seat's median position than this (face widths) is a turned head
TURN_SHIFT = 0.15
#: earlier faces a seat needs before its reference is used
MIN_REFERENCE = 5


def _position(face: Face) -> tuple[float, float, float]:
    """(centre x, centre y, width) of the face's box: the box, not the eyes, as the eye cascade finds the
    eyes on some faces only (the others get the box's prior positions)."""
    x, y, w, h = face.box
    return x + w / 2.0, y + h / 2.0, float(w)


def _order_statistic(values: np.ndarray, share: float) -> float:
    """The value with `share` of the others below it (the lower one between two: no interpolation)."""
    k = int(share * (len(values) - 1))
    return float(np.partition(values, k)[k])


class SeatPosture:
    """One seat's running reference: its last `REFERENCE_DETECTIONS` faces' centres and widths."""

    def __init__(self) -> None:
        self._recent = np.zeros((3, REFERENCE_DETECTIONS))    # rows: centre x, centre y, width (a ring)
        self._count = 0

    def judge(self, face: Face) -> str:
        """'face' (turned to the camera), 'down' (bowed) or 'turned'; then the face joins the reference."""
        position = _position(face)
        state = "face"
        n = min(self._count, REFERENCE_DETECTIONS)
        if n >= MIN_REFERENCE:
            xs, ys, widths = self._recent[:, :n]
            width = _order_statistic(widths, 0.5)
            drop = (position[1] - _order_statistic(ys, UPRIGHT_QUANTILE)) / width
            shift = abs(position[0] - _order_statistic(xs, 0.5)) / width
            if drop > BOW_DROP:
                state = "down"
            elif shift > TURN_SHIFT:
                state = "turned"
        self._recent[:, self._count % REFERENCE_DETECTIONS] = position
        self._count += 1
        return state


class PostureFilter:
    """Per seat, in lesson order: faces of heads bowed or turned (`SeatPosture`) leave the sample's faces
    and become that seat's state ('down' or 'turned'), like a seat where no frontal face was found."""

    def __init__(self) -> None:
        self._seats: dict[str, SeatPosture] = {}

    def __call__(self, sample):  # type: ignore[no-untyped-def]
        """A `client.classroom.analyse.SampleResult`, changed in place and returned. Faces outside any
        seat (no seat map) are left alone: without a seat there is no place to compare with."""
        kept = []
        for unit, face, crop in sample.faces:
            if unit is None:
                kept.append((unit, face, crop))
                continue
            state = self._seats.setdefault(unit, SeatPosture()).judge(face)
            if state == "face":
                kept.append((unit, face, crop))
            else:
                sample.states.append((unit, state))
        sample.faces = kept
        return sample
