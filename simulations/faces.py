"""Draw one synthetic face from parameters: identity, action-unit intensities, pose, camera look.

Why procedural faces: no public FER dataset can be downloaded on the machines fedfer targets, yet the
demo, the tests and the privacy experiments need faces whose expression is carried by the *same*
local cues real expressions use (brow shape, lid aperture, nose wrinkles, mouth shape, folds), with
nuisance variation (identity, pose, light, camera, occluders) the model has to learn to ignore.

The geometry follows FACS: an expression is a vector of action-unit (AU) intensities in [0, 1]
(`AU_NAMES`); each AU moves the parts it moves in a real face (AU1 lifts the inner brow, AU12 pulls
the lip corners up and out, AU26 drops the jaw, ...). The mapping from the seven basic expressions to
AUs is `PROTOTYPES` (EMFACS, Ekman & Friesen 1978, e.g. happy = AU6+AU12); sampling partial and noisy
activations is the job of `simulations.synth`.

Everything is built in a canonical face frame (origin between the eyes' level and the nose bridge,
x to the image right, y down, one unit = half the face width), then moved by one pose transform
(yaw-like depth shift + horizontal squash, roll, scale, shift) and drawn with PIL ImageDraw on a 2x
canvas that is box-reduced (cheap anti-aliasing). Camera effects are numpy operations at the output
size. Landmarks follow the iBUG 68-point layout (0-16 jaw, 17-26 brows, 27-35 nose, 36-47 eyes,
48-67 lips) and are returned in output pixel coordinates (x, y).
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from shared_models.labels import FER7

# ------------------------------------------------------------------------------------------------
# Action units and the expression prototypes
# ------------------------------------------------------------------------------------------------

AU_NAMES: tuple[str, ...] = (
    "AU1",   # inner brow raiser
    "AU2",   # outer brow raiser
    "AU4",   # brow lowerer
    "AU5",   # upper lid raiser
    "AU6",   # cheek raiser
    "AU7",   # lid tightener
    "AU9",   # nose wrinkler
    "AU12",  # lip corner puller
    "AU15",  # lip corner depressor
    "AU16",  # lower lip depressor
    "AU17",  # chin raiser
    "AU20",  # lip stretcher
    "AU23",  # lip tightener
    "AU24",  # lip pressor
    "AU25",  # lips part (not in the prototypes; per-subject style, e.g. a toothy smile)
    "AU26",  # jaw drop
)
AU_INDEX: dict[str, int] = {name: i for i, name in enumerate(AU_NAMES)}
NUM_AUS = len(AU_NAMES)
# How far an AU intensity of 1 moves the face. Above 1 so that expressions read at 48-64 px, where the
# eyebrows and lip corners are only a few pixels (calibrated with simulations/calibrate_synth.py;
# history in docs/experiments.md).
EXPRESSION_GAIN = 2.4

# FACS prototypes (EMFACS; sources differ in the details) with typical apex intensities. The first-listed AUs of
# each class are its "core": synth never drops all of them, so a frame stays an instance of its
# label. Secondary values (< 0.5) are common companions (e.g. AU4 in disgust, AU17 in sadness) that
# make neighbouring classes overlap as they do in real data.
PROTOTYPES: dict[str, dict[str, float]] = {
    "angry": {"AU4": 1.0, "AU23": 0.8, "AU24": 0.6, "AU7": 0.8, "AU5": 0.5, "AU17": 0.3},
    "disgust": {"AU9": 1.0, "AU15": 0.6, "AU16": 0.4, "AU4": 0.4, "AU17": 0.3},
    "fear": {"AU20": 0.9, "AU1": 0.9, "AU4": 0.6, "AU2": 0.6, "AU5": 0.9, "AU7": 0.4, "AU26": 0.5, "AU25": 0.3},
    "happy": {"AU12": 1.0, "AU6": 0.8},
    "sad": {"AU15": 0.9, "AU1": 0.9, "AU4": 0.6, "AU17": 0.4},
    "surprise": {"AU26": 0.9, "AU1": 0.9, "AU2": 0.9, "AU5": 0.8, "AU25": 0.3},
    "neutral": {},
}
CORE_AUS: dict[str, tuple[str, ...]] = {
    "angry": ("AU4",),
    "disgust": ("AU9",),
    "fear": ("AU20", "AU1"),
    "happy": ("AU12",),
    "sad": ("AU15",),
    "surprise": ("AU26", "AU2"),
    "neutral": (),
}
assert set(PROTOTYPES) == set(FER7)


def prototype_vector(label: str) -> np.ndarray:
    """The prototype of a FER7 class as an AU intensity vector (float32, len NUM_AUS)."""
    vec = np.zeros(NUM_AUS, np.float32)
    for name, value in PROTOTYPES[label].items():
        vec[AU_INDEX[name]] = value
    return vec


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

RGB = tuple[float, float, float]

HAIR_STYLES: tuple[str, ...] = ("short", "long", "fringe", "buzz", "bun", "scarf")


@dataclass(frozen=True)
class Identity:
    """What stays fixed for one person. Lengths are in canonical units (1 = half the face width)."""

    face_w: float = 1.0          # half-width at the cheekbones
    chin_y: float = 1.25         # chin depth below the eye line
    jaw_p: float = 1.0           # contour exponent: < 1 square jaw, > 1 pointed
    jaw_taper: float = 0.12      # how much the contour narrows towards the chin
    skin: RGB = (214.0, 165.0, 125.0)
    hair: RGB = (40.0, 30.0, 25.0)
    hair_style: str = "short"
    hairline: float = -0.8       # y of the hairline at the centre
    eye_sep: float = 0.38        # half the distance between the eye centres
    eye_y: float = -0.15
    eye_size: float = 1.0
    tilt: float = 0.01           # outer eye corner height above the inner corner
    iris: RGB = (70.0, 45.0, 30.0)
    brow_y: float = -0.44
    brow_thick: float = 0.06
    brow_arch: float = 0.04
    brow_color: RGB = (45.0, 32.0, 25.0)
    nose_len: float = 1.0
    nose_w: float = 1.0
    mouth_y: float = 0.68
    mouth_w: float = 0.36        # half-width of the closed mouth
    lip_up: float = 0.055
    lip_lo: float = 0.07
    lip: RGB = (180.0, 95.0, 90.0)
    glasses: bool = False
    glasses_color: RGB = (30.0, 30.0, 35.0)
    glasses_size: float = 1.0
    shirt: RGB = (60.0, 80.0, 140.0)
    folds: float = 0.1           # baseline depth of the nasolabial folds (age, build)


@dataclass(frozen=True)
class Pose:
    """Head pose relative to the camera. yaw in radians (a depth-dependent shift plus squash)."""

    roll: float = 0.0
    yaw: float = 0.0
    scale: float = 1.0
    dx: float = 0.0              # shift as a fraction of the image side
    dy: float = 0.0
    pitch: float = 0.0           # radians, > 0 bows the head (chin down): a depth-dependent drop plus vertical squash


@dataclass(frozen=True)
class Look:
    """Lighting and camera for one frame (applied after drawing, at the output size)."""

    light_angle: float = 0.0     # direction the light comes from, radians (0 = from the image left)
    light: float = 0.0           # strength of the linear light gradient across the image
    exposure: float = 1.0
    gamma: float = 1.0
    contrast: float = 1.0
    cast: RGB = (1.0, 1.0, 1.0)  # per-channel gains (colour cast)
    mono: str = ""               # "" colour, "gray" grayscale, "ir" near-infrared-like grayscale
    blur: float = 0.0            # Gaussian sigma in output pixels
    noise: float = 0.0           # sensor noise sigma in [0, 1] intensity units
    jpeg: int = 0                # JPEG round-trip quality; 0 = none
    vignette: float = 0.0


@dataclass(frozen=True)
class Occlusion:
    """Something between the camera and the face: a hand or the edge of a book."""

    kind: str = "none"           # none | hand | book
    x: float = 0.0               # canonical position of the occluder's anchor
    y: float = 1.2
    angle: float = 0.0
    size: float = 1.0
    color: RGB = (230.0, 225.0, 210.0)


@dataclass(frozen=True)
class Background:
    """A seat's view of the classroom behind the head (drawn once per seat and reused)."""

    wall: RGB = (200.0, 200.0, 190.0)
    floor: RGB = (150.0, 140.0, 120.0)
    horizon: float = 0.75        # fraction of the height where the wall meets the furniture
    board: RGB | None = None     # a board/window/poster rectangle
    board_box: tuple[float, float, float, float] = (0.0, 0.0, 0.3, 0.3)
    others: tuple[tuple[float, float, float, RGB], ...] = ()   # (x, y, radius, colour) heads behind


