"""Synthetic classroom scenes: a fixed camera in front of rows of desks, many students per frame.

What the classroom pipeline (client/classroom/) needs to be measured on, with the ground truth a real
camera never gives: where every face is (box, eye centres), who it is, the expression it shows, the
head's pose (yaw, pitch, roll), and whether the student is there at all.

A room is a layout (rows of desks; back rows small and high in the frame, front rows large and low,
columns staggered so heads do not hide each other), a lighting (exposure, a gradient from the window
side, sensor noise, sometimes a grayscale camera) and a roster drawn by `simulations.synth`
(identities, expression styles). A lesson is a script: per student and time step, present or not,
the expression (segments of a few seconds, a "hard topic" episode where part of the class frowns or
looks sad), and the head's pose (looking at the board, turned to a neighbour, bowed over the desk).

Faces are drawn by `simulations.faces.Renderer` (the same face model the training data uses) onto
the room behind them, then shaded: the flat-shaded renderer gives a Haar cascade too little of the
light/dark structure a lit face has (dark eye sockets under the brow ridge, a lit nose bridge and
cheekbones, darker face sides), so `_relief` adds it from the face's own landmarks. The detector is
never retrained or swapped to suit the drawings (issue 17).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from shared_models.labels import FER7
from simulations import faces as F
from simulations import synth as S

FRAME_W, FRAME_H = 640, 480
FACE_FRACTION = 2.0 * F.UNIT          # face width / renderer patch side at pose scale 1 (face_w = 1)
PATCH_CENTRE_Y = 0.416                # the renderer puts the canonical origin here (fraction of the side)
# faces are drawn smaller and lower in their patch than in the training crops, so the whole head (hair
# on top, chin below) fits: a patch that cuts the head flat leaves the desk behind showing through it
PATCH_SCALE, PATCH_DY = 0.75, 0.05
BOWED_RANGE = (0.65, 0.9)             # radians: a head bowed over the desk (reading, writing)
BOW_PITCH = 0.30                      # radians: a head pitched further than this counts as bowed (~17 deg)
TURN_YAW = 0.55                       # radians: a head turned further than this is not facing the camera
DISTRESS = ("angry", "sad", "fear")   # classes the lesson's hard-topic episode draws from
FOREHEAD = 0.35                       # canonical units added to the forehead's height (roster)
EXPRESSION_INTENSITY = 0.55          # x faces.EXPRESSION_GAIN: clear expressions without the cartoon extremes of 48 px crops


@dataclass(frozen=True)
class Seat:
    student_id: str
    row: int                          # 0 = back row
    col: int
    centre: tuple[int, int]           # where the face's canonical origin sits in the frame (x, y)
    face_px: int                      # face width in pixels when facing the camera
    box: tuple[int, int, int, int]    # the seat-map box (x0, y0, x1, y1): where this student's face can appear


@dataclass(frozen=True)
class Room:
    seed: int
    width: int
    height: int
    seats: tuple[Seat, ...]
    wall: tuple[float, float, float]
    floor: tuple[float, float, float]
    board: tuple[float, float, float]
    exposure: float
    light: float                      # strength of the window-side gradient
    light_side: float                 # -1 window on the image left, +1 on the right
    noise: float                      # sensor noise sigma (0..1 intensity units)
    mono: bool                        # a grayscale (IR) camera

    def seat_map(self) -> dict:
        """The seat map a school would give `fedfer classroom ingest --seat-map`."""
        return {"seats": [{"student_id": s.student_id, "box": list(s.box)} for s in self.seats]}


@dataclass
class Script:
    """Per student (rows) and time step (columns): what the generator will draw."""

    fps: float
    present: np.ndarray               # bool (N, T)
    label: np.ndarray                 # int (N, T) index into FER7
    yaw: np.ndarray                   # float (N, T) radians
    pitch: np.ndarray
    roll: np.ndarray
    hard_topic: tuple[float, float] = (0.0, 0.0)   # seconds: the episode where distress was scripted

    @property
    def steps(self) -> int:
        return int(self.present.shape[1])

    def facing(self) -> np.ndarray:
        """Ground truth 'face visible to the camera': present, not turned away (bowed heads still count)."""
        return self.present & (np.abs(self.yaw) <= TURN_YAW)

    def bowed(self) -> np.ndarray:
        return self.present & (self.pitch > BOW_PITCH)


@dataclass
class FaceTruth:
    student_id: str
    box: tuple[float, float, float, float]      # x0, y0, x1, y1 of the face (brows to chin, cheek to cheek)
    left_eye: tuple[float, float]               # image-left eye centre
    right_eye: tuple[float, float]
    angle: float                                # in-plane angle of the eye line, degrees (image y down)
    yaw: float
    pitch: float
    label: str
    face_px: float                              # face width in pixels

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Chunk:
    """Rendered faces of one student over a run of time steps, ready to paste."""

    patches: np.ndarray               # uint8 (B, P, P, 3)
    masks: np.ndarray                 # bool (B, P, P)
    marks: np.ndarray                 # float (B, 68, 2) in frame pixels
    steps: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Rooms
# ------------------------------------------------------------------------------------------------


def _row_geometry(rows: int, height: int) -> list[tuple[int, int]]:
    """(face centre y, face width px) per row, back to front: faces grow and move down towards the camera."""
    out = []
    for r in range(rows):
        t = r / max(1, rows - 1)
        out.append((int(height * (0.25 + 0.52 * t)), int(round(42 + 32 * t))))
    return out


#: Most seats a synthetic room has (rows of 5-6 in the frame).
MAX_STUDENTS = 40
#: Most frames a synthetic lesson writes: 10 hours at 1 frame per second. A lesson, not a disk filler (each
#: frame is a full-room image; `script_lesson` also holds every student's track for every frame in memory).
MAX_FRAMES = 36_000


def make_room(seed: int, students: int = 24, width: int = FRAME_W, height: int = FRAME_H) -> Room:
    """A room with `students` seats in rows (5-6 per row), its lighting, and a roster of synthetic students."""
    if not 1 <= students <= MAX_STUDENTS:
        raise ValueError(f"a classroom scene holds 1..{MAX_STUDENTS} students, got {students}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 17, 0]))
    per_row = 6 if students > 20 else 5
    rows = math.ceil(students / per_row)
    seats = []
    for r, (cy, face) in enumerate(_row_geometry(rows, height)):
        n = min(per_row, students - r * per_row)
        spacing = width / (per_row + 0.5)
        offset = (spacing / 2.0) * (r % 2) + spacing * 0.5
        for c in range(n):
            cx = int(offset + c * spacing + rng.uniform(-4, 4))
            cy_s = int(cy + rng.uniform(-4, 4))
            half = int(face * 0.85)
            box = (max(0, cx - half), max(0, cy_s - int(face * 0.95)), min(width, cx + half),
                   min(height, cy_s + int(face * 0.95)))
            seats.append(Seat(f"r{seed % 1000:03d}-st{len(seats):02d}", r, c, (cx, cy_s), face, box))
    return Room(seed=seed, width=width, height=height, seats=tuple(seats),
                wall=tuple(float(v) for v in rng.uniform(150, 230, 3)),  # type: ignore[arg-type]
                floor=tuple(float(v) for v in rng.uniform(90, 160, 3)),  # type: ignore[arg-type]
                board=((40.0, 70.0, 50.0), (235.0, 235.0, 230.0))[int(rng.integers(2))],
                exposure=float(rng.uniform(0.8, 1.1)), light=float(rng.uniform(0.05, 0.3)),
                light_side=float(rng.choice([-1.0, 1.0])), noise=float(rng.uniform(0.01, 0.03)),
                mono=bool(rng.random() < 0.2))


def roster(room: Room) -> list[S.Student]:
    """The students sitting in the room, drawn by the synthetic world's sampler (school stream 900 + seed)."""
    params = S.SynthParams(seed=room.seed)
    profile = S.school_profile(params, 900)
    people = [S.student(params, 900, i, profile) for i in range(len(room.seats))]
    # a forehead of real proportions (the training faces' hairline sits low, just above the brows; a
    # cascade trained on real faces expects skin between brows and hair)
    return [replace(p, identity=replace(p.identity, hairline=p.identity.hairline - FOREHEAD)) for p in people]


