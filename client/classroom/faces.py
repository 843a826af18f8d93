"""Face detection and normalisation as seed 004 describes them.

Detection: OpenCV's Haar-feature AdaBoost cascades (`haarcascade_frontalface_default.xml`, and
`haarcascade_eye.xml` inside each face), which ship inside the opencv-python-headless wheel: nothing
is downloaded. Normalisation (seed 004, section 2.2):

- angle: the eye centres give the in-plane angle phi = atan((b_e - b_m) / (a_e - a_m)); the face is
  rotated by -phi about the eyes' midpoint so the eye line is level;
- scale: with d the distance between the eyes, the crop spans d left and right of the eyes' midpoint,
  0.5 d above the eye line and 1.5 d below it (a 2d x 2d square), resized to the model's input size
  (96 x 96 in the paper; fedfer uses the model preset's size);
- grey level: grayscale and histogram equalisation.

When the eye cascade does not find a plausible pair, the eyes are placed where the face cascade's box
puts them on an upright face (angle 0): the crop is still made, and `eyes_found` says which it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the face box's eye positions on an upright frontal face (fractions of the box), the fallback
PRIOR_EYES = ((0.30, 0.40), (0.70, 0.40))
#: crop framing of seed 004: half-width and the part above the eye line, in eye distances
CROP_HALF_WIDTH, CROP_ABOVE = 1.0, 0.5
#: smallest face searched in a seat box, as a fraction of the box's shorter side (detected faces measure
#: 0.58-0.83 of it on the synthetic lessons, 1st-99th percentile)
SEAT_MIN_FACE = 0.5
#: largest face searched in a seat box (the box is drawn around the face with a margin)
SEAT_MAX_FACE = 0.95
#: a pupil-only eye line steeper than this (degrees) is taken for noise, and the face left unrotated
MAX_PRIOR_ANGLE = 20.0
#: a seat box is searched at most this many pixels on its shorter side
SEAT_SIDE = 80
#: where the eyes are searched: this band of the face box's height, at this face width in pixels
EYE_BAND = (0.15, 0.6)
EYE_SEARCH_WIDTH = 60
#: tracking window: the previous sample's face box grown by this many face widths on each side ...
TRACK_MARGIN = 0.3
#: ... searched for faces of these fractions of the previous width, shrunk so the face is this many pixels
TRACK_SIZES = (0.85, 1.18)
TRACK_FACE_PX = 40
#: the second pass over a seat without a face also tries the seat rolled by this many degrees either way
SECOND_PASS_ROLL = 12.0
#: a seat whose face width is known from earlier samples is searched for faces of these fractions of it
SEAT_WIDTH_RANGE = (0.8, 1.25)


@dataclass(frozen=True)
class DetectorSettings:
    """Cascade settings. Faces smaller than `min_face` pixels are not searched for (the targets are set
    for faces of 40 px and more); `scale_factor` trades recall for speed."""

    min_face: int = 34
    max_face: int = 160
    scale_factor: float = 1.12
    min_neighbors: int = 3
    seat_scale_factor: float = 1.06
    # inside a seat box one face at most is kept, so a single cascade hit is enough evidence there
    seat_min_neighbors: int = 1
    # seats the first search found empty are searched again, equalised, finer and rolled (`_second_pass`)
    second_pass: bool = True
    second_scale_factor: float = 1.03
    # the eye cascade inside each face (else the pupils are searched where an upright face has its eyes)
    eye_cascade: bool = True


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]              # x, y, w, h in frame pixels
    left_eye: tuple[float, float]               # image-left eye centre (frame pixels)
    right_eye: tuple[float, float]
    eyes_found: bool
    angle: float                                # eye-line angle in degrees (image y down), what alignment undoes

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.left_eye[0] + self.right_eye[0]) / 2.0, (self.left_eye[1] + self.right_eye[1]) / 2.0)

    @property
    def eye_distance(self) -> float:
        return math.hypot(self.right_eye[0] - self.left_eye[0], self.right_eye[1] - self.left_eye[1])


class FaceDetector:
    """The frontal-face and eye cascades, loaded once."""

    def __init__(self, settings: DetectorSettings | None = None) -> None:
        import cv2

        self.settings = settings or DetectorSettings()
        root = cv2.data.haarcascades
        self._faces = cv2.CascadeClassifier(root + "haarcascade_frontalface_default.xml")
        self._eyes = cv2.CascadeClassifier(root + "haarcascade_eye.xml")
        self._profiles = cv2.CascadeClassifier(root + "haarcascade_profileface.xml")
        if self._faces.empty() or self._eyes.empty() or self._profiles.empty():
            raise RuntimeError(f"OpenCV's Haar cascades are missing from {root} (opencv-python-headless 4.x ships them)")

    def detect(self, gray: np.ndarray, region: tuple[int, int, int, int] | None = None) -> list[Face]:
        """Faces in a uint8 grayscale frame; `region` (x0, y0, x1, y1) limits the search (e.g. the seats)."""
        s = self.settings
        x0, y0 = 0, 0
        view = gray
        if region is not None:
            x0, y0, x1, y1 = region
            view = gray[y0:y1, x0:x1]
        if view.size == 0:
            return []
        boxes = self._faces.detectMultiScale(view, scaleFactor=s.scale_factor, minNeighbors=s.min_neighbors,
                                             minSize=(s.min_face, s.min_face), maxSize=(s.max_face, s.max_face))
        return [self._with_eyes(gray, (int(x) + x0, int(y) + y0, int(w), int(h))) for x, y, w, h in boxes]

    def detect_in_seats(self, gray: np.ndarray, seats: list[tuple[int, int, int, int]]) -> list[Face]:
        """Faces searched seat by seat (`detect_seats` without a previous sample), as one list."""
        return [face for face in self.detect_seats(gray, seats) if face is not None]

    def detect_seats(self, gray: np.ndarray, seats: list[tuple[int, int, int, int]],
                     previous: list[tuple[int, int, int, int] | None] | None = None,
                     widths: list[float | None] | None = None, second: list[bool] | None = None
                     ) -> list[Face | None]:
        """One face or None per seat box (x0, y0, x1, y1). A fixed camera sees each seat's face inside its
        seat-map box, at a size the box bounds, so each search covers a few positions and scales instead of
        the whole frame. `previous` (per seat: the face box found in the previous sample, or None) narrows
        the first search to a window around it at its size (a head moves little in a second); where that
        window holds no face, the whole seat is searched, then searched again finer (`_second_pass`).
        `widths` (per seat: the face width earlier samples found there, or None) bounds the face sizes of
        those searches to SEAT_WIDTH_RANGE of it (a seat's face keeps its size under a fixed camera);
        `second` (per seat) says whether the second pass may run."""
        height, width = gray.shape[:2]
        out: list[Face | None] = []
        for k, (x0, y0, x1, y1) in enumerate(seats):
            seat = (max(0, x0), max(0, y0), min(width, x1), min(height, y1))
            if min(seat[2] - seat[0], seat[3] - seat[1]) < self.settings.min_face:
                out.append(None)
                continue
            last = previous[k] if previous is not None else None
            known = widths[k] if widths is not None else None
            box = self._around(gray, last) if last is not None else None
            if box is None:
                box = self._in_seat(gray, seat, known)
            if box is None and self.settings.second_pass and (second is None or second[k]):
                box = self._second_pass(gray, seat, known)
            out.append(None if box is None else self._with_eyes(gray, box))
        return out

    def _search(self, roi: np.ndarray, shrink: float, origin: tuple[int, int], sizes: tuple[int, int],
                scale_factor: float, centre: tuple[float, float]) -> tuple[int, int, int, int] | None:
        """The cascade over one (already shrunk) region; the hit nearest `centre` (region pixels), in frame pixels."""
        boxes = self._faces.detectMultiScale(roi, scaleFactor=scale_factor, minNeighbors=self.settings.seat_min_neighbors,
                                             minSize=(sizes[0],) * 2, maxSize=(sizes[1],) * 2)
        if not len(boxes):
            return None
        x, y, w, h = min(boxes.tolist(), key=lambda b: math.hypot(b[0] + b[2] / 2 - centre[0], b[1] + b[3] / 2 - centre[1]))
        return (int(x / shrink) + origin[0], int(y / shrink) + origin[1], int(w / shrink), int(h / shrink))

    def _seat_roi(self, gray: np.ndarray, seat: tuple[int, int, int, int], side_px: int, equalise: bool
                  ) -> tuple[np.ndarray, float]:
        import cv2

        x0, y0, x1, y1 = seat
        # shrink the seat so its largest possible face is about side_px: the cascade's cost grows with the
        # pixels and scales searched, and a 24-px window still sees a face of a third of that
        shrink = min(1.0, side_px / min(x1 - x0, y1 - y0))
        roi = gray[y0:y1, x0:x1]
        if shrink < 1.0:
            roi = cv2.resize(roi, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        return (cv2.equalizeHist(roi) if equalise else roi), shrink

    def _in_seat(self, gray: np.ndarray, seat: tuple[int, int, int, int], width: float | None
                 ) -> tuple[int, int, int, int] | None:
        roi, shrink = self._seat_roi(gray, seat, SEAT_SIDE, False)
        return self._search(roi, shrink, seat[:2], _seat_sizes(roi, shrink, width), self.settings.seat_scale_factor,
                            (roi.shape[1] / 2.0, roi.shape[0] / 2.0))

    def _around(self, gray: np.ndarray, last: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
        """The face near where it was in the previous sample: a window TRACK_MARGIN face widths larger on
        each side, faces within TRACK_SIZES of the previous width, searched at TRACK_FACE_PX."""
        x, y, w, h = last
        m = int(round(TRACK_MARGIN * w))
        height, width = gray.shape[:2]
        region = (max(0, x - m), max(0, y - m), min(width, x + w + m), min(height, y + h + m))
        if min(region[2] - region[0], region[3] - region[1]) < 24:
            return None
        shrink = min(1.0, TRACK_FACE_PX / w)
        sizes = (max(24, int(w * shrink * TRACK_SIZES[0])), max(24, int(w * shrink * TRACK_SIZES[1]) + 1))
        roi, shrink = self._seat_roi(gray, region, int(min(region[2] - region[0], region[3] - region[1]) * shrink),
                                     False)
        return self._search(roi, shrink, region[:2], sizes, self.settings.seat_scale_factor,
                            ((x + w / 2 - region[0]) * shrink, (y + h / 2 - region[1]) * shrink))

    def _second_pass(self, gray: np.ndarray, seat: tuple[int, int, int, int], width: float | None
                     ) -> tuple[int, int, int, int] | None:
        """A seat the first search found empty, searched again: contrast equalised (a dark face in a dim
        room), at a finer scale step, upright and rolled by +-SECOND_PASS_ROLL degrees (a tilted head;
        the cascade was trained on upright faces)."""
        import cv2

        roi, shrink = self._seat_roi(gray, seat, SEAT_SIDE, equalise=True)
        sizes = _seat_sizes(roi, shrink, width)
        rows, cols = roi.shape[:2]
        centre = (cols / 2.0, rows / 2.0)
        for angle in dict.fromkeys((0.0, SECOND_PASS_ROLL, -SECOND_PASS_ROLL)):
            view = roi
            if angle:
                matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
                view = cv2.warpAffine(roi, matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            found = self._search(view, 1.0, (0, 0), sizes, self.settings.second_scale_factor, centre)
            if found is None:
                continue
            x, y, w, h = found
            if angle:      # the box's centre back in the upright seat; the box keeps its size
                cx, cy = cv2.invertAffineTransform(matrix) @ np.array([x + w / 2.0, y + h / 2.0, 1.0])
                x, y = int(round(cx - w / 2.0)), int(round(cy - h / 2.0))
            return (int(x / shrink) + seat[0], int(y / shrink) + seat[1], int(w / shrink), int(h / shrink))
        return None

    def profile_in(self, gray: np.ndarray, box: tuple[int, int, int, int]) -> bool:
        """Whether a seat box shows a face in profile (either side): a head turned away, not bowed."""
        import cv2

        x0, y0, x1, y1 = box
        roi = gray[max(0, y0):y1, max(0, x0):x1]
        side = min(roi.shape[:2]) if roi.size else 0
        if side < 24:
            return False
        shrink = min(1.0, SEAT_SIDE / side)
        if shrink < 1.0:
            roi = cv2.resize(roi, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        small = min(roi.shape[:2])
        smallest = max(20, int(small * SEAT_MIN_FACE))
        for view in (roi, roi[:, ::-1].copy()):
            found = self._profiles.detectMultiScale(view, scaleFactor=1.1, minNeighbors=2, minSize=(smallest, smallest),
                                                    maxSize=(small, small))
            if len(found):
                return True
        return False

    def _with_eyes(self, gray: np.ndarray, box: tuple[int, int, int, int]) -> Face:
        import cv2

        x, y, w, h = box
        top_y = y + int(h * EYE_BAND[0])
        band = gray[top_y:y + int(h * EYE_BAND[1]), x:x + w]
        # eyes are searched at a fixed face width: a large face costs no more than a small one
        shrink = min(1.0, EYE_SEARCH_WIDTH / max(1, w))
        if shrink < 1.0 and band.size:
            band = cv2.resize(band, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        fw = w * shrink
        eyes = () if band.size == 0 or not self.settings.eye_cascade else self._eyes.detectMultiScale(
            band, scaleFactor=1.1, minNeighbors=2, minSize=(max(6, int(fw * 0.14)),) * 2,
            maxSize=(int(fw * 0.45),) * 2)
        centres = [_pupil(band, (int(ex), int(ey), int(ew), int(eh))) for ex, ey, ew, eh in eyes]
        pair = _eye_pair([(x + cx / shrink, top_y + cy / shrink) for cx, cy in centres], box)
        if pair is None:
            left, right = _prior_pupils(band, box, top_y, shrink)
            angle = math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
            return Face(box, left, right, False, angle if abs(angle) <= MAX_PRIOR_ANGLE else 0.0)
        left, right = pair
        angle = math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
        return Face(box, left, right, True, angle)


def _seat_sizes(roi: np.ndarray, shrink: float, width: float | None) -> tuple[int, int]:
    """(smallest, largest) face searched in a shrunk seat region: SEAT_MIN_FACE-SEAT_MAX_FACE of its side,
    narrowed to SEAT_WIDTH_RANGE of the seat's known face width when there is one."""
    small = min(roi.shape[:2])
    lo, hi = max(24, int(small * SEAT_MIN_FACE)), max(24, int(small * SEAT_MAX_FACE))
    if width is not None:
        lo = max(lo, int(width * shrink * SEAT_WIDTH_RANGE[0]))
        hi = max(lo + 1, min(hi, int(width * shrink * SEAT_WIDTH_RANGE[1]) + 1))
    return lo, hi


def _pupil(band: np.ndarray, eye: tuple[int, int, int, int]) -> tuple[float, float]:
    """The pupil inside an eye box (seed 004 locates it inside the cascade's eye box; here: the darkest
    spot of the box's middle after a light blur, which is where the iris and pupil are)."""
    import cv2

    ex, ey, ew, eh = eye
    mx, my = int(ew * 0.2), int(eh * 0.25)
    inner = band[ey + my:ey + eh - my, ex + mx:ex + ew - mx]
    if inner.size < 4:
        return ex + ew / 2.0, ey + eh / 2.0
    smooth = cv2.GaussianBlur(inner, (0, 0), max(0.8, ew / 12.0))
    _, _, (px, py), _ = cv2.minMaxLoc(smooth)
    return ex + mx + px + 0.5, ey + my + py + 0.5


def _prior_pupils(band: np.ndarray, box: tuple[int, int, int, int], top_y: int, shrink: float
                  ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Without an eye-cascade pair: the pupils searched (darkest spot) in the two windows around the
    face box's prior eye positions."""
    x, y, w, h = box
    out = []
    for px, py in PRIOR_EYES:
        ex, ey = (px - 0.13) * w * shrink, (y + py * h - top_y) * shrink - 0.1 * h * shrink
        eye = (int(max(0, ex)), int(max(0, ey)), int(0.26 * w * shrink), int(0.2 * h * shrink))
        cx, cy = _pupil(band, eye) if band.size else (px * w * shrink, (y + py * h - top_y) * shrink)
        out.append((x + cx / shrink, top_y + cy / shrink))
    return out[0], out[1]


def _eye_pair(centres: list[tuple[float, float]], box: tuple[int, int, int, int]
              ) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The most plausible (left, right) eye pair: one in each half of the face, 0.25-0.65 face widths
    apart, the line between them within 30 degrees of level; closest to the prior positions wins."""
    x, y, w, h = box
    best, best_cost = None, math.inf
    for a in centres:
        for b in centres:
            if not a[0] < x + w / 2.0 < b[0]:
                continue
            dist = math.hypot(b[0] - a[0], b[1] - a[1])
            if not 0.25 * w <= dist <= 0.65 * w or abs(math.atan2(b[1] - a[1], b[0] - a[0])) > math.radians(30):
                continue
            cost = sum(math.hypot((p[0] - x) / w - q[0], (p[1] - y) / h - q[1]) for p, q in zip((a, b), PRIOR_EYES))
            if cost < best_cost:
                best, best_cost = (a, b), cost
    return best


def align_crop(gray: np.ndarray, face: Face, size: int) -> np.ndarray:
    """The seed-004 normalised face: rotated so the eyes are level, cropped 2d x 2d around them (d the
    eye distance; 0.5 d above the eye line, 1.5 d below), resized to size x size, histogram-equalised."""
    import cv2

    d = max(face.eye_distance, 4.0)
    cx, cy = face.centre
    scale = size / (2.0 * CROP_HALF_WIDTH * d)
    # rotate about the eyes' midpoint by the eye-line angle, scale, and move the midpoint to where the
    # crop wants it: one affine warp instead of rotate + crop + resize
    matrix = cv2.getRotationMatrix2D((cx, cy), face.angle, scale)
    matrix[0, 2] += size * 0.5 - cx
    matrix[1, 2] += size * (CROP_ABOVE / (2.0 * CROP_HALF_WIDTH)) - cy
    crop = cv2.warpAffine(gray, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.equalizeHist(crop)
