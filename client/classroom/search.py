"""Searching a lesson's seats sample after sample, reusing what the previous samples found.

A fixed camera at one frame per second sees each seated student's head move a little from one sample
to the next, keep its size, and an empty, bowed or turned seat stay much the same. `SeatSearch` keeps
per seat:

- the face box the previous sample found: the next search looks only around it (`FaceDetector._around`);
- the face width found there so far: full-seat searches look for faces of about that size;
- for a seat where no face was found, a small thumbnail of it: while the seat still looks the same
  (`STILL_DIFFERENCE`) it is not searched again (for at most `RECHECK_EVERY` samples), and its state
  (absent / turned / bowed) is carried over;
- whether the costly second pass (`FaceDetector._second_pass`) failed there in the previous sample: it
  then runs again only every `SECOND_PASS_EVERY` samples while the seat stays without a face.

All of it is what a real fixed camera allows as well; nothing depends on the synthetic scenes. A new
`SeatSearch` (a new lesson, or a new chunk of one) starts with no memory.
"""

from __future__ import annotations

import numpy as np

from client.classroom.faces import Face, FaceDetector

#: thumbnail side (pixels) a seat is reduced to before two samples of it are compared
THUMB = 16
#: a seat without a face whose thumbnail differs from the one of its last full search by less than this
#: (mean absolute grey difference, 0-255, after removing the mean: the room's light drifts) is not searched again
STILL_DIFFERENCE = 3.0
#: ... but at least every this many samples
RECHECK_EVERY = 5
#: a seat whose second pass found nothing gets the next one this many samples later (meanwhile the cheap
#: first search still runs every sample)
SECOND_PASS_EVERY = 2


def _thumb(gray: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    import cv2

    x0, y0, x1, y1 = box
    small = cv2.resize(gray[y0:y1, x0:x1], (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
    return small - small.mean()


class SeatSearch:
    """Per-seat search over consecutive samples of one camera (one lesson, or one chunk of it).
    Calling it with a frame gives one face or None per seat; `still[k]` then says whether seat k was
    skipped because it looked as it did when last searched (its previous state still holds)."""

    def __init__(self, detector: FaceDetector, seats: list[tuple[int, int, int, int]], reuse: bool = True) -> None:
        self.detector, self.seats, self.reuse = detector, seats, reuse
        n = len(seats)
        self._last: list[tuple[int, int, int, int] | None] = [None] * n
        self._empty: list[tuple[np.ndarray, int] | None] = [None] * n      # (thumbnail, samples skipped since)
        self._widths: list[float | None] = [None] * n
        self._since_second = [SECOND_PASS_EVERY] * n                         # samples since a failed second pass
        self.still = [False] * n
        self.skipped = 0

    def _is_still(self, k: int, thumb: np.ndarray) -> bool:
        empty = self._empty[k]
        if empty is None or empty[1] + 1 >= RECHECK_EVERY or empty[0].shape != thumb.shape:
            return False
        return float(np.abs(thumb - empty[0]).mean()) < STILL_DIFFERENCE

    def __call__(self, gray: np.ndarray) -> list[Face | None]:
        if not self.reuse:
            return self.detector.detect_seats(gray, self.seats)
        height, width = gray.shape[:2]
        todo, out = [], [None] * len(self.seats)
        thumbs: dict[int, np.ndarray] = {}
        for k, (x0, y0, x1, y1) in enumerate(self.seats):
            box = (max(0, x0), max(0, y0), min(width, x1), min(height, y1))
            self.still[k] = False
            if self._last[k] is None and box[2] > box[0] and box[3] > box[1]:
                thumbs[k] = _thumb(gray, box)
                if self._is_still(k, thumbs[k]):
                    empty = self._empty[k]
                    self._empty[k] = (empty[0], empty[1] + 1)  # type: ignore[index]
                    self.still[k] = True
                    self.skipped += 1
                    continue
            todo.append(k)
        second = [self._since_second[k] >= SECOND_PASS_EVERY for k in todo]
        found = self.detector.detect_seats(gray, [self.seats[k] for k in todo], [self._last[k] for k in todo],
                                           [self._widths[k] for k in todo], second)
        for k, face, ran in zip(todo, found, second):
            out[k] = face
            self._remember(k, face, ran, thumbs.get(k))
        return out

    def _remember(self, k: int, face: Face | None, second_ran: bool, thumb: np.ndarray | None) -> None:
        self._last[k] = None if face is None else face.box
        self._empty[k] = None if face is not None or thumb is None else (thumb, 0)
        if face is not None:
            w = self._widths[k]        # a slow running mean: one odd detection does not move it far
            self._widths[k] = float(face.box[2]) if w is None else 0.8 * w + 0.2 * face.box[2]
            self._since_second[k] = SECOND_PASS_EVERY
        else:
            self._since_second[k] = 1 if second_ran else self._since_second[k] + 1


#: without a seat map: a place where a face was found is remembered for this many samples
PLACE_MEMORY = 30


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether the centre of box a (x, y, w, h) lies inside box b."""
    cx, cy = a[0] + a[2] / 2.0, a[1] + a[3] / 2.0
    return b[0] <= cx <= b[0] + b[2] and b[1] <= cy <= b[1] + b[3]


class FrameSearch:
    """Without a seat map: the whole frame is searched, then every place where a face was found in the
    last PLACE_MEMORY samples and none is found now is searched like a seat (`FaceDetector.detect_seats`:
    the face's size, then the finer, equalised, rolled second pass): under a fixed camera a student who
    was there a moment ago most likely still is, and the whole-frame search misses what a closer look
    finds. The places are positions, not identities: no face is tied to a student by them."""

    def __init__(self, detector: FaceDetector, reuse: bool = True) -> None:
        self.detector, self.reuse = detector, reuse
        self._places: list[list] = []           # [box (x, y, w, h), sample index last seen]
        self._index = 0

    def __call__(self, gray: np.ndarray) -> list[Face]:
        faces = self.detector.detect(gray)
        if not self.reuse:
            return faces
        height, width = gray.shape[:2]
        missing = [p for p in self._places if not any(_overlaps(p[0], f.box) for f in faces)]
        regions = []
        for (x, y, w, h), _ in missing:      # a seat-like box around the place (docs/classroom.md: 1.7 x 1.9 face widths)
            cx, cy = x + w / 2.0, y + h / 2.0
            regions.append((int(max(0, cx - 0.85 * w)), int(max(0, cy - 0.95 * h)), int(min(width, cx + 0.85 * w)),
                            int(min(height, cy + 0.95 * h))))
        for face in self.detector.detect_seats(gray, regions, None, [float(p[0][2]) for p in missing]):
            if face is not None and not any(_overlaps(face.box, f.box) for f in faces):
                faces.append(face)
        for face in faces:
            place = next((p for p in self._places if _overlaps(face.box, p[0])), None)
            if place is None:
                self._places.append([face.box, self._index])
            else:
                place[0], place[1] = face.box, self._index
        self._places = [p for p in self._places if self._index - p[1] < PLACE_MEMORY]
        self._index += 1
        return faces