def _empty_room(room: Room) -> np.ndarray:
    """Wall, board and floor; desks are drawn per row in front of the students."""
    img = np.empty((room.height, room.width, 3), np.float32)
    img[:] = room.wall
    img[int(room.height * 0.55):] = room.floor
    bx0, bx1 = int(room.width * 0.2), int(room.width * 0.8)
    img[int(room.height * 0.03):int(room.height * 0.2), bx0:bx1] = room.board
    return img.astype(np.uint8)


def _desk_rows(room: Room) -> dict[int, tuple[int, int, int]]:
    """Per row: the desk top's y and height, and its grey level (drawn below the row's faces)."""
    out = {}
    for seat in room.seats:
        y = seat.centre[1] + int(seat.face_px * 1.05)
        out[seat.row] = (y, max(6, seat.face_px // 4), 95 + 10 * seat.row)
    return out


# ------------------------------------------------------------------------------------------------
# Lessons: who is there, what they show, where they look
# ------------------------------------------------------------------------------------------------


def _segments(rng: np.random.Generator, steps: int, mean_len: float) -> list[tuple[int, int]]:
    """Consecutive [start, end) runs covering 0..steps with geometric lengths of mean `mean_len` steps."""
    out, t = [], 0
    while t < steps:
        length = max(1, int(rng.geometric(1.0 / max(1.0, mean_len))))
        out.append((t, min(steps, t + length)))
        t += length
    return out


def _presence(rng: np.random.Generator, steps: int) -> np.ndarray:
    """Most students stay; a few are absent all lesson, some leave for a while."""
    present = np.ones(steps, bool)
    u = rng.random()
    if u < 0.05:
        present[:] = False
    elif u < 0.17:
        length = int(steps * rng.uniform(0.1, 0.3))
        start = int(rng.integers(0, max(1, steps - length)))
        present[start:start + length] = False
    return present


def _pose_track(rng: np.random.Generator, steps: int, fps: float, passive: bool) -> tuple[np.ndarray, ...]:
    """yaw, pitch, roll per step: looking at the board, bowed over the desk, or turned to a neighbour."""
    yaw, pitch, roll = np.zeros(steps), np.zeros(steps), np.zeros(steps)
    p_bow = 0.75 if passive else 0.15
    p_turn = 0.12
    base_yaw = rng.normal(0.0, 0.08)
    for a, b in _segments(rng, steps, 12.0 * fps):
        u = rng.random()
        n = b - a
        if u < p_bow:
            pitch[a:b] = rng.uniform(BOWED_RANGE[0], BOWED_RANGE[1]) + rng.normal(0.0, 0.02, n)
            yaw[a:b] = base_yaw + rng.normal(0.0, 0.08)
        elif u < p_bow + p_turn:
            yaw[a:b] = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.1)
            pitch[a:b] = rng.normal(0.0, 0.05)
        else:
            yaw[a:b] = base_yaw + rng.normal(0.0, 0.1) + rng.normal(0.0, 0.03, n)
            pitch[a:b] = np.clip(rng.normal(0.0, 0.06) + rng.normal(0.0, 0.02, n), -0.15, 0.15)
        roll[a:b] = np.clip(rng.normal(0.0, 0.12), -0.3, 0.3) + rng.normal(0.0, 0.02, n)
    return yaw, pitch, roll


def _expressions(rng: np.random.Generator, steps: int, fps: float, probs: np.ndarray,
                 hard: tuple[int, int] | None) -> np.ndarray:
    """FER7 indices per step: segments of a few seconds; a struggling student holds one distress
    class through the hard-topic episode `hard` (steps)."""
    labels = np.empty(steps, np.int64)
    for a, b in _segments(rng, steps, 6.0 * fps):
        labels[a:b] = int(rng.choice(len(FER7), p=probs / probs.sum()))
    if hard is not None:
        labels[hard[0]:hard[1]] = FER7.index(DISTRESS[int(rng.integers(len(DISTRESS)))])
    return labels


def script_lesson(room: Room, seconds: float, fps: float = 1.0, seed: int = 0,
                  hard_topic: tuple[float, float] | None = None, passive_share: float = 0.2,
                  struggling_share: float = 0.4) -> Script:
    """A lesson of `seconds` sampled at `fps`. `hard_topic` (start, end) in seconds: the episode where
    `struggling_share` of the students show a distress expression throughout (default: 40-70 % of the
    lesson when it lasts at least a minute)."""
    steps = max(1, int(round(seconds * fps)))
    if hard_topic is None and seconds >= 60:
        hard_topic = (0.4 * seconds, 0.7 * seconds)
    hard = None if hard_topic is None else (int(hard_topic[0] * fps), int(hard_topic[1] * fps))
    people = roster(room)
    rng = np.random.default_rng(np.random.SeedSequence([room.seed, 17, 1, seed]))
    n = len(room.seats)
    present, label = np.zeros((n, steps), bool), np.zeros((n, steps), np.int64)
    yaw, pitch, roll = (np.zeros((n, steps)) for _ in range(3))
    for i, person in enumerate(people):
        passive = rng.random() < passive_share
        struggling = rng.random() < struggling_share
        present[i] = _presence(rng, steps)
        yaw[i], pitch[i], roll[i] = _pose_track(rng, steps, fps, passive)
        label[i] = _expressions(rng, steps, fps, np.asarray(person.style.label_probs), hard if struggling else None)
    return Script(fps=fps, present=present, label=label, yaw=yaw, pitch=pitch, roll=roll,
                  hard_topic=tuple(float(v) for v in hard_topic) if hard_topic else (0.0, 0.0))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------


def _patch_side(seat: Seat) -> int:
    return max(16, int(round(seat.face_px / (FACE_FRACTION * PATCH_SCALE))))


def _patch_origin(seat: Seat) -> tuple[int, int]:
    side = _patch_side(seat)
    return seat.centre[0] - side // 2, seat.centre[1] - int((PATCH_CENTRE_Y + PATCH_DY) * side)


def _crop(img: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """img[y0:y0+side, x0:x0+side] with edge padding where the window leaves the image."""
    h, w = img.shape[:2]
    out = np.empty((side, side, 3), img.dtype)
    out[:] = img[min(max(y0, 0), h - 1), min(max(x0, 0), w - 1)]
    ys, xs = max(0, -y0), max(0, -x0)
    ye, xe = min(side, h - y0), min(side, w - x0)
    if ye > ys and xe > xs:
        out[ys:ye, xs:xe] = img[y0 + ys:y0 + ye, x0 + xs:x0 + xe]
    return out


def _gauss(xx: np.ndarray, yy: np.ndarray, centre: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """(B, P, P) Gaussian blobs at per-frame centres (B, 2) with per-frame radii (B,)."""
    dx = (xx[None] - centre[:, 0, None, None]) / sx[:, None, None]
    dy = (yy[None] - centre[:, 1, None, None]) / sy[:, None, None]
    return np.exp(-0.5 * (dx * dx + dy * dy))


SIDE_SHADE = 0.3
SOCKET_SHADE = 0.6
SHINE = 40.0
DARK_SHINE = 90.0


def _relief(patches: np.ndarray, marks: np.ndarray, masks: np.ndarray, skin_luma: float = 160.0) -> np.ndarray:
    """Light and shade a lit face has and the flat renderer lacks: dark eye sockets under the brows,
    a lit nose bridge and cheekbones, a darker lower face edge. Built from each frame's landmarks
    (patch pixels) so it follows the pose; applied to the face's own pixels only. Dark skin gets
    stronger highlights: its structure shows in its highlights more than in its shadows."""
    side = patches.shape[1]
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    left, right = marks[:, 36:42].mean(1), marks[:, 42:48].mean(1)
    eye_d = np.maximum(2.0, np.linalg.norm(right - left, axis=1))
    gain = np.ones((len(patches), side, side), np.float32)
    shine = np.zeros_like(gain)          # highlights: lit skin reflects, dark skin too (added, not multiplied)
    down = np.stack([np.zeros_like(eye_d), eye_d], 1)
    for eye, brow in ((left, marks[:, 17:22].mean(1)), (right, marks[:, 22:27].mean(1))):
        socket = 0.7 * eye + 0.3 * brow
        gain -= SOCKET_SHADE * _gauss(xx, yy, socket, 0.38 * eye_d, 0.26 * eye_d)
        shine += _gauss(xx, yy, eye + 0.62 * down, 0.3 * eye_d, 0.2 * eye_d)
    bridge = 0.5 * (marks[:, 27] + marks[:, 30])
    shine += _gauss(xx, yy, bridge, 0.1 * eye_d, 0.35 * eye_d)
    brow_mid = 0.5 * (marks[:, 21] + marks[:, 22]) - 0.35 * down
    shine += 0.8 * _gauss(xx, yy, brow_mid, 0.5 * eye_d, 0.22 * eye_d)
    # a rounded face turns away from the light towards its sides and its chin
    centre_x = 0.5 * (marks[:, 0, 0] + marks[:, 16, 0])
    half_w = np.maximum(2.0, 0.5 * (marks[:, 16, 0] - marks[:, 0, 0]))
    across = (xx[None] - centre_x[:, None, None]) / half_w[:, None, None]
    gain -= SIDE_SHADE * np.clip(np.abs(across), 0.0, 1.2) ** 2
    mouth = marks[:, 48:60].mean(1)
    gain -= 0.2 * _gauss(xx, yy, mouth + 0.45 * down, 0.5 * eye_d, 0.2 * eye_d)
    out = patches.astype(np.float32)
    out *= np.where(masks, gain, 1.0)[..., None]
    out += np.where(masks, (SHINE + DARK_SHINE * max(0.0, 1.0 - skin_luma / 200.0)) * shine, 0.0)[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _render_student(renderer: F.Renderer, person: S.Student, seat: Seat, script: Script, i: int, steps: list[int],
                    base: np.ndarray, rng: np.random.Generator) -> _Chunk | None:
    """The student's face over `steps` (present ones only), shaded, with paste masks and frame landmarks."""
    steps = [t for t in steps if script.present[i, t]]
    if not steps:
        return None
    side = renderer.size
    x0, y0 = _patch_origin(seat)
    crop = _crop(base, x0, y0, side)
    background = Image.fromarray(crop).resize((2 * side, 2 * side), Image.NEAREST)
    frames = [F.Frame(aus=S.sample_aus(FER7[int(script.label[i, t])], person.style, rng, intensity=EXPRESSION_INTENSITY),
                      pose=F.Pose(roll=float(script.roll[i, t]), yaw=float(script.yaw[i, t]),
                                  pitch=float(script.pitch[i, t]), scale=PATCH_SCALE, dy=PATCH_DY),
                      gaze=(0.0, 0.0)) for t in steps]
    patches, marks = renderer.render_batch(person.identity, frames, rng, background)
    masks = np.any(patches != crop[None], axis=3)
    skin = person.identity.skin
    patches = _relief(patches, marks, masks, 0.3 * skin[0] + 0.59 * skin[1] + 0.11 * skin[2])
    return _Chunk(patches=patches, masks=masks, marks=marks + np.array([x0, y0], np.float32), steps=steps)


def _paste(frame: np.ndarray, patch: np.ndarray, mask: np.ndarray, x0: int, y0: int) -> None:
    h, w = frame.shape[:2]
    side = patch.shape[0]
    ys, xs = max(0, -y0), max(0, -x0)
    ye, xe = min(side, h - y0), min(side, w - x0)
    if ye <= ys or xe <= xs:
        return
    region = frame[y0 + ys:y0 + ye, x0 + xs:x0 + xe]
    m = mask[ys:ye, xs:xe]
    region[m] = patch[ys:ye, xs:xe][m]


def _body(frame: np.ndarray, seat: Seat, colour: tuple[float, float, float]) -> None:
    """Shoulders and torso below the face (the renderer's patch ends at the collar)."""
    import cv2

    cx, cy = seat.centre
    unit = seat.face_px / 2.0
    centre = (int(cx), int(cy + 2.2 * unit))
    cv2.ellipse(frame, centre, (int(1.5 * unit), int(1.2 * unit)), 0, 0, 360,
                tuple(int(c) for c in colour), -1)


def _camera(frame: np.ndarray, room: Room, rng: np.random.Generator, noise_pool: np.ndarray) -> np.ndarray:
    """The room's exposure, window-side gradient, sensor noise and (IR cameras) grayscale."""
    h, w = frame.shape[:2]
    gx = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :, None]
    out = frame.astype(np.float32) * (room.exposure * (1.0 + room.light * room.light_side * gx))
    oy, ox = (int(v) for v in rng.integers(0, 64, 2))
    out += 255.0 * room.noise * noise_pool[oy:oy + h, ox:ox + w]
    if room.mono:
        out = np.repeat(out @ np.array([[0.3], [0.59], [0.11]], np.float32), 3, axis=2)
    return np.clip(out, 0, 255).astype(np.uint8)


def face_truth(seat: Seat, marks: np.ndarray, script: Script, i: int, t: int) -> FaceTruth:
    """Ground truth of one drawn face from its landmarks (frame pixels)."""
    left, right = marks[36:42].mean(0), marks[42:48].mean(0)
    brow_top = float(marks[17:27, 1].min())
    eye_d = float(np.linalg.norm(right - left))
    box = (float(marks[0:17, 0].min()), brow_top - 0.3 * eye_d, float(marks[0:17, 0].max()), float(marks[0:17, 1].max()))
    angle = math.degrees(math.atan2(float(right[1] - left[1]), float(right[0] - left[0])))
    return FaceTruth(student_id=seat.student_id, box=box, left_eye=(float(left[0]), float(left[1])),
                     right_eye=(float(right[0]), float(right[1])), angle=angle, yaw=float(script.yaw[i, t]),
                     pitch=float(script.pitch[i, t]), label=FER7[int(script.label[i, t])], face_px=box[2] - box[0])


def render_lesson(room: Room, script: Script, steps: list[int] | None = None, chunk: int = 64,
                  seed: int = 0) -> Iterator[tuple[int, np.ndarray, list[FaceTruth]]]:
    """(time step, RGB frame, ground truth of every drawn face) for `steps` (default: all), in order.

    Faces are drawn per student for `chunk` steps at a time (the renderer's batch), then pasted back
    row to front row with bodies and desks, then the room's camera is applied."""
    steps = list(range(script.steps)) if steps is None else sorted(steps)
    people = roster(room)
    base = _empty_room(room)
    desks = _desk_rows(room)
    rng = np.random.default_rng(np.random.SeedSequence([room.seed, 17, 2, seed]))
    noise_pool = rng.standard_normal((room.height + 64, room.width + 64, 1), dtype=np.float32)
    renderers: dict[int, F.Renderer] = {}
    order = sorted(range(len(room.seats)), key=lambda k: (room.seats[k].row, room.seats[k].col))
    for start in range(0, len(steps), chunk):
        block = steps[start:start + chunk]
        chunks: dict[int, _Chunk] = {}
        for i in order:
            side = _patch_side(room.seats[i])
            renderer = renderers.setdefault(side, F.Renderer(side, seed=side))
            rendered = _render_student(renderer, people[i], room.seats[i], script, i, block, base, rng)
            if rendered is not None:
                chunks[i] = rendered
        for t in block:
            yield t, *_compose(room, script, t, order, chunks, base, desks, people, rng, noise_pool)


def _compose(room: Room, script: Script, t: int, order: list[int], chunks: dict[int, _Chunk], base: np.ndarray,
             desks: dict[int, tuple[int, int, int]], people: list[S.Student], rng: np.random.Generator,
             noise_pool: np.ndarray) -> tuple[np.ndarray, list[FaceTruth]]:
    frame = base.copy()
    truths: list[FaceTruth] = []
    current_row = -1
    for i in order + [-1]:
        row = room.seats[i].row if i >= 0 else 10**6
        if row != current_row and current_row >= 0:       # the row is done: its desks go in front of it
            y, height, grey = desks[current_row]
            frame[y:y + height] = (grey, grey - 10, grey - 25)
        current_row = row
        if i < 0 or i not in chunks or t not in chunks[i].steps:
            continue
        seat, ch = room.seats[i], chunks[i]
        k = ch.steps.index(t)
        _body(frame, seat, people[i].identity.shirt)
        _paste(frame, ch.patches[k], ch.masks[k], *_patch_origin(seat))
        truths.append(face_truth(seat, ch.marks[k], script, i, t))
    return _camera(frame, room, rng, noise_pool), truths


def empty_frame(room: Room, seed: int = 0) -> np.ndarray:
    """The room with nobody in it, through the same camera (what a school records before a lesson)."""
    rng = np.random.default_rng(np.random.SeedSequence([room.seed, 17, 3, seed]))
    noise_pool = rng.standard_normal((room.height + 64, room.width + 64, 1), dtype=np.float32)
    order = sorted(range(len(room.seats)), key=lambda k: (room.seats[k].row, room.seats[k].col))
    empty = Script(fps=1.0, present=np.zeros((len(room.seats), 1), bool), label=np.zeros((len(room.seats), 1), np.int64),
                   yaw=np.zeros((len(room.seats), 1)), pitch=np.zeros((len(room.seats), 1)),
                   roll=np.zeros((len(room.seats), 1)))
    frame, _ = _compose(room, empty, 0, order, {}, _empty_room(room), _desk_rows(room), [], rng, noise_pool)
    return frame


def write_lesson(out_dir: Path, room: Room, script: Script, image_format: str = "png",
                 steps: list[int] | None = None) -> Path:
    """A lesson as a school would hand it to `fedfer classroom ingest`, plus what only the generator knows.

    frames/frame_NNNNN.<png|jpg>, seat_map.json, empty_room.png, labels.csv (frame,student_id,label for
    every face turned to the camera), and truth/: faces.jsonl (per frame, every drawn face) and
    script.npz (the per-student timelines: present, label, yaw, pitch, roll)."""
    import cv2

    out_dir = Path(out_dir)
    frames_dir, truth_dir = out_dir / "frames", out_dir / "truth"
    frames_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(exist_ok=True)
    suffix = ".jpg" if image_format in ("jpg", "jpeg") else ".png"
    label_rows = ["frame,student_id,label"]
    with open(truth_dir / "faces.jsonl", "w", encoding="utf-8") as faces_file:
        for t, frame, truths in render_lesson(room, script, steps):
            name = f"frame_{t:05d}{suffix}"
            cv2.imwrite(str(frames_dir / name), frame[:, :, ::-1])
            faces_file.write(json.dumps({"step": t, "frame": name, "faces": [f.to_json() for f in truths]}) + "\n")
            label_rows += [f"{name},{f.student_id},{f.label}" for f in truths if abs(f.yaw) <= TURN_YAW]
    (out_dir / "labels.csv").write_text("\n".join(label_rows) + "\n", encoding="utf-8")
    (out_dir / "seat_map.json").write_text(json.dumps(room.seat_map(), indent=1) + "\n", encoding="utf-8")
    cv2.imwrite(str(out_dir / "empty_room.png"), empty_frame(room)[:, :, ::-1])
    np.savez_compressed(truth_dir / "script.npz", students=np.array([s.student_id for s in room.seats]),
                        present=script.present, label=script.label, yaw=script.yaw, pitch=script.pitch,
                        roll=script.roll, fps=script.fps, hard_topic=np.array(script.hard_topic))
    return out_dir