@dataclass(frozen=True)
class Frame:
    """What changes from one frame of a person to the next."""

    aus: np.ndarray = field(default_factory=lambda: np.zeros(NUM_AUS, np.float32))
    pose: Pose = Pose()
    look: Look = Look()
    occlusion: Occlusion = Occlusion()
    gaze: tuple[float, float] = (0.0, 0.0)
    blink: float = 0.0           # 0 open ... 1 closed, independent of the AUs


NUM_LANDMARKS = 68
UNIT = 0.42   # one canonical unit (half a face width) as a fraction of the image side at pose scale 1
OCCLUDERS: tuple[str, ...] = ("none", "hand", "book")

# ------------------------------------------------------------------------------------------------
# Geometry helpers. Arrays carry a leading batch axis B (frames of one person) where a quantity
# varies per frame; (B, 1) columns broadcast against per-point rows (n,) to (B, n).
# ------------------------------------------------------------------------------------------------

_T9 = np.linspace(-1.0, 1.0, 9)
_T13 = np.linspace(-1.0, 1.0, 13)
_TT13 = 1.0 - _T13 ** 2
_V5 = np.linspace(0.0, 1.0, 5)
_CIRCLE16 = np.linspace(0.0, 2.0 * math.pi, 16, endpoint=False)
_CIRCLE24 = np.linspace(0.0, 2.0 * math.pi, 24, endpoint=False)
_COS16, _SIN16 = np.cos(_CIRCLE16), np.sin(_CIRCLE16)
_ANG17 = np.pi * (1.0 - np.linspace(0.0, 1.0, 17))     # jaw contour: pi (image left) ... 0 (image right)
_SA17 = np.sin(_ANG17)
_FANG13 = np.linspace(0.0, np.pi, 13)                  # forehead arc: image right ... image left
_CUPID = 1.0 - 0.3 * np.exp(-(_T13 / 0.18) ** 2)
_LINE5 = np.linspace(-1.0, 1.0, 5)


