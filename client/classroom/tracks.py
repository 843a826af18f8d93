"""Who is who across frames: seat-map assignment (a fixed camera, a roster) or anonymous tracks.

Seat map (JSON, written by the school's IT admin once per room and camera):

    {"seats": [{"student_id": "st-014", "box": [x0, y0, x1, y1]}, ...]}

`box` is where the student's face appears in the camera frame, in pixels. A face belongs to the
seat whose box holds the midpoint of its eyes (nearest box centre when boxes overlap); a seat keeps
at most one face per frame (the one nearest its centre).

Without a seat map faces are linked frame to frame by overlap (`IouTracker`). Those tracks serve the
lesson's analytics only: they are never a privacy unit, because a track that is lost and found again
splits one student over two tracks (docs/privacy.md, "Classroom cameras").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from client.classroom.faces import Face

MAX_SEAT_MAP_BYTES = 1 << 20


class SeatMapError(ValueError):
    """A seat map that cannot be used (one line naming the file and the field)."""


@dataclass(frozen=True)
class Seat:
    student_id: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)

    def holds(self, point: tuple[float, float]) -> bool:
        return self.box[0] <= point[0] <= self.box[2] and self.box[1] <= point[1] <= self.box[3]


def _finite_number(value: object) -> bool:
    """An int or float that is finite; an integer too large for a float (400 digits in the JSON) is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:   # math.isfinite converts an int to a float first
        return False


def _seat(item: object, path: Path, index: int) -> Seat:
    if not isinstance(item, dict):
        raise SeatMapError(f"{path}: seats[{index}] must be an object with student_id and box")
    student = item.get("student_id")
    # the id names the student's crop files (images/<step>-<id>.png) and CSV cells: a slash made the crop
    # silently unwritable, a line break split the CSV row the report reads back
    if not isinstance(student, str) or not student.strip() or len(student) > 128 or any(
            c in ",/\\" or not (c.isprintable() or c == " ") for c in student):
        raise SeatMapError(f"{path}: seats[{index}].student_id must be a non-empty name without commas, slashes "
                           "or control characters")
    box = item.get("box")
    if not (isinstance(box, list) and len(box) == 4 and all(_finite_number(v) for v in box)):
        raise SeatMapError(f"{path}: seats[{index}].box must be four numbers [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise SeatMapError(f"{path}: seats[{index}].box must satisfy 0 <= x0 < x1 and 0 <= y0 < y1, got {box}")
    return Seat(student.strip(), (x0, y0, x1, y1))


def load_seat_map(path: str | Path) -> list[Seat]:
    """The seats of a seat-map file; SeatMapError naming the file for anything unusable."""
    from shared_models.datasets.base import special_file

    path = Path(path)
    if why := special_file(path):
        raise SeatMapError(f"{path}: cannot read the seat map ({why})")
    try:
        raw = path.read_bytes()[:MAX_SEAT_MAP_BYTES + 1]
    except OSError as exc:
        raise SeatMapError(f"{path}: cannot read the seat map ({exc.strerror or exc})") from None
    if len(raw) > MAX_SEAT_MAP_BYTES:
        raise SeatMapError(f"{path}: seat map larger than {MAX_SEAT_MAP_BYTES // 1024} KB")
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SeatMapError(f"{path}: not a JSON seat map ({' '.join(str(exc).split())[:100]})") from None
    seats = doc.get("seats") if isinstance(doc, dict) else None
    if not isinstance(seats, list) or not seats:
        raise SeatMapError(f"{path}: key 'seats' must be a non-empty list")
    out = [_seat(item, path, i) for i, item in enumerate(seats)]
    ids = [s.student_id for s in out]
    duplicate = next((sid for sid in ids if ids.count(sid) > 1), None)
    if duplicate is not None:
        raise SeatMapError(f"{path}: student_id {duplicate!r} has more than one seat")
    return out


def assign_to_seats(faces: list[Face], seats: list[Seat]) -> tuple[dict[str, Face], int]:
    """{student_id: face} for one frame, and how many faces fitted no seat (or lost their seat to a
    face nearer its centre)."""
    best: dict[str, tuple[float, Face]] = {}
    unassigned = 0
    for face in faces:
        point = face.centre
        holders = [s for s in seats if s.holds(point)]
        if not holders:
            unassigned += 1
            continue
        seat = min(holders, key=lambda s: math.dist(point, s.centre))
        dist = math.dist(point, seat.centre)
        if seat.student_id in best:
            unassigned += 1
            if dist >= best[seat.student_id][0]:
                continue
        best[seat.student_id] = (dist, face)
    return {sid: face for sid, (_, face) in best.items()}, unassigned


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = min(ax + aw, bx + bw) - max(ax, bx)
    h = min(ay + ah, by + bh) - max(ay, by)
    inter = max(0, w) * max(0, h)
    return inter / float(aw * ah + bw * bh - inter) if inter else 0.0


class IouTracker:
    """Greedy frame-to-frame linking: a face continues the track whose last box overlaps it most
    (IoU >= `min_iou`), if that track was seen within `max_gap` samples; otherwise it starts a track."""

    def __init__(self, min_iou: float = 0.3, max_gap: int = 10) -> None:
        self.min_iou, self.max_gap = min_iou, max_gap
        self._last: dict[str, tuple[int, tuple[int, int, int, int]]] = {}
        self._count = 0

    def update(self, step: int, faces: list[Face]) -> dict[str, Face]:
        out: dict[str, Face] = {}
        live = {tid: box for tid, (seen, box) in self._last.items() if step - seen <= self.max_gap}
        pairs = sorted(((_iou(box, f.box), tid, k) for tid, box in live.items() for k, f in enumerate(faces)), reverse=True)
        used_tracks: set[str] = set()
        used_faces: set[int] = set()
        for overlap, tid, k in pairs:
            if overlap < self.min_iou:
                break
            if tid in used_tracks or k in used_faces:
                continue
            used_tracks.add(tid)
            used_faces.add(k)
            out[tid] = faces[k]
        for k, face in enumerate(faces):
            if k not in used_faces:
                self._count += 1
                out[f"track-{self._count:04d}"] = face
        for tid, face in out.items():
            self._last[tid] = (step, face.box)
        return out