def _xy(x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
    return np.stack(np.broadcast_arrays(x, y), axis=-1)


def _ellipse(cx, cy, rx, ry, n: np.ndarray = _CIRCLE16) -> np.ndarray:  # type: ignore[no-untyped-def]
    return _xy(cx + rx * np.cos(n), cy + ry * np.sin(n))


def _mix(color: RGB, other: RGB, t: float) -> tuple[int, int, int]:
    """Integer RGB of (1-t)*color + t*other, t clipped to [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    return (int(color[0] + (other[0] - color[0]) * t), int(color[1] + (other[1] - color[1]) * t),
            int(color[2] + (other[2] - color[2]) * t))


def _shade(color: RGB, factor: float) -> tuple[int, int, int]:
    return (int(min(255.0, color[0] * factor)), int(min(255.0, color[1] * factor)),
            int(min(255.0, color[2] * factor)))


def _shade_b(color: RGB, factor: np.ndarray) -> np.ndarray:
    """Per-frame shade: factor (B,) -> colours (B, 3)."""
    return np.minimum(255.0, np.asarray(color)[None, :] * factor.reshape(-1, 1))


def _mix_b(color: RGB, other: RGB, t: np.ndarray) -> np.ndarray:
    t = np.clip(t.reshape(-1, 1), 0.0, 1.0)
    return np.asarray(color)[None, :] * (1.0 - t) + np.asarray(other)[None, :] * t


Color = tuple[int, int, int] | np.ndarray


class _Shapes:
    """Collects draw commands in canonical coordinates so one pose transform moves them all."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.points: list[np.ndarray] = []
        self.depths: list[np.ndarray] = []
        self.commands: list[tuple[str, int, int, object, float, list[bool] | None]] = []
        self.count = 0

    def full(self, pts: np.ndarray) -> np.ndarray:
        return np.broadcast_to(pts, (self.batch,) + pts.shape[-2:])

    def cat(self, *parts: np.ndarray) -> np.ndarray:
        return np.concatenate([self.full(p) for p in parts], axis=1)

    def pts(self, pairs: list[tuple[object, object]]) -> np.ndarray:
        """[(x, y), ...] of scalars or (B, 1) columns -> (B, n, 2)."""
        b = self.batch
        xs = np.concatenate([np.broadcast_to(np.reshape(x, (-1, 1)), (b, 1)) for x, _ in pairs], axis=1)
        ys = np.concatenate([np.broadcast_to(np.reshape(y, (-1, 1)), (b, 1)) for _, y in pairs], axis=1)
        return np.stack([xs, ys], axis=-1)

    def add(self, kind: str, pts: np.ndarray, depth: np.ndarray | float, color: Color, width: float = 0.0,
            visible: np.ndarray | None = None) -> None:
        pts = np.asarray(pts, dtype=np.float64)
        n = pts.shape[-2]
        self.points.append(self.full(pts))
        self.depths.append(np.broadcast_to(np.asarray(depth, dtype=np.float64), (n,)))
        if isinstance(color, np.ndarray):    # per-frame colours
            color = [tuple(c) for c in np.clip(color, 0, 255).astype(np.int64).tolist()]
        vis = None if visible is None else np.broadcast_to(visible, (self.batch,)).tolist()
        self.commands.append((kind, self.count, self.count + n, color, width, vis))
        self.count += n


class _Batch:
    """A list of Frames turned into arrays (one column per AU, one row per frame)."""

    def __init__(self, frames: list[Frame]) -> None:
        self.n = len(frames)
        aus = np.stack([np.asarray(f.aus, dtype=np.float64) for f in frames])
        if aus.shape[1] != NUM_AUS:
            raise ValueError(f"each frame needs {NUM_AUS} AU intensities ({', '.join(AU_NAMES)}), got {aus.shape[1]}")
        self.au = {name: EXPRESSION_GAIN * aus[:, i:i + 1] for name, i in AU_INDEX.items()}
        pose = np.array([[f.pose.roll, f.pose.yaw, f.pose.scale, f.pose.dx, f.pose.dy, f.pose.pitch] for f in frames])
        self.roll, self.yaw, self.scale, self.dx, self.dy, self.pitch = (pose[:, i:i + 1] for i in range(6))
        gz = np.array([[f.gaze[0], f.gaze[1], f.blink] for f in frames])
        self.gx, self.gy, self.blink = gz[:, 0:1], gz[:, 1:2], gz[:, 2:3]
        occ = np.array([[f.occlusion.x, f.occlusion.y, f.occlusion.angle, f.occlusion.size] for f in frames])
        self.occ_x, self.occ_y, self.occ_angle, self.occ_size = (occ[:, i] for i in range(4))
        self.occ_kind = np.array([f.occlusion.kind for f in frames])
        bad = set(self.occ_kind.tolist()) - set(OCCLUDERS)
        if bad:
            raise ValueError(f"unknown occlusion kind {sorted(bad)} (expected one of {', '.join(OCCLUDERS)})")
        self.occ_color = frames[0].occlusion.color
        self.looks = [f.look for f in frames]


# ------------------------------------------------------------------------------------------------
# The face model
# ------------------------------------------------------------------------------------------------


_AUs = dict[str, np.ndarray]    # AU name -> (B, 1) gained intensities (`_Batch.au`)


def _build(identity: Identity, batch: _Batch, shapes: _Shapes) -> None:
    """Emit the draw commands of one person's frames (back to front) and the 68 landmarks ('mark').

    Each step adds its shapes in drawing order (a later command paints over an earlier one), so the
    order of the calls below is part of the picture; steps return the geometry later parts attach to.
    """
    if identity.hair_style not in HAIR_STYLES:
        raise ValueError(f"unknown hair style '{identity.hair_style}' (expected one of {', '.join(HAIR_STYLES)})")
    au = batch.au
    mouth_opening = 0.34 * au["AU26"] + 0.1 * au["AU25"] + 0.06 * au["AU16"]         # (B, 1)
    jaw_drop = 0.7 * mouth_opening
    _draw_body_and_back_hair(identity, shapes)
    outline = _draw_face_outline(identity, jaw_drop, shapes)
    eyes = _draw_eyes(identity, batch, shapes)
    brow_marks = _draw_brows(identity, au, shapes)
    nose = _draw_nose(identity, au, shapes)
    mouth = _draw_mouth(identity, au, mouth_opening, jaw_drop, shapes)
    _draw_cheek_and_eye_folds(identity, au, eyes, nose, mouth, shapes)
    _draw_forehead_frown_and_chin_lines(identity, au, mouth, shapes)
    _draw_front_hair(identity, outline.top_y, shapes)
    _draw_glasses(identity, shapes)
    _draw_occluders(identity, batch, shapes)
    _add_landmarks(outline, brow_marks, nose, eyes, mouth, shapes)


@dataclass(frozen=True)
class _Outline:
    top_y: float                 # where the jaw contour meets the forehead arc
    jaw: np.ndarray              # (B, 17, 2), landmarks 0-16
    jaw_depth: np.ndarray        # (17,)


@dataclass(frozen=True)
class _Eyes:
    half_width: float            # eye centre to corner
    lower_lid: np.ndarray        # (B, 1) lower lid height below the eye line
    marks: dict[float, np.ndarray]   # side (-1 image left, +1 image right) -> (B, 6, 2)


@dataclass(frozen=True)
class _Nose:
    half_width: np.ndarray       # (B, 1) nostril wing half-width (AU9 widens it)
    nostril_y: np.ndarray        # (B, 1)
    bridge: np.ndarray           # (4, 2), landmarks 27-30
    bridge_depth: np.ndarray     # (4,)
    nostrils: np.ndarray         # (B, 5, 2), landmarks 31-35


@dataclass(frozen=True)
class _Mouth:
    half_width: np.ndarray       # (B, 1)
    x: np.ndarray                # (B, 13) x of the lip columns, corner to corner
    centre_line: np.ndarray      # (B, 13) where the lips meet when closed (corners raised or lowered)
    upper_inner: np.ndarray      # (B, 13) y of the four lip edges
    lower_inner: np.ndarray
    upper_outer: np.ndarray
    lower_outer: np.ndarray


def _over(au: _AUs, name: str, threshold: float) -> np.ndarray:
    """Per frame: is the AU strong enough for its wrinkle to show (the `visible` mask of a shape)."""
    return au[name][:, 0] > threshold


def _draw_body_and_back_hair(identity: Identity, shapes: _Shapes) -> None:
    """Shoulders, neck, the hair behind the head, and the ears (long hair and a scarf cover them)."""
    skin, style, face_w = identity.skin, identity.hair_style, identity.face_w
    shapes.add("poly", _ellipse(0.0, 2.45, 2.0, 0.85, _CIRCLE24), -0.3, _shade(identity.shirt, 1.0))
    neck = np.array([[-0.42, 0.6], [0.42, 0.6], [0.46, 1.75], [0.0, 1.95], [-0.46, 1.75]])
    shapes.add("poly", neck, -0.2, _shade(skin, 0.82))
    if style == "long":
        back = np.concatenate([_ellipse(0.0, -0.25, face_w * 1.14, 1.12, _CIRCLE24)[12:],   # upper half
                               np.array([[face_w * 1.2, 0.4], [face_w * 1.22, 1.45], [-face_w * 1.22, 1.45],
                                         [-face_w * 1.2, 0.4]])])
        shapes.add("poly", back, -0.25, _shade(identity.hair, 0.85))
    elif style == "scarf":
        shapes.add("poly", _ellipse(0.0, 0.15, face_w * 1.28, 1.55, _CIRCLE24), -0.25, _shade(identity.hair, 1.0))
    elif style == "bun":
        shapes.add("poly", _ellipse(0.0, -1.3, 0.38, 0.3), -0.25, _shade(identity.hair, 0.9))
    if style not in ("long", "scarf"):
        for side in (-1.0, 1.0):
            shapes.add("poly", _ellipse(side * face_w * 0.98, identity.eye_y + 0.17, 0.13, 0.22), 0.0,
                       _shade(skin, 0.93))


def _draw_face_outline(identity: Identity, jaw_drop: np.ndarray, shapes: _Shapes) -> _Outline:
    """The face skin: the jaw contour (landmarks 0-16; the chin follows the jaw drop) closed by the forehead."""
    face_w = identity.face_w
    top_y = identity.eye_y + 0.02
    jaw_x = face_w * np.cos(_ANG17) * (1.0 - identity.jaw_taper * _SA17 ** 4)
    jaw_y = top_y + (identity.chin_y - top_y) * _SA17 ** identity.jaw_p + jaw_drop * _SA17 ** 3
    jaw = _xy(jaw_x, jaw_y)                                                  # (B, 17, 2)
    jaw_depth = 0.45 * np.sqrt(np.clip(1.0 - (jaw_x / face_w) ** 2, 0.0, 1.0))
    forehead = _xy(face_w * 0.99 * np.cos(_FANG13), top_y - 1.12 * np.sin(_FANG13) ** 0.8)
    forehead_depth = 0.45 * np.sqrt(np.clip(1.0 - (forehead[:, 0] / face_w) ** 2, 0.0, 1.0))
    shapes.add("poly", shapes.cat(jaw, forehead), np.concatenate([jaw_depth, forehead_depth]),
               _shade(identity.skin, 1.0))
    return _Outline(top_y, jaw, jaw_depth)


def _draw_eyes(identity: Identity, batch: _Batch, shapes: _Shapes) -> _Eyes:
    """Both eyes (landmarks 36-47): white, iris and pupil following the gaze, lids, crease and lashes.

    The lid aperture carries AU5 (wider), AU6/AU7/AU9 (narrower) and the blink; the crease closes onto the lid as
    AU5 lifts the upper lid.
    """
    au, skin = batch.au, identity.skin
    half_width = 0.16 * identity.eye_size
    opening = 1.0 - batch.blink
    upper_lid = 0.085 * identity.eye_size * opening * np.maximum(
        0.04, 1.0 + 0.8 * au["AU5"] - 0.55 * au["AU7"] - 0.3 * au["AU6"] - 0.2 * au["AU4"] - 0.35 * au["AU9"])
    lower_lid = 0.05 * identity.eye_size * opening * np.maximum(
        0.04, 1.0 - 0.6 * au["AU6"] - 0.5 * au["AU7"] + 0.2 * au["AU5"] - 0.2 * au["AU9"])
    along = _T9                                               # -1 outer corner ... +1 inner corner
    crease_off = 0.03 + 0.03 * np.maximum(0.0, 1.0 - 1.2 * au["AU5"])           # (B, 1)
    crease_shift = np.stack([np.zeros_like(crease_off), crease_off], axis=-1)  # (B, 1, 2)
    marks: dict[float, np.ndarray] = {}
    iris_r = 0.068 * identity.eye_size
    for side in (-1.0, 1.0):
        centre_x, centre_y = side * identity.eye_sep, identity.eye_y
        x = centre_x - side * half_width * along
        lid_line_y = centre_y - identity.tilt * (1.0 - along) / 2.0
        upper = _xy(x, lid_line_y - upper_lid * ((1.0 - along * along) ** 0.8 * (1.0 + 0.12 * along)))  # (B, 9, 2)
        lower = _xy(x, lid_line_y + lower_lid * (1.0 - along * along) ** 0.9)
        shapes.add("poly", shapes.cat(upper, lower[:, ::-1]), 0.35, (238, 236, 230))
        iris_x, iris_y = centre_x + batch.gx * half_width * 0.35, centre_y - 0.008 + batch.gy * 0.02
        shapes.add("poly", _ellipse(iris_x, iris_y, iris_r, iris_r), 0.36, _shade(identity.iris, 1.0))
        shapes.add("poly", _ellipse(iris_x, iris_y, iris_r * 0.45, iris_r * 0.45), 0.37, (15, 10, 10))
        shapes.add("poly", shapes.cat(upper, (upper - [0.0, 0.11])[:, ::-1]), 0.38, _shade(skin, 0.96))
        shapes.add("poly", shapes.cat(lower, (lower + [0.0, 0.08])[:, ::-1]), 0.38, _shade(skin, 1.0))
        shapes.add("line", upper[:, 2:8] - crease_shift, 0.38, _shade(skin, 0.78), 0.014)
        shapes.add("line", upper, 0.39, (25, 18, 18), 0.03)
        shapes.add("line", lower, 0.39, _shade(skin, 0.7), 0.01)
        if side < 0:   # image-left eye: 36 outer, 37/38 upper, 39 inner, 40/41 lower
            marks[side] = np.stack([upper[:, 0], upper[:, 2], upper[:, 6], upper[:, 8], lower[:, 6], lower[:, 2]],
                                   axis=1)
        else:          # image-right eye: 42 inner, 43/44 upper, 45 outer, 46/47 lower
            marks[side] = np.stack([upper[:, 8], upper[:, 6], upper[:, 2], upper[:, 0], lower[:, 2], lower[:, 6]],
                                   axis=1)
    return _Eyes(half_width, lower_lid, marks)


def _draw_brows(identity: Identity, au: _AUs, shapes: _Shapes) -> dict[float, np.ndarray]:
    """Both brows; returns their centre lines (landmarks 17-21 and 22-26) by side.

    AU1 lifts the inner end, AU2 the outer end, AU4 lowers and pulls them together (AU9, AU6, AU7 a little).
    """
    along = _V5                                               # 0 inner end ... 1 outer end
    marks: dict[float, np.ndarray] = {}
    thickness = identity.brow_thick * (1.05 - 0.45 * along)
    brow_y = (identity.brow_y - identity.brow_arch * 4.0 * along * (1.0 - along)
              - 0.17 * au["AU1"] * (1.0 - along) ** 1.5 - 0.17 * au["AU2"] * along ** 1.2
              + 0.12 * au["AU4"] * (1.0 - 0.45 * along) + 0.04 * au["AU9"] * (1.0 - along) + 0.02 * au["AU6"] * along
              + 0.015 * au["AU7"])
    brow_x_abs = (0.1 + 0.52 * along + (0.055 * au["AU4"] + 0.02 * au["AU9"]) * (along - 1.0)) * identity.face_w
    for side in (-1.0, 1.0):
        brow_x = side * brow_x_abs
        shapes.add("poly", shapes.cat(_xy(brow_x, brow_y - thickness / 2), _xy(brow_x, brow_y + thickness / 2)[:, ::-1]),
                   0.42, _shade(identity.brow_color, 1.0))
        centre = _xy(brow_x, brow_y)
        # iBUG order: 17..21 run outer -> inner on the image-left brow, 22..26 inner -> outer
        marks[side] = centre[:, ::-1] if side < 0 else centre
    return marks


def _draw_nose(identity: Identity, au: _AUs, shapes: _Shapes) -> _Nose:
    """Nose sides, tip, nostrils and wings, and the bridge wrinkles of AU9 (which also widens and lifts the wings)."""
    skin = identity.skin
    tip_y = 0.3 * identity.nose_len + 0.02
    half_width = 0.15 * identity.nose_w * (1.0 + 0.25 * au["AU9"])                # (B, 1)
    nostril_y = tip_y + 0.07 - 0.04 * au["AU9"]
    bridge = _xy(np.zeros(4), np.linspace(identity.eye_y - 0.02, tip_y, 4))
    bridge_depth = np.linspace(0.55, 1.0, 4)
    nostrils = _xy(half_width * _LINE5, nostril_y + np.array([-0.02, 0.01, 0.025, 0.01, -0.02]))
    for side, shade, width in ((1.0, 0.88, 0.022), (-1.0, 0.9, 0.018)):
        flank = shapes.pts([(side * 0.07, identity.eye_y + 0.08), (side * 0.09, tip_y - 0.05),
                            (side * half_width * 1.05, nostril_y - 0.03)])
        shapes.add("line", flank, 0.7, _shade(skin, shade), width)
    shapes.add("poly", _ellipse(0.0, tip_y + 0.01, half_width * 0.55, 0.06), 0.95, _shade(skin, 1.04))
    for side in (-1.0, 1.0):
        shapes.add("poly", _ellipse(side * half_width * 0.5, nostril_y + 0.005, 0.045 * identity.nose_w, 0.022), 0.8,
                   _shade(skin, 0.42))
        wing = shapes.pts([(side * half_width * 0.55, nostril_y - 0.08), (side * half_width * 1.05, nostril_y - 0.045),
                           (side * half_width, nostril_y + 0.01)])
        shapes.add("line", wing, 0.75, _shade(skin, 0.78), 0.018)
    wrinkle_visible = _over(au, "AU9", 0.05)
    wrinkle_color = _shade_b(skin, 1.0 - 0.65 * au["AU9"][:, 0])
    for i in range(3):
        wrinkle_y = identity.eye_y + 0.05 + 0.055 * i
        wrinkle = np.array([[-0.1, wrinkle_y + 0.012], [0.0, wrinkle_y - 0.012], [0.1, wrinkle_y + 0.012]])
        shapes.add("line", wrinkle, 0.6, wrinkle_color, 0.036, wrinkle_visible)
    return _Nose(half_width, nostril_y, bridge, bridge_depth, nostrils)


def _draw_mouth(identity: Identity, au: _AUs, opening: np.ndarray, jaw_drop: np.ndarray, shapes: _Shapes) -> _Mouth:
    """Lips, and when open the mouth cavity and teeth; a closed mouth gets the line between the lips.

    AU12/AU20 widen and (AU12) lift the corners, AU15 lowers them, AU23/AU24 thin the lips, AU16
    lowers the lower lip, AU17 pushes it up; the opening comes from AU25/AU26/AU16 (`_build`).
    """
    lip = identity.lip
    half_width = identity.mouth_w * np.maximum(0.6, 1.0 + 0.22 * au["AU12"] + 0.28 * au["AU20"] - 0.2 * au["AU23"]
                                               - 0.1 * au["AU24"] - 0.08 * au["AU26"] - 0.04 * au["AU15"])
    mouth_y = identity.mouth_y - 0.02 * au["AU17"] + 0.075 * jaw_drop
    corner_dy = -0.17 * au["AU12"] + 0.18 * au["AU15"] + 0.03 * au["AU20"] + 0.04 * au["AU16"]
    along, middle = _T13, _TT13           # -1 ... +1 corner to corner; 1 - along² (1 in the middle, 0 at corners)
    centre_line = mouth_y + corner_dy * np.abs(along) ** 1.6                  # (B, 13)
    gap = opening * middle ** 0.6
    upper_inner = centre_line - 0.3 * gap - (0.08 * au["AU9"] + 0.02 * au["AU20"]) * middle
    lower_inner = np.maximum(centre_line + 0.7 * gap + 0.07 * au["AU16"] * middle ** 0.7 - 0.025 * au["AU17"] * middle,
                             upper_inner)
    upper_thickness = identity.lip_up * np.maximum(0.25, 1.0 - 0.55 * au["AU24"] - 0.45 * au["AU23"] - 0.2 * au["AU12"]
                                                   - 0.25 * au["AU20"])
    lower_thickness = identity.lip_lo * np.maximum(0.3, 1.0 - 0.5 * au["AU24"] - 0.4 * au["AU23"] + 0.3 * au["AU17"]
                                                   - 0.2 * au["AU20"])
    upper_outer = upper_inner - upper_thickness * middle ** 0.5 * _CUPID - 0.008
    lower_outer = lower_inner + lower_thickness * middle ** 0.5
    x = half_width * along                                                   # (B, 13)
    lip_depth = 0.55 - 0.1 * np.abs(along)
    shapes.add("poly", shapes.cat(_xy(x, upper_outer), _xy(x, lower_outer)[:, ::-1]),
               np.concatenate([lip_depth, lip_depth[::-1]]), _shade(lip, 1.0))
    inner_gap = np.max(lower_inner - upper_inner, axis=1)
    is_open = inner_gap > 0.012
    shapes.add("poly", shapes.cat(_xy(x, upper_inner), _xy(x, lower_inner)[:, ::-1]), 0.5, (60, 20, 25), visible=is_open)
    teeth_bottom = np.minimum(upper_inner + 0.07 + 0.03 * au["AU12"], lower_inner)
    shapes.add("poly", shapes.cat(_xy(x * 0.9, upper_inner), _xy(x * 0.9, teeth_bottom)[:, ::-1]), 0.51,
               (235, 232, 222), visible=is_open)
    lower_teeth = is_open & ((au["AU16"] + au["AU20"])[:, 0] > 0.4) & (inner_gap > 0.06)
    lower_teeth_top = np.maximum(lower_inner - 0.04 * (au["AU16"] + au["AU20"]), teeth_bottom)
    shapes.add("poly", shapes.cat(_xy(x * 0.8, lower_teeth_top), _xy(x * 0.8, lower_inner)[:, ::-1]), 0.51,
               (225, 222, 212), visible=lower_teeth)
    shapes.add("line", _xy(x, (upper_inner + lower_inner) / 2), 0.52, _shade(lip, 0.5), 0.032, ~is_open)
    return _Mouth(half_width, x, centre_line, upper_inner, lower_inner, upper_outer, lower_outer)


def _draw_cheek_and_eye_folds(identity: Identity, au: _AUs, eyes: _Eyes, nose: _Nose, mouth: _Mouth,
                              shapes: _Shapes) -> None:
    """Per side: the nasolabial fold (deepened by AU12/AU6/AU9/AU20), the line below the lip corner (AU15),
    and AU6's crow's feet, eye bag and raised cheek."""
    skin = identity.skin
    fold_strength = np.minimum(1.0, identity.folds + 0.6 * au["AU12"] + 0.25 * au["AU6"] + 0.5 * au["AU9"]
                               + 0.2 * au["AU20"])[:, 0]
    fold_color = _shade_b(skin, 1.0 - 0.4 * fold_strength)
    cheek_raise = au["AU6"][:, 0]
    cheek_raised = cheek_raise > 0.15
    corner_y = mouth.centre_line[:, :1]
    for side in (-1.0, 1.0):
        fold = shapes.pts([(side * (nose.half_width + 0.04), nose.nostril_y - 0.05),
                           (side * (nose.half_width + 0.12 + 0.06 * au["AU12"]), (nose.nostril_y + corner_y + 0.07) / 2),
                           (side * (mouth.half_width + 0.06), corner_y + 0.07)])
        shapes.add("line", fold, 0.5, fold_color, 0.03, fold_strength > 0.08)
        marionette = shapes.pts([(side * (mouth.half_width + 0.01), corner_y + 0.03),
                                 (side * (mouth.half_width + 0.03), corner_y + 0.16)])
        shapes.add("line", marionette, 0.5, _shade_b(skin, 1.0 - 0.4 * au["AU15"][:, 0]), 0.026, _over(au, "AU15", 0.2))
        crow_x = side * (identity.eye_sep + eyes.half_width + 0.03)
        for dy in (-0.03, 0.0, 0.035):
            crow_foot = np.array([[crow_x, identity.eye_y + dy * 0.5], [crow_x + side * 0.07, identity.eye_y + dy * 1.6]])
            shapes.add("line", crow_foot, 0.3, _shade_b(skin, 1.0 - 0.35 * cheek_raise), 0.022, cheek_raised)
        bag = _xy(side * identity.eye_sep - side * eyes.half_width * _T9[1:-1] * 0.8,
                  identity.eye_y + eyes.lower_lid + 0.04 - 0.03 * au["AU6"])
        shapes.add("line", bag, 0.38, _shade_b(skin, 1.0 - 0.3 * cheek_raise), 0.024, cheek_raised)
        shapes.add("poly", _ellipse(side * 0.45, identity.eye_y + 0.3 - 0.06 * au["AU6"], 0.16, 0.1), 0.45,
                   _mix_b(skin, (235.0, 140.0, 130.0), 0.18 * cheek_raise), visible=cheek_raised)


def _draw_forehead_frown_and_chin_lines(identity: Identity, au: _AUs, mouth: _Mouth, shapes: _Shapes) -> None:
    """Forehead lines (AU1/AU2; AU2 spreads them outwards), the vertical frown lines between the brows
    (AU4) and the chin crease below the lower lip (AU17)."""
    skin = identity.skin
    brow_raise = (au["AU1"] + au["AU2"])[:, 0]
    line_darkness = np.minimum(1.0, 0.55 * brow_raise)
    half_length = 0.18 + 0.3 * au["AU2"] / (au["AU1"] + au["AU2"] + 1e-6)              # (B, 1)
    for i in range(3):
        line_y = identity.brow_y - 0.2 - 0.075 * i
        shapes.add("line", _xy(_LINE5 * half_length, line_y + 0.02 * _LINE5 ** 2), 0.45,
                   _shade_b(skin, 1.0 - 0.35 * line_darkness), 0.024, brow_raise > 0.25)
    for side in (-1.0, 1.0):
        frown = np.array([[side * 0.05, identity.brow_y - 0.05], [side * 0.04, identity.brow_y + 0.1]])
        shapes.add("line", frown, 0.5, _shade_b(skin, 1.0 - 0.45 * au["AU4"][:, 0]), 0.028, _over(au, "AU4", 0.15))
    chin_y = np.max(mouth.lower_outer, axis=1, keepdims=True) + 0.09
    chin = shapes.pts([(-0.12, chin_y + 0.02), (0.0, chin_y - 0.015), (0.12, chin_y + 0.02)])
    shapes.add("line", chin, 0.5, _shade_b(skin, 1.0 - 0.4 * au["AU17"][:, 0]), 0.028, _over(au, "AU17", 0.2))


def _draw_front_hair(identity: Identity, top_y: float, shapes: _Shapes) -> None:
    """The hair over the forehead (a cap down to the hairline, jagged for a fringe), or the scarf's band."""
    style, face_w = identity.hair_style, identity.face_w
    if style == "scarf":
        band = np.concatenate([_xy(face_w * 1.02 * np.cos(_FANG13), top_y - 1.14 * np.sin(_FANG13) ** 0.8 - 0.04),
                               _xy(face_w * 1.02 * np.cos(_FANG13[::-1]), np.full(13, identity.hairline + 0.05))])
        shapes.add("poly", band, 0.5, _shade(identity.hair, 1.0))
        return
    cap_height = 1.2 if style != "buzz" else 1.14
    outer_arc = _xy(face_w * 1.06 * np.cos(_FANG13), top_y - cap_height * np.sin(_FANG13) ** 0.75)
    hairline_x = np.linspace(face_w * 1.02, -face_w * 1.02, 11)
    hairline_y = identity.hairline + (top_y - 0.25 - identity.hairline) * (np.abs(hairline_x) / face_w) ** 2.5
    if style == "fringe":
        hairline_y = hairline_y + 0.035 * np.where(np.arange(11) % 2 == 0, 1.0, -1.0)
    cap = np.concatenate([np.array([[face_w * 1.06, top_y - 0.1]]), outer_arc[1:],
                          np.array([[-face_w * 1.06, top_y - 0.1]]), _xy(hairline_x, hairline_y)[::-1]])
    color = _mix(identity.hair, identity.skin, 0.45) if style == "buzz" else _shade(identity.hair, 1.0)
    shapes.add("poly", cap, 0.45, color)


def _draw_glasses(identity: Identity, shapes: _Shapes) -> None:
    """Two rims, two arms to the ears and the bridge, if the person wears glasses."""
    if not identity.glasses:
        return
    size, eye_sep, eye_y = identity.glasses_size, identity.eye_sep, identity.eye_y
    color = _shade(identity.glasses_color, 1.0)
    for side in (-1.0, 1.0):
        rim = _ellipse(side * eye_sep, eye_y + 0.01, 0.21 * size, 0.14 * size)
        shapes.add("line", np.concatenate([rim, rim[:1]]), 0.6, color, 0.025)
        arm = np.array([[side * (eye_sep + 0.21 * size), eye_y], [side * identity.face_w * 0.98, eye_y - 0.02]])
        shapes.add("line", arm, 0.4, color, 0.025)
    bridge = np.array([[-(eye_sep - 0.21 * size), eye_y], [0.0, eye_y - 0.03], [eye_sep - 0.21 * size, eye_y]])
    shapes.add("line", bridge, 0.65, color, 0.025)


def _draw_occluders(identity: Identity, batch: _Batch, shapes: _Shapes) -> None:
    """A hand (palm and four fingers) or a book held in front of the face, per frame, placed and turned
    by the frame's occlusion; frames without one hide these shapes."""
    cos_a, sin_a = np.cos(batch.occ_angle), np.sin(batch.occ_angle)
    rotation = np.stack([np.stack([cos_a, -sin_a], -1), np.stack([sin_a, cos_a], -1)], 1)     # (B, 2, 2)
    offset = np.stack([batch.occ_x, batch.occ_y], -1)[:, None, :]

    def place(local: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
        """Occluder-local points -> face frame: scale, turn by the frame's angle, move to its position."""
        return np.einsum("bnj,bij->bni", shapes.full(local) * np.reshape(scale, (-1, 1, 1)), rotation) + offset

    hand = batch.occ_kind == "hand"
    if hand.any():
        color = _shade(identity.skin, 0.95)
        shapes.add("poly", place(_ellipse(0.0, 0.0, 0.32, 0.38), batch.occ_size), 1.2, color, visible=hand)
        for i, finger_x in enumerate((-0.22, -0.07, 0.08, 0.22)):
            length = (0.42, 0.5, 0.47, 0.38)[i]
            finger = place(np.array([[finger_x, -0.2], [finger_x * 1.1, -0.2 - length]]), batch.occ_size)
            shapes.add("line", finger, 1.25, color, 0.13, hand)
    book = batch.occ_kind == "book"
    if book.any():
        rect = shapes.full(np.array([[-2.4, 0.0], [2.4, 0.0], [2.4, 3.0], [-2.4, 3.0]])) * np.stack(
            [batch.occ_size, np.ones_like(batch.occ_size)], -1)[:, None, :]
        rect = place(rect)
        shapes.add("poly", rect, 1.3, _shade(batch.occ_color, 1.0), visible=book)
        shapes.add("line", rect[:, :2] + [0.0, 0.06], 1.3, _shade(batch.occ_color, 0.75), 0.03, book)


def _add_landmarks(outline: _Outline, brow_marks: dict[float, np.ndarray], nose: _Nose, eyes: _Eyes, mouth: _Mouth,
                   shapes: _Shapes) -> None:
    """The 68 iBUG landmarks as a 'mark' command: moved by the pose like the shapes, never drawn."""
    x = mouth.x
    outer_i = [0, 2, 4, 6, 8, 10, 12]
    lower_i = [10, 8, 6, 4, 2]
    mouth_outer = np.concatenate([_xy(x[:, outer_i], mouth.upper_outer[:, outer_i]),
                                  _xy(x[:, lower_i], mouth.lower_outer[:, lower_i])], axis=1)
    mouth_inner = np.concatenate([_xy(x[:, [1, 4, 6, 8, 11]], mouth.upper_inner[:, [1, 4, 6, 8, 11]]),
                                  _xy(x[:, [8, 6, 4]], mouth.lower_inner[:, [8, 6, 4]])], axis=1)
    marks = shapes.cat(outline.jaw, brow_marks[-1.0], brow_marks[1.0], nose.bridge, nose.nostrils, eyes.marks[-1.0],
                       eyes.marks[1.0], mouth_outer, mouth_inner)
    depth = np.concatenate([outline.jaw_depth, np.full(10, 0.42), nose.bridge_depth, np.full(5, 0.8), np.full(12, 0.35),
                            np.full(20, 0.55)])
    shapes.add("mark", marks, depth, (0, 0, 0))


# ------------------------------------------------------------------------------------------------
# Backgrounds
# ------------------------------------------------------------------------------------------------


def draw_background(bg: Background, canvas: int) -> Image.Image:
    """Wall, furniture, a board/window and blurred heads of other students, at canvas size."""
    img = Image.new("RGB", (canvas, canvas), _shade(bg.wall, 1.0))
    d = ImageDraw.Draw(img)
    h = int(bg.horizon * canvas)
    step = max(1, canvas // 16)
    for i in range(0, canvas, step):            # a soft vertical wall gradient
        d.rectangle((0, i, canvas, i + step), fill=_shade(bg.wall, 1.06 - 0.12 * i / canvas))
    d.rectangle((0, h, canvas, canvas), fill=_shade(bg.floor, 1.0))
    if bg.board is not None:
        x0, y0, x1, y1 = (v * canvas for v in bg.board_box)
        d.rectangle((x0, y0, x1, y1), fill=_shade(bg.board, 1.0), outline=_shade(bg.board, 0.7), width=max(1, canvas // 60))
    for x, y, r, col in bg.others:
        d.ellipse(((x - r) * canvas, (y - r) * canvas, (x + r) * canvas, (y + 1.3 * r) * canvas), fill=_shade(col, 1.0))
    return img.filter(ImageFilter.BoxBlur(max(1, canvas // 40)))


# ------------------------------------------------------------------------------------------------
# The renderer
# ------------------------------------------------------------------------------------------------


class Renderer:
    """Draws faces at one output size. Holds the per-size grids and a noise pool.

    Frames are drawn in batches of one person: the face geometry is computed once for the batch with
    numpy (tiny per-frame arrays would spend their time in numpy call overhead), then each frame is
    drawn with a few dozen ImageDraw calls. The noise pool is why a renderer takes a seed: fresh
    Gaussian noise per image costs as much as drawing the face, so each frame takes a random window
    of one pre-drawn noise field.
    """

    SUPERSAMPLE = 2

    def __init__(self, size: int, seed: int = 0) -> None:
        if size < 16:
            raise ValueError(f"image size must be at least 16 pixels, got {size}")
        self.size = size
        self.canvas = size * self.SUPERSAMPLE
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        self._gx = (xs / (size - 1)) * 2.0 - 1.0
        self._gy = (ys / (size - 1)) * 2.0 - 1.0
        self._r2 = self._gx ** 2 + self._gy ** 2
        self._noise = np.random.default_rng(seed).standard_normal((size * 3, size * 3, 3), dtype=np.float32)
        self._plain_bg = Image.new("RGB", (self.canvas, self.canvas), (128, 128, 128))

    def render(self, identity: Identity, frame: Frame, rng: np.random.Generator,
               background: Image.Image | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One frame: (uint8 image (S, S, 3), float32 landmarks (68, 2) in pixels)."""
        images, marks = self.render_batch(identity, [frame], rng, background)
        return images[0], marks[0]

    def render_batch(self, identity: Identity, frames: list[Frame], rng: np.random.Generator,
                     background: Image.Image | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Frames of one person: (uint8 images (B, S, S, 3), float32 landmarks (B, 68, 2) in pixels, x then y)."""
        if not frames:
            return np.zeros((0, self.size, self.size, 3), np.uint8), np.zeros((0, NUM_LANDMARKS, 2), np.float32)
        fr = _Batch(frames)
        sh = _Shapes(fr.n)
        _build(identity, fr, sh)
        px = self._transform(np.concatenate(sh.points, axis=1), np.concatenate(sh.depths), fr)
        base = self._plain_bg if background is None else background
        images = np.empty((fr.n, self.size, self.size, 3), np.uint8)
        marks = np.empty((fr.n, NUM_LANDMARKS, 2), np.float32)
        units = (self.canvas * UNIT * fr.scale[:, 0]).tolist()
        inks: dict[tuple[int, int, int], int] = {}
        for b in range(fr.n):
            img = base.copy()
            # The core drawing object of ImageDraw (what .polygon/.line call after converting the colour):
            # calling it with pre-converted inks halves the per-shape cost, which dominates drawing.
            core = ImageDraw.Draw(img).draw
            flat = px[b].ravel().tolist()
            unit = units[b]
            for kind, i0, i1, color, width, vis in sh.commands:
                if vis is not None and not vis[b]:
                    continue
                col = color if isinstance(color, tuple) else color[b]   # type: ignore[index]
                ink = inks.get(col)
                if ink is None:
                    ink = inks[col] = core.draw_ink(col)
                if kind == "poly":
                    core.draw_polygon(flat[2 * i0:2 * i1], ink, 1)
                elif kind == "line":
                    core.draw_lines(flat[2 * i0:2 * i1], ink, max(1, int(width * unit + 0.5)))
                else:   # landmarks
                    marks[b] = px[b, i0:i1] / self.SUPERSAMPLE
            images[b] = self._camera(img.reduce(self.SUPERSAMPLE), fr.looks[b], rng)
        return images, marks

    def _transform(self, pts: np.ndarray, depth: np.ndarray, fr: _Batch) -> np.ndarray:
        """Canonical (B, N, 2) -> canvas pixels: yaw and pitch as depth-dependent shifts plus squashes, then
        roll, scale and shift (one affine map per frame). At pitch 0 the y rows are unchanged bit for bit."""
        x = pts[..., 0] * np.cos(fr.yaw) + depth[None, :] * np.sin(fr.yaw)
        y = pts[..., 1]
        if np.any(fr.pitch != 0.0):
            # a bowed head: points in front of the face plane (nose, brows) drop, the face shortens
            y = y * np.cos(fr.pitch) + depth[None, :] * np.sin(fr.pitch)
        cr, sr = np.cos(fr.roll), np.sin(fr.roll)
        s = self.canvas * UNIT * fr.scale
        ox = self.canvas * (0.5 + fr.dx)
        oy = self.canvas * (0.416 + fr.dy)
        return np.stack([ox + s * (cr * x - sr * y), oy + s * (sr * x + cr * y)], axis=-1)

    def _camera(self, img: Image.Image, look: Look, rng: np.random.Generator) -> np.ndarray:
        """Blur, light gradient, vignette, colour cast or grayscale/IR, contrast, noise, gamma, JPEG.

        Works in 0..255 floats with the gains folded into one map (a few whole-image operations per
        frame); gamma is applied after quantisation through a 256-entry table (the sensor adds noise
        before the camera's tone curve, and a table is much cheaper than a float power)."""
        if look.blur > 0.3:
            img = img.filter(ImageFilter.GaussianBlur(look.blur))
        arr = np.asarray(img, dtype=np.float32)
        gain = (look.light * -math.cos(look.light_angle)) * self._gx + (look.light * -math.sin(look.light_angle)) * self._gy
        gain += 1.0
        if look.vignette > 0:
            gain -= look.vignette * self._r2
        gain *= look.exposure * look.contrast
        offset = 127.5 * (1.0 - look.contrast) + 0.5            # + 0.5 rounds on the cast to uint8
        if look.mono:
            w = (0.30, 0.59, 0.11) if look.mono == "gray" else (0.55, 0.35, 0.10)   # IR: skin reads bright
            out = arr @ np.asarray(w, np.float32)
            out *= gain
        else:
            out = arr * (gain[:, :, None] * np.asarray(look.cast, np.float32))
        out += offset
        if look.noise > 0:
            n = self.size
            oy, ox = rng.integers(0, 2 * n, size=2)
            patch = self._noise[oy:oy + n, ox:ox + n, 0] if look.mono else self._noise[oy:oy + n, ox:ox + n]
            out += (255.0 * look.noise) * patch
        np.clip(out, 0.0, 255.0, out=out)
        out8 = out.astype(np.uint8)
        if abs(look.gamma - 1.0) > 0.02:
            out8 = _gamma_table(look.gamma)[out8]
        if look.mono:
            out8 = np.repeat(out8[:, :, None], 3, axis=2)
        if look.jpeg > 0:
            buf = io.BytesIO()
            Image.fromarray(out8).save(buf, "JPEG", quality=int(look.jpeg))
            buf.seek(0)
            out8 = np.asarray(Image.open(buf).convert("RGB"))
        return out8


_GAMMA_TABLES: dict[float, np.ndarray] = {}


def _gamma_table(gamma: float) -> np.ndarray:
    key = round(gamma, 2)
    table = _GAMMA_TABLES.get(key)
    if table is None:
        table = np.round(255.0 * (np.arange(256) / 255.0) ** key).astype(np.uint8)
        _GAMMA_TABLES[key] = table
    return table


# ------------------------------------------------------------------------------------------------
# Writing PNGs fast
# ------------------------------------------------------------------------------------------------


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    """uint8 (H, W, 3) or (H, W) -> PNG bytes (8-bit RGB or grayscale, 'Sub' filter, Huffman-only deflate).

    Why not PIL: its PNG encoder costs 0.3-0.5 ms for a 64x64 face here, a third of the whole
    per-image budget of the generator. 'Sub' residuals of these noisy images compress as well with
    Huffman-only deflate as with LZ77 matching (within 3%), at half the time; the result is a standard
    PNG any reader opens (a test decodes it with PIL).
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"encode_png expects uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    ch = 1 if image.ndim == 2 else 3
    rows = image.reshape(h, w * ch)
    raw = np.empty((h, w * ch + 1), np.uint8)
    raw[:, 0] = 1                                   # filter type 1 (Sub) on every row
    raw[:, 1:1 + ch] = rows[:, :ch]
    np.subtract(rows[:, ch:], rows[:, :-ch], out=raw[:, 1 + ch:])   # uint8 wrap-around is what PNG wants
    header = struct.pack(">IIBBBBB", w, h, 8, 2 if ch == 3 else 0, 0, 0, 0)
    packer = zlib.compressobj(level, zlib.DEFLATED, 15, 8, zlib.Z_HUFFMAN_ONLY)
    data = packer.compress(raw.tobytes()) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def write_png(path: Path, image: np.ndarray) -> None:
    path.write_bytes(encode_png(image))
