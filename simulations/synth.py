"""The embedded synthetic classroom: schools, students, frames, clips and a public benchmark split.

Why: fedfer's demo and tests need FER data on machines that cannot download any. This module samples
schools (camera profile, demographic mix, label skew, number of students), students (stable identity,
expression style, seat) and frames (expression as FACS action units, pose, light, occluders), draws
them with :mod:`simulations.faces` and writes the on-disk layout below. A disjoint *public* split (other
identities, other cameras, balanced labels) is written in the FER2013 CSV and RAF-DB formats so the
evaluation node reads it with the same readers as the real benchmarks.

Layout (a contract with the client's and evaluator's readers)::

    <root>/manifest.json
    <root>/schools/<school_id>/school.json
    <root>/schools/<school_id>/labels.csv        path,label,student_id,clip_id,frame  (stills only)
    <root>/schools/<school_id>/images/*.png
    <root>/schools/<school_id>/landmarks.npy     float32 (rows of labels.csv, 68, 2), pixel x, y (iBUG 68)
    <root>/schools/<school_id>/clips.csv         clip_id,student_id,label,folder
    <root>/schools/<school_id>/clips/<clip_id>/frame_NN.png   (16 frames, onset -> apex)
    <root>/public/fer2013.csv                    emotion,pixels,Usage (48x48 grayscale)
    <root>/public/rafdb/EmoLabel/list_patition_label.txt
    <root>/public/rafdb/Image/aligned/test_NNNN_aligned.jpg   (100x100 colour)
    <root>/public/public.json                    identities, usage, counts (also the "complete" marker)

Determinism: every part draws from its own numpy SeedSequence keyed by (seed, part, index, ...), so a
school depends only on the seed, its index and the per-school sizes; a simulated client builds its own
school alone and gets the same bytes as a full build. Each part is written to a temporary directory
and renamed into place under an fcntl lock, so concurrent callers never see (or make) a half part.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import uuid
from collections import deque
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from PIL import Image

from shared_models.atomic_files import atomic_write_text
from shared_models.labels import FER7
from simulations import faces as F

GENERATOR = "fedfer.simulations.synth"
GENERATOR_VERSION = "9"   # v9: public training split (FER2013 Training / RAF-DB train_) and in-domain held-out students
LABEL_SET = "fer7"
CLIP_LENGTH = 16
# The clips' own version, in the key of every school that has clips (and of the clip benchmark): v2 gave
# each clip an engagement level (gaze, head turn, eyelids, expression strength) and wrote its frames and
# landmarks into labels.csv / landmarks.npy. Schools without clips (the default) keep their bytes.
CLIP_VERSION = "2"
ENGAGEMENT_LEVELS = ("very low", "low", "high", "very high")   # DAiSEE's four levels, 0..3
PUBLIC_SIZE = 100            # RAF-DB aligned faces are 100x100
FER2013_SIZE = 48
RAFDB_CODES: dict[str, int] = {"surprise": 1, "fear": 2, "disgust": 3, "happy": 4, "sad": 5, "angry": 6,
                               "neutral": 7}
STILLS_HEADER = "path,label,student_id,clip_id,frame"
CLIPS_HEADER = "clip_id,student_id,label,folder"
# with clips, labels.csv also lists every clip frame and says each clip's engagement level (0..3)
FRAMES_HEADER = STILLS_HEADER + ",engagement"
CLIPS_ENGAGEMENT_HEADER = CLIPS_HEADER + ",engagement"

Progress = Callable[[int, int, str], None]

# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthParams:
    """Size and seed of a synthetic classroom. Schools vary their own student count around the mean."""

    schools: int = 6
    students_per_school: int = 48
    frames_per_student: int = 24
    public_students: int = 60
    public_frames: int = 24      # frames per public identity (independent of the schools' frames_per_student)
    image_size: int = 64
    seed: int = 1234
    clips_per_student: int = 1
    public_train_students: int = 0   # identities of the public *training* split (0: none)
    public_train_frames: int = 8     # frames per public training identity
    heldout_students: int = 0        # per school: students written to indomain/ only, never to the school
    school_size_spread: int = 30     # percent: a school has students_per_school x U(1 - s, 1 + s) students
    indomain_schools: int = 60       # held-out students come from at most this many schools (evenly spaced)

    def __post_init__(self) -> None:
        minimum = {"schools": 1, "students_per_school": 1, "frames_per_student": 1, "public_students": 2,
                   "public_frames": 1, "image_size": 16, "seed": 0, "clips_per_student": 0,
                   "public_train_students": 0, "public_train_frames": 1, "heldout_students": 0,
                   "school_size_spread": 0, "indomain_schools": 1}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"SynthParams.{f.name} must be an integer, got {value!r}")
            if value < minimum[f.name]:
                raise ValueError(f"SynthParams.{f.name} must be >= {minimum[f.name]}, got {value}")
        if self.school_size_spread > 90:
            raise ValueError(f"SynthParams.school_size_spread must be <= 90, got {self.school_size_spread}")
        if self.image_size > 512:
            raise ValueError(f"SynthParams.image_size must be <= 512, got {self.image_size}")


_CONFIG_KEYS: dict[str, str] = {
    "schools": "federation.schools",
    "students_per_school": "data.students_per_school",
    "frames_per_student": "data.frames_per_student",
    "public_students": "data.public_students",
    "public_frames": "data.public_frames",
    "image_size": "data.image_size",
    "seed": "data.seed",
    "clips_per_student": "data.clips_per_student",
    "public_train_students": "data.public_train_students",
    "public_train_frames": "data.public_train_frames",
    "heldout_students": "data.heldout_students",
    "school_size_spread": "data.school_size_spread",
    "indomain_schools": "data.indomain_schools",
}


def params_from_config(cfg: Mapping[str, Any]) -> SynthParams:
    """SynthParams from a flat fedfer config (keys `federation.schools`, `data.*`); absent keys keep
    the dataclass defaults. A value that is not an integer raises ValueError naming the key."""
    values: dict[str, int] = {}
    for name, key in _CONFIG_KEYS.items():
        if key not in cfg:
            continue
        raw = cfg[key]
        try:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            values[name] = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"config key '{key}' must be an integer, got {raw!r}") from None
    try:
        return SynthParams(**values)
    except ValueError as err:
        name = str(err).split(".", 1)[1].split(" ", 1)[0] if str(err).startswith("SynthParams.") else ""
        raise ValueError(f"config key '{_CONFIG_KEYS.get(name, name)}': {err}") from None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _hashed_params(params: SynthParams) -> dict[str, Any]:
    """Every parameter that changes a byte of the dataset: `indomain_schools` only when it leaves schools
    out of the in-domain set (so datasets of up to that many schools keep their cache folder and keys)."""
    values = asdict(params)
    if params.indomain_schools >= params.schools or params.heldout_students == 0:
        del values["indomain_schools"]
    return values


def params_hash(params: SynthParams) -> str:
    """Short hash of the generator version and every parameter (names the default cache folder)."""
    return _digest({"version": GENERATOR_VERSION, **_hashed_params(params)})[:12]


def default_root(params: SynthParams) -> Path:
    """~/.cache/fedfer/synth/<hash of params> ($XDG_CACHE_HOME is honoured)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fedfer" / "synth" / params_hash(params)


def root_from_config(cfg: Mapping[str, Any]) -> Path:
    """`data.root` if set, else :func:`default_root` of the config's parameters."""
    root = str(cfg.get("data.root", "") or "")
    return Path(root).expanduser() if root else default_root(params_from_config(cfg))


def school_id(index: int) -> str:
    return f"school-{index:02d}"


def _school_key(params: SynthParams, index: int) -> str:
    clip_version = {"clip_version": CLIP_VERSION} if params.clips_per_student else {}
    return _digest({"version": GENERATOR_VERSION, "seed": params.seed, "school": index,
                    "students_per_school": params.students_per_school, "frames": params.frames_per_student,
                    "image_size": params.image_size, "clips": params.clips_per_student,
                    "spread": params.school_size_spread, **clip_version})[:16]


def _public_key(params: SynthParams) -> str:
    return _digest({"version": GENERATOR_VERSION, "seed": params.seed, "public_students": params.public_students,
                    "frames": params.public_frames, "train_students": params.public_train_students,
                    "train_frames": params.public_train_frames})[:16]


def _indomain_key(params: SynthParams) -> str:
    inputs = {"version": GENERATOR_VERSION, "seed": params.seed, "schools": params.schools,
              "heldout_students": params.heldout_students, "students_per_school": params.students_per_school,
              "frames": params.frames_per_student, "image_size": params.image_size}
    if params.indomain_schools < params.schools:
        inputs["indomain_schools"] = params.indomain_schools
    return _digest(inputs)[:16]


def indomain_school_indices(params: SynthParams) -> list[int]:
    """The schools whose held-out students form the in-domain test set: every school, or at most
    `indomain_schools` of them evenly spaced over the indices (so every camera template is among them)."""
    if params.indomain_schools >= params.schools:
        return list(range(params.schools))
    n = params.indomain_schools
    return sorted({i * params.schools // n for i in range(n)})


# Independent random streams: (seed, part kind, indices..., purpose).
_KIND_SCHOOL, _KIND_PUBLIC = 1, 2
_P_PROFILE, _P_STUDENT, _P_RENDER, _P_NOISE = 0, 1, 2, 3
# Own streams for the public training split and the held-out students, so adding them changes no byte
# of the schools or of the public test split.
_KIND_PUBLIC_TRAIN, _KIND_HELDOUT = 3, 4
# Engagement levels (per school student) and the clip benchmark's students: their own streams too.
_KIND_ENGAGEMENT, _KIND_CLIP_BENCH = 5, 6


def _rng(params: SynthParams, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([params.seed, *key]))


# ------------------------------------------------------------------------------------------------
# Populations: cameras, demographics, label skew
# ------------------------------------------------------------------------------------------------

# Skin tones from light to dark (sRGB), hair colours and cloth colours.
SKIN_TONES: tuple[F.RGB, ...] = ((246, 214, 190), (234, 192, 160), (214, 165, 125), (184, 132, 92),
                                 (141, 95, 62), (98, 64, 42))
HAIR_COLOURS: tuple[F.RGB, ...] = ((28, 22, 20), (60, 40, 28), (105, 72, 45), (196, 160, 100), (145, 70, 35),
                                   (150, 150, 150))
CLOTH_COLOURS: tuple[F.RGB, ...] = ((60, 80, 140), (150, 40, 50), (40, 110, 70), (220, 220, 215), (35, 35, 40),
                                    (200, 150, 40), (110, 60, 130), (90, 140, 170), (170, 90, 60))
IRIS_COLOURS: tuple[F.RGB, ...] = ((70, 45, 30), (40, 30, 25), (70, 110, 150), (85, 110, 70))

# Camera templates a school (or a public photo source) is drawn around. Values are Look fields plus
# `scale` (how large faces appear). The public split uses its own templates.
SCHOOL_CAMERAS: tuple[dict[str, Any], ...] = (
    dict(name="colour-webcam", mono="", exposure=1.0, gamma=1.0, contrast=1.0, cast=(1.03, 1.0, 0.96), blur=0.0,
         noise=0.025, jpeg=0, light=0.15, vignette=0.1, scale=1.0),
    dict(name="ir-grayscale", mono="ir", exposure=0.92, gamma=1.1, contrast=1.15, cast=(1.0, 1.0, 1.0), blur=0.4,
         noise=0.035, jpeg=0, light=0.1, vignette=0.25, scale=0.95),
    dict(name="low-light-blurry", mono="", exposure=0.62, gamma=1.2, contrast=0.85, cast=(1.06, 0.96, 0.84),
         blur=0.8, noise=0.055, jpeg=0, light=0.3, vignette=0.3, scale=0.92),
    dict(name="warm-cast-wide", mono="", exposure=1.0, gamma=1.0, contrast=1.05, cast=(1.15, 1.0, 0.78), blur=0.3,
         noise=0.03, jpeg=0, light=0.2, vignette=0.1, scale=0.8),
    dict(name="cool-fluorescent", mono="", exposure=1.12, gamma=0.92, contrast=0.95, cast=(0.88, 1.02, 1.12),
         blur=0.0, noise=0.02, jpeg=0, light=0.25, vignette=0.0, scale=1.05),
    dict(name="compressed-stream", mono="", exposure=1.0, gamma=1.0, contrast=1.1, cast=(1.0, 1.0, 1.0), blur=0.5,
         noise=0.02, jpeg=40, light=0.15, vignette=0.1, scale=0.9),
)
PUBLIC_CAMERAS: tuple[dict[str, Any], ...] = (
    dict(name="studio", mono="", exposure=1.05, gamma=1.0, contrast=1.0, cast=(1.0, 1.0, 1.0), blur=0.0,
         noise=0.01, jpeg=0, light=0.08, vignette=0.0, scale=1.02),
    dict(name="press-photo", mono="", exposure=1.0, gamma=0.95, contrast=1.15, cast=(1.04, 1.0, 0.97), blur=0.3,
         noise=0.015, jpeg=60, light=0.25, vignette=0.05, scale=0.98),
    dict(name="phone-selfie", mono="", exposure=0.95, gamma=1.05, contrast=1.0, cast=(1.08, 1.0, 0.92), blur=0.6,
         noise=0.03, jpeg=0, light=0.2, vignette=0.15, scale=1.04),
    dict(name="archive-gray", mono="gray", exposure=1.0, gamma=1.0, contrast=1.1, cast=(1.0, 1.0, 1.0), blur=0.4,
         noise=0.02, jpeg=0, light=0.15, vignette=0.1, scale=1.0),
)

# A classroom's base rates (neutral and happy dominate, disgust is rare) before the per-school skew.
BASE_LABEL_PROBS = np.array([0.12, 0.09, 0.10, 0.20, 0.13, 0.13, 0.23])
# Which class an expression borrows from when it is blended (the confusions real FER data shows).
NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "angry": ("disgust", "sad"), "disgust": ("angry", "sad"), "fear": ("surprise", "sad"),
    "happy": ("surprise",), "sad": ("fear", "angry", "disgust"), "surprise": ("fear", "happy"), "neutral": (),
}
_PROTO = {label: F.prototype_vector(label) for label in FER7}
_CORE = {label: [F.AU_INDEX[n] for n in F.CORE_AUS[label]] for label in FER7}

# Difficulty knobs (classroom v8), calibrated with simulations/calibrate_synth.py (see the module docstring
# there). Label noise (blends of a neighbouring class, traces of other classes in neutral) rather than
# nuisance (pose, light, occluders) sets how hard the task is; with these values a converged non-private
# HAFNet `cpu` lands inside issue #2's 65-92% public accuracy (benchmarks/central-hafnet-cpu-nodp-v8*.json).
# How the values were reached: docs/experiments.md.
AU_DROP = 0.0                # chance each AU of the prototype is absent in a frame (one core AU always stays)
INTENSITY_BETA = (2.0, 2.0)  # apex intensity ~ LOW + SPAN * Beta(a, b), times the student's expressivity
INTENSITY_LOW, INTENSITY_SPAN = 0.6, 0.7
BLEND_P, BLEND_MAX = 0.35, 0.6  # chance and maximum weight of blending in a neighbouring class
SPURIOUS_P, SPURIOUS_MAX = 0.02, 0.3
NEUTRAL_TRACE_P, NEUTRAL_TRACE_MAX = 0.25, 0.3


@dataclass(frozen=True)
class SchoolProfile:
    school_id: str
    index: int
    num_students: int
    camera: dict[str, Any]
    skin_weights: tuple[float, ...]
    style_weights: tuple[float, ...]
    glasses_rate: float
    occlusion_rate: float
    label_probs: tuple[float, ...]
    wall: F.RGB
    floor: F.RGB

    def describe(self) -> dict[str, Any]:
        return {
            "camera": self.camera,
            "demographics": {"skin_tone_weights": list(self.skin_weights),
                             "hair_style_weights": dict(zip(F.HAIR_STYLES, self.style_weights)),
                             "glasses_rate": self.glasses_rate},
            "occlusion_rate": self.occlusion_rate,
            "label_probs": dict(zip(FER7, self.label_probs)),
        }


def _round(x: float) -> float:
    return float(round(x, 4))


def _jitter_camera(template: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    cam = dict(template)
    for key in ("exposure", "contrast", "blur", "noise", "light", "vignette", "scale"):
        cam[key] = _round(template[key] * rng.uniform(0.85, 1.15))
    cam["gamma"] = _round(template["gamma"] * rng.uniform(0.95, 1.05))
    cam["cast"] = [_round(c * rng.uniform(0.96, 1.04)) for c in template["cast"]]
    if template["jpeg"]:
        cam["jpeg"] = int(template["jpeg"] + rng.integers(-8, 9))
    cam["light_angle"] = _round(rng.uniform(0.0, 2.0 * math.pi))   # where the windows are
    return cam


def school_profile(params: SynthParams, index: int) -> SchoolProfile:
    """The camera, population and label skew of school `index` (depends on seed and index only)."""
    rng = _rng(params, _KIND_SCHOOL, index, _P_PROFILE)
    camera = _jitter_camera(SCHOOL_CAMERAS[index % len(SCHOOL_CAMERAS)], rng)
    mean = params.students_per_school
    spread = params.school_size_spread / 100.0
    num = max(1, int(round(mean * rng.uniform(1.0 - spread, 1.0 + spread)))) if mean > 1 else 1
    skin = 0.75 * rng.dirichlet(np.full(len(SKIN_TONES), 0.6)) + 0.25 / len(SKIN_TONES)
    styles = rng.dirichlet(np.array([3.0, 3.0, 2.0, 1.5, 1.0, 1.0]))
    labels = 0.85 * rng.dirichlet(BASE_LABEL_PROBS * 8.0) + 0.15 * BASE_LABEL_PROBS
    labels = labels / labels.sum()
    wall = tuple(float(v) for v in rng.uniform(150, 235, 3))
    floor = tuple(float(v) for v in rng.uniform(80, 170, 3))
    return SchoolProfile(
        school_id=school_id(index), index=index, num_students=num, camera=camera,
        skin_weights=tuple(_round(w) for w in skin), style_weights=tuple(_round(w) for w in styles),
        glasses_rate=_round(rng.uniform(0.05, 0.35)), occlusion_rate=_round(rng.uniform(0.05, 0.15)),
        label_probs=tuple(_round(p) for p in labels), wall=wall, floor=floor)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# People
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """How one person expresses: overall expressivity, per-AU gains, resting face, seat."""

    expressivity: float
    au_gain: np.ndarray
    resting: np.ndarray
    toothy: bool
    yaw: float
    roll: float
    scale: float
    dx: float
    dy: float
    light_angle: float
    label_probs: np.ndarray


def _weighted(rng: np.random.Generator, weights: tuple[float, ...] | np.ndarray) -> int:
    w = np.asarray(weights, dtype=np.float64)
    return int(rng.choice(len(w), p=w / w.sum()))


def sample_identity(rng: np.random.Generator, skin_weights: tuple[float, ...], style_weights: tuple[float, ...],
                    glasses_rate: float, adult: bool = False) -> F.Identity:
    """One person's face. `adult` lengthens the face and deepens the folds (the public split)."""
    tone = _weighted(rng, skin_weights)
    skin = tuple(float(np.clip(c * rng.uniform(0.95, 1.05), 0, 255)) for c in SKIN_TONES[tone])
    style = F.HAIR_STYLES[_weighted(rng, style_weights)]
    if style == "scarf":
        hair = CLOTH_COLOURS[int(rng.integers(len(CLOTH_COLOURS)))]
    else:
        dark_only = tone >= 3
        choices = [0, 1] if dark_only else [0, 1, 2, 3, 4]
        if adult:
            choices = choices + [5]
        hair = HAIR_COLOURS[int(rng.choice(choices))]
    hair = tuple(float(np.clip(c * rng.uniform(0.85, 1.15), 0, 255)) for c in hair)
    brow = hair if style != "scarf" else HAIR_COLOURS[int(rng.integers(2))]
    brow = tuple(float(c * 0.8) for c in brow)
    eye_y = float(rng.uniform(-0.2, -0.1))
    lip_mix = rng.uniform(0.35, 0.6)
    lip = tuple(float(c * (1 - lip_mix) + t * lip_mix) for c, t in zip(skin, (190.0, 80.0, 85.0)))
    hairline = float(rng.uniform(-0.62, -0.52) if style == "fringe" else rng.uniform(-0.92, -0.72))
    return F.Identity(
        face_w=float(rng.uniform(0.92, 1.08)), chin_y=float(rng.uniform(1.15, 1.32) + (0.06 if adult else 0.0)),
        jaw_p=float(rng.uniform(0.7, 1.4)), jaw_taper=float(rng.uniform(0.04, 0.2)), skin=skin,  # type: ignore[arg-type]
        hair=hair, hair_style=style, hairline=hairline,  # type: ignore[arg-type]
        eye_sep=float(rng.uniform(0.34, 0.42)), eye_y=eye_y,
        eye_size=float(rng.uniform(0.85, 1.15) - (0.06 if adult else 0.0)), tilt=float(rng.uniform(-0.02, 0.04)),
        iris=IRIS_COLOURS[int(rng.integers(len(IRIS_COLOURS)))],
        brow_y=eye_y - float(rng.uniform(0.24, 0.34)), brow_thick=float(rng.uniform(0.055, 0.1)),
        brow_arch=float(rng.uniform(0.0, 0.07)), brow_color=brow,  # type: ignore[arg-type]
        nose_len=float(rng.uniform(0.85, 1.15)), nose_w=float(rng.uniform(0.85, 1.2)),
        mouth_y=float(rng.uniform(0.62, 0.74)), mouth_w=float(rng.uniform(0.3, 0.42)),
        lip_up=float(rng.uniform(0.04, 0.07)), lip_lo=float(rng.uniform(0.05, 0.09)), lip=lip,  # type: ignore[arg-type]
        glasses=bool(rng.random() < glasses_rate),
        glasses_color=tuple(float(v) for v in rng.uniform(10, 120, 3)),  # type: ignore[arg-type]
        glasses_size=float(rng.uniform(0.9, 1.15)),
        shirt=CLOTH_COLOURS[int(rng.integers(len(CLOTH_COLOURS)))],
        folds=float(rng.uniform(0.0, 0.15) + (0.08 if adult else 0.0)))


def sample_style(rng: np.random.Generator, camera: Mapping[str, Any], label_probs: np.ndarray) -> Style:
    resting = np.zeros(F.NUM_AUS, np.float32)
    for name, p, lo, hi in (("AU15", 0.2, 0.1, 0.25), ("AU4", 0.25, 0.1, 0.3), ("AU12", 0.2, 0.1, 0.25),
                            ("AU7", 0.15, 0.1, 0.3), ("AU1", 0.1, 0.1, 0.3)):
        if rng.random() < p:
            resting[F.AU_INDEX[name]] = rng.uniform(lo, hi)
    return Style(
        expressivity=float(rng.uniform(0.75, 1.15)),
        au_gain=np.clip(rng.lognormal(0.0, 0.3, F.NUM_AUS), 0.4, 1.6).astype(np.float32),
        resting=resting, toothy=bool(rng.random() < 0.5),
        yaw=float(rng.normal(0.0, 0.15)), roll=float(rng.normal(0.0, 0.05)),
        scale=float(camera["scale"] * rng.uniform(0.9, 1.1)), dx=float(rng.normal(0.0, 0.04)),
        dy=float(rng.normal(0.0, 0.03)), light_angle=float(camera.get("light_angle", 0.0) + rng.normal(0.0, 0.4)),
        label_probs=rng.dirichlet(np.asarray(label_probs) * 30.0 + 1e-3))


def sample_aus(label: str, style: Style, rng: np.random.Generator, intensity: float | None = None) -> np.ndarray:
    """AU intensities of one expression: the FACS prototype with partial activation, per-person gains,
    per-frame jitter, an optional blend of a neighbouring class, the resting face and spurious AUs."""
    proto = _PROTO[label]
    if intensity is None:
        intensity = INTENSITY_LOW + INTENSITY_SPAN * rng.beta(*INTENSITY_BETA)
    intensity *= style.expressivity
    if label == "neutral":
        aus = np.zeros(F.NUM_AUS, np.float32)
        if rng.random() < NEUTRAL_TRACE_P:   # a trace of something: neutral borders every class
            other = FER7[int(rng.integers(6))]
            aus += _PROTO[other] * rng.uniform(0.0, NEUTRAL_TRACE_MAX)
    else:
        keep = rng.random(F.NUM_AUS) >= AU_DROP
        core = _CORE[label]
        if not keep[core].any():
            keep[core[int(rng.integers(len(core)))]] = True
        gains = style.au_gain * rng.lognormal(0.0, 0.2, F.NUM_AUS)
        aus = proto * gains * keep * intensity
        if label == "happy" and style.toothy:
            aus[F.AU_INDEX["AU25"]] += 0.7 * intensity
            aus[F.AU_INDEX["AU26"]] += 0.1 * intensity
        if NEIGHBOURS[label] and rng.random() < BLEND_P:
            other = NEIGHBOURS[label][int(rng.integers(len(NEIGHBOURS[label])))]
            aus += _PROTO[other] * rng.uniform(0.1, BLEND_MAX) * intensity
    aus += style.resting * (1.0 - 0.5 * min(1.0, intensity))
    spurious = rng.random(F.NUM_AUS) < SPURIOUS_P
    aus += spurious * rng.uniform(0.0, SPURIOUS_MAX, F.NUM_AUS)
    return np.clip(aus, 0.0, 1.0).astype(np.float32)


def _look(camera: Mapping[str, Any], style: Style, rng: np.random.Generator) -> F.Look:
    return F.Look(
        light_angle=style.light_angle + float(rng.normal(0.0, 0.2)),
        light=float(camera["light"] * rng.uniform(0.5, 1.5)),
        exposure=float(camera["exposure"] * rng.uniform(0.9, 1.1)),
        gamma=float(camera["gamma"]), contrast=float(camera["contrast"] * rng.uniform(0.95, 1.05)),
        cast=tuple(camera["cast"]), mono=camera["mono"],  # type: ignore[arg-type]
        blur=float(max(0.0, camera["blur"] + rng.normal(0.0, 0.15))),
        noise=float(camera["noise"] * rng.uniform(0.8, 1.2)),
        jpeg=int(camera["jpeg"]), vignette=float(camera["vignette"]))


def _occlusion(rate: float, rng: np.random.Generator) -> F.Occlusion:
    if rng.random() >= rate:
        return F.Occlusion()
    side = 1.0 if rng.random() < 0.5 else -1.0
    if rng.random() < 0.6:
        where = int(rng.integers(3))
        if where == 0:      # chin resting on a hand
            x, y, ang = side * rng.uniform(0.1, 0.5), rng.uniform(1.25, 1.55), side * rng.uniform(0.0, 0.4)
        elif where == 1:    # hand on the cheek
            x, y, ang = side * rng.uniform(0.8, 1.05), rng.uniform(0.55, 0.95), -side * rng.uniform(0.2, 0.6)
        else:               # hand partly over the mouth
            x, y, ang = side * rng.uniform(0.3, 0.55), rng.uniform(0.95, 1.15), side * rng.uniform(0.0, 0.3)
        return F.Occlusion(kind="hand", x=float(x), y=float(y), angle=float(ang), size=float(rng.uniform(0.85, 1.15)))
    page = CLOTH_COLOURS[int(rng.integers(len(CLOTH_COLOURS)))] if rng.random() < 0.4 else (235.0, 230.0, 215.0)
    return F.Occlusion(kind="book", x=float(rng.uniform(-0.5, 0.5)), y=float(rng.uniform(1.0, 1.6)),
                       angle=float(rng.normal(0.0, 0.15)), size=float(rng.uniform(0.8, 1.2)), color=page)


def _frame(aus: np.ndarray, style: Style, look: F.Look, occ: F.Occlusion, rng: np.random.Generator,
           jitter: float = 1.0) -> F.Frame:
    pose = F.Pose(roll=style.roll + float(rng.normal(0.0, 0.06 * jitter)),
                  yaw=style.yaw + float(rng.normal(0.0, 0.12 * jitter)),
                  scale=style.scale * float(1.0 + rng.normal(0.0, 0.04 * jitter)),
                  dx=style.dx + float(rng.normal(0.0, 0.02 * jitter)), dy=style.dy + float(rng.normal(0.0, 0.02 * jitter)))
    gaze = (float(np.clip(rng.normal(0.0, 0.4), -1, 1)), float(np.clip(rng.normal(0.0, 0.3), -1, 1)))
    blink = float(rng.uniform(0.6, 1.0)) if rng.random() < 0.04 else 0.0
    return F.Frame(aus=aus, pose=pose, look=look, occlusion=occ, gaze=gaze, blink=blink)


def _background(rng: np.random.Generator, wall: F.RGB, floor: F.RGB) -> F.Background:
    wall = tuple(float(np.clip(c * rng.uniform(0.9, 1.1), 0, 255)) for c in wall)  # type: ignore[assignment]
    board = None
    box = (0.0, 0.0, 0.3, 0.3)
    if rng.random() < 0.5:
        board = ((40.0, 70.0, 50.0), (235.0, 235.0, 230.0), (120.0, 170.0, 220.0), (150.0, 110.0, 70.0))[int(rng.integers(4))]
        x0, y0 = rng.uniform(-0.2, 0.7), rng.uniform(-0.1, 0.3)
        box = (float(x0), float(y0), float(x0 + rng.uniform(0.3, 0.6)), float(y0 + rng.uniform(0.2, 0.4)))
    others = tuple((float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.2, 0.6)), float(rng.uniform(0.08, 0.16)),
                    HAIR_COLOURS[int(rng.integers(3))]) for _ in range(int(rng.integers(0, 3))))
    return F.Background(wall=wall, floor=floor, horizon=float(rng.uniform(0.6, 0.9)), board=board, board_box=box,
                        others=others)


@dataclass(frozen=True)
class Student:
    student_id: str
    identity: F.Identity
    style: Style
    background: F.Background
    camera: dict[str, Any]


def student(params: SynthParams, school_index: int, student_index: int,
            profile: SchoolProfile | None = None) -> Student:
    """Student `student_index` of a school: a stable id, identity, expression style and seat."""
    profile = profile or school_profile(params, school_index)
    rng = _rng(params, _KIND_SCHOOL, school_index, _P_STUDENT, student_index)
    identity = sample_identity(rng, profile.skin_weights, profile.style_weights, profile.glasses_rate)
    style = sample_style(rng, profile.camera, np.asarray(profile.label_probs))
    return Student(f"s{school_index:02d}-st{student_index:03d}", identity, style,
                   _background(rng, profile.wall, profile.floor), profile.camera)


def _internet_person(rng: np.random.Generator, index: int, person_id: str) -> Student:
    """An internet face (the public splits' look): uniform demographics, adults too, one of the photo-source
    cameras, a plain background."""
    n_tones, n_styles = len(SKIN_TONES), len(F.HAIR_STYLES)
    identity = sample_identity(rng, tuple([1.0 / n_tones] * n_tones), tuple([1.0 / n_styles] * n_styles), 0.2,
                               adult=bool(rng.random() < 0.5))
    camera = _jitter_camera(PUBLIC_CAMERAS[index % len(PUBLIC_CAMERAS)], rng)
    style = sample_style(rng, camera, np.full(7, 1.0 / 7.0))
    plain = tuple(float(v) for v in rng.uniform(90, 240, 3))
    bg = F.Background(wall=plain, floor=tuple(float(c * 0.8) for c in plain), horizon=float(rng.uniform(0.8, 1.0)),  # type: ignore[arg-type]
                      others=())
    return Student(person_id, identity, style, bg, camera)


def public_person(params: SynthParams, index: int) -> Student:
    """Identity `index` of the public (test) split: its own random stream."""
    return _internet_person(_rng(params, _KIND_PUBLIC, _P_STUDENT, index), index, f"pub-id{index:03d}")


def public_train_person(params: SynthParams, index: int) -> Student:
    """Identity `index` of the public *training* split: drawn as :func:`public_person` draws the test
    identities but from its own random stream, so no training identity is a test identity."""
    return _internet_person(_rng(params, _KIND_PUBLIC_TRAIN, _P_STUDENT, index), index, f"pubtr-id{index:04d}")


def heldout_student(params: SynthParams, school_index: int, index: int,
                    profile: SchoolProfile | None = None) -> Student:
    """Held-out student `index` of a school: the school's camera, room, demographics and label skew, but
    its own random stream and id (`sNN-hoNNN`), so it is never one of the school's training students."""
    profile = profile or school_profile(params, school_index)
    rng = _rng(params, _KIND_HELDOUT, school_index, _P_STUDENT, index)
    identity = sample_identity(rng, profile.skin_weights, profile.style_weights, profile.glasses_rate)
    style = sample_style(rng, profile.camera, np.asarray(profile.label_probs))
    return Student(f"s{school_index:02d}-ho{index:03d}", identity, style,
                   _background(rng, profile.wall, profile.floor), profile.camera)


# ------------------------------------------------------------------------------------------------
# Writing parts
# ------------------------------------------------------------------------------------------------


class _Writer:
    """Encodes and writes PNGs on a helper thread while the main thread draws the next student.

    zlib and file writes release the GIL, so on a multi-core machine the writing overlaps the drawing
    (still one process). At most `max_pending` images wait in memory."""

    def __init__(self, max_pending: int = 256) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-writer")
        self._pending: deque[Future[None]] = deque()
        self._max = max_pending

    def png(self, path: Path, image: np.ndarray) -> None:
        self._pending.append(self._pool.submit(F.write_png, path, image))
        while len(self._pending) > self._max:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for every write; re-raise the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Counter:
    """Forwards (done, total, what) to the caller's callback with a running offset."""

    def __init__(self, callback: Progress | None, total: int, done: int = 0) -> None:
        self.callback, self.total, self.done = callback, total, done

    def step(self, n: int, what: str) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total, what)


def school_image_count(params: SynthParams, index: int) -> int:
    n = school_profile(params, index).num_students
    return n * (params.frames_per_student + CLIP_LENGTH * params.clips_per_student)


def public_image_count(params: SynthParams) -> int:
    return params.public_students * params.public_frames + params.public_train_students * params.public_train_frames


def indomain_image_count(params: SynthParams) -> int:
    return len(indomain_school_indices(params)) * params.heldout_students * params.frames_per_student


def _clip_frames(label: str, style: Style, camera: Mapping[str, Any], rng: np.random.Generator) -> list[F.Frame]:
    """A 16-frame onset -> apex clip: resting face, then a smooth ramp to the apex, slight head drift."""
    apex = sample_aus(label, style, rng, intensity=INTENSITY_LOW + INTENSITY_SPAN * float(rng.beta(2.5, 1.5)))
    start, peak = int(rng.integers(0, 4)), int(rng.integers(10, CLIP_LENGTH))
    look = _look(camera, style, rng)
    base = _frame(apex, style, look, F.Occlusion(), rng, jitter=0.7)
    drift = rng.normal(0.0, 0.03, 3)
    blink_at = int(rng.integers(CLIP_LENGTH)) if rng.random() < 0.3 else -1
    out = []
    for k in range(CLIP_LENGTH):
        r = float(np.clip((k - start) / max(1, peak - start), 0.0, 1.0))
        r = r * r * (3.0 - 2.0 * r)
        aus = style.resting + r * (apex - style.resting)
        p = base.pose
        f = k / (CLIP_LENGTH - 1)
        pose = F.Pose(roll=p.roll + drift[0] * f, yaw=p.yaw + drift[1] * f + float(rng.normal(0.0, 0.01)),
                      scale=p.scale, dx=p.dx + drift[2] * f * 0.3, dy=p.dy)
        out.append(F.Frame(aus=aus.astype(np.float32), pose=pose, look=look, occlusion=F.Occlusion(), gaze=base.gaze,
                           blink=0.9 if k == blink_at else 0.0))
    return out


# What an engagement level looks like (index = level 0 very low .. 3 very high): how far the head is
# turned from the screen (radians of yaw, growing over the clip as the student looks away), how far the
# gaze wanders, how heavy the eyelids are (drowsiness) and how much of the expression comes through.
ENGAGEMENT_YAW = (1.0, 0.6, 0.25, 0.0)
ENGAGEMENT_GAZE = (0.9, 0.6, 0.3, 0.05)
ENGAGEMENT_LIDS = (0.7, 0.45, 0.1, 0.0)
ENGAGEMENT_EXPRESSION = (0.5, 0.7, 0.9, 1.0)
ENGAGEMENT_HEAD_DOWN = (0.08, 0.05, 0.02, 0.0)


def engagement_levels(rng: np.random.Generator, n: int) -> list[int]:
    """`n` clip levels of one student: a disposition drawn uniformly over 0..3, each clip one level up or
    down from it with probability 1/4 each (levels are then roughly balanced over a school)."""
    disposition = int(rng.integers(len(ENGAGEMENT_LEVELS)))
    steps = rng.choice((-1, 0, 1), size=n, p=(0.25, 0.5, 0.25))
    return [int(np.clip(disposition + step, 0, len(ENGAGEMENT_LEVELS) - 1)) for step in steps]


def engaged_clip_frames(label: str, level: int, style: Style, camera: Mapping[str, Any], rng: np.random.Generator,
                        erng: np.random.Generator) -> list[F.Frame]:
    """An onset -> apex clip of `label` (:func:`_clip_frames`, drawn from `rng` as before) as a student at
    engagement `level` shows it: head turn, gaze, eyelids and expression strength from the tables above,
    each jittered by +-20 % from `erng`."""
    frames = _clip_frames(label, style, camera, rng)
    side = 1.0 if erng.random() < 0.5 else -1.0
    yaw = side * ENGAGEMENT_YAW[level] * float(erng.uniform(0.8, 1.2))
    angle = float(erng.uniform(0.0, 2.0 * math.pi))
    reach = ENGAGEMENT_GAZE[level] * float(erng.uniform(0.8, 1.2))
    gaze = (float(np.clip(reach * math.cos(angle), -1, 1)), float(np.clip(reach * abs(math.sin(angle)), -1, 1)))
    lids = ENGAGEMENT_LIDS[level] * float(erng.uniform(0.8, 1.2))
    strength = ENGAGEMENT_EXPRESSION[level]
    out = []
    for k, f in enumerate(frames):
        away = 0.6 + 0.4 * k / (CLIP_LENGTH - 1)
        pose = replace(f.pose, yaw=f.pose.yaw + yaw * away, dy=f.pose.dy + ENGAGEMENT_HEAD_DOWN[level])
        aus = (style.resting + strength * (f.aus - style.resting)).astype(np.float32)
        out.append(replace(f, aus=aus, pose=pose, gaze=gaze, blink=max(f.blink, lids)))
    return out


def _student_clips(params: SynthParams, index: int, j: int, st: Student, rng: np.random.Generator
                   ) -> list[tuple[str, int, list[F.Frame]]]:
    """Student j's clips as (FER7 label, engagement level, frames); labels and frames drawn from the student's
    render stream `rng` as in v1, engagement from the student's own engagement stream."""
    clip_labels = [FER7[_weighted(rng, st.style.label_probs)] for _ in range(params.clips_per_student)]
    erng = _rng(params, _KIND_ENGAGEMENT, index, j)
    levels = engagement_levels(erng, len(clip_labels))
    return [(lab, level, engaged_clip_frames(lab, level, st.style, st.camera, rng, erng))
            for lab, level in zip(clip_labels, levels)]


def _write_student_clips(tmp: Path, writer: _Writer, student_id: str, specs: list[tuple[str, int]],
                         images: np.ndarray, lms: np.ndarray, out: tuple[list[str], list[np.ndarray], list[str]]
                         ) -> None:
    """Write a student's clip frames (clips/<clip id>/frame_NN.png) and add their labels.csv rows, landmarks
    and clips.csv rows to `out` = (frame rows, clip landmarks, clip rows)."""
    frame_rows, clip_marks, clip_rows = out
    for c, (lab, level) in enumerate(specs):
        cid = f"{student_id}-c{c:02d}"
        (tmp / "clips" / cid).mkdir()
        for k in range(CLIP_LENGTH):
            writer.png(tmp / "clips" / cid / f"frame_{k:02d}.png", images[c * CLIP_LENGTH + k])
            frame_rows.append(f"clips/{cid}/frame_{k:02d}.png,{lab},{student_id},{cid},{k},{level}")
        clip_marks.append(lms[c * CLIP_LENGTH:(c + 1) * CLIP_LENGTH])
        clip_rows.append(f"{cid},{student_id},{lab},clips/{cid},{level}")


def _engagement_counts(clip_rows: list[str]) -> dict[str, int]:
    levels = [int(row.rsplit(",", 1)[1]) for row in clip_rows]
    return {name: levels.count(i) for i, name in enumerate(ENGAGEMENT_LEVELS)}


def _write_frame_lists(tmp: Path, still_rows: list[str], frame_rows: list[str], clip_rows: list[str],
                       marks: list[np.ndarray]) -> None:
    """labels.csv (stills, then every clip frame with its clip id, frame number and engagement level),
    clips.csv and landmarks.npy (one (68, 2) row per labels.csv row). Without clips the files are those of
    generator v9 byte for byte (no engagement column)."""
    if frame_rows:
        rows = [FRAMES_HEADER] + [f"{r}," for r in still_rows] + frame_rows
        clips = [CLIPS_ENGAGEMENT_HEADER] + clip_rows
    else:
        rows, clips = [STILLS_HEADER] + still_rows, [CLIPS_HEADER]
    (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp / "clips.csv").write_text("\n".join(clips) + "\n")
    np.save(tmp / "landmarks.npy", np.concatenate(marks).astype(np.float32))


def _write_school(tmp: Path, params: SynthParams, index: int, counter: _Counter) -> dict[str, Any]:
    profile = school_profile(params, index)
    sid = profile.school_id
    renderer = F.Renderer(params.image_size, seed=int(_rng(params, _KIND_SCHOOL, index, _P_NOISE).integers(2**31)))
    (tmp / "images").mkdir(parents=True)
    (tmp / "clips").mkdir()
    still_rows: list[str] = []
    clip_rows: list[str] = []
    marks: list[np.ndarray] = []
    frame_rows: list[str] = []           # clip frames (labels.csv rows after the stills)
    clip_marks: list[np.ndarray] = []
    label_counts = dict.fromkeys(FER7, 0)
    writer = _Writer()
    try:
        for j in range(profile.num_students):
            st = student(params, index, j, profile)
            rng = _rng(params, _KIND_SCHOOL, index, _P_RENDER, j)
            labels = [FER7[_weighted(rng, st.style.label_probs)] for _ in range(params.frames_per_student)]
            frames = [_frame(sample_aus(lab, st.style, rng), st.style, _look(profile.camera, st.style, rng),
                             _occlusion(profile.occlusion_rate, rng), rng) for lab in labels]
            clips = _student_clips(params, index, j, st, rng)
            frames.extend(f for _, _, clip in clips for f in clip)
            background = F.draw_background(st.background, renderer.canvas)
            images, lms = renderer.render_batch(st.identity, frames, rng, background)
            for k, lab in enumerate(labels):
                rel = f"images/{st.student_id}-f{k:03d}.png"
                writer.png(tmp / rel, images[k])
                still_rows.append(f"{rel},{lab},{st.student_id},,-1")
                label_counts[lab] += 1
            marks.append(lms[:len(labels)])
            _write_student_clips(tmp, writer, st.student_id, [(lab, level) for lab, level, _ in clips],
                                 images[len(labels):], lms[len(labels):], (frame_rows, clip_marks, clip_rows))
            counter.step(len(frames), sid)
    finally:
        writer.close()
    _write_frame_lists(tmp, still_rows, frame_rows, clip_rows, marks + clip_marks)
    meta = {
        "school_id": sid, "generator": GENERATOR, "version": GENERATOR_VERSION, "part_key": _school_key(params, index),
        "camera_profile": profile.camera, "num_students": profile.num_students, "num_frames": len(still_rows),
        "num_clips": len(clip_rows), "clip_length": CLIP_LENGTH, "label_counts": label_counts,
        "image_size": params.image_size, "landmarks": {"layout": "ibug68",
                                                       "shape": [len(still_rows) + len(frame_rows), 68, 2],
                                                       "units": "pixels (x, y)"},
        **({"clip_version": CLIP_VERSION, "engagement_counts": _engagement_counts(clip_rows)} if clip_rows else {}),
        **{k: v for k, v in profile.describe().items() if k != "camera"},
    }
    _write_json(tmp / "school.json", meta)   # written last: its presence marks a complete part
    return meta


_PIXEL_TEXT = [str(v) for v in range(256)]


def _write_public(tmp: Path, params: SynthParams, counter: _Counter, workers: int = 1) -> dict[str, Any]:
    renderer = F.Renderer(PUBLIC_SIZE, seed=int(_rng(params, _KIND_PUBLIC, _P_NOISE).integers(2**31)))
    aligned = tmp / "rafdb" / "Image" / "aligned"
    aligned.mkdir(parents=True)
    (tmp / "rafdb" / "EmoLabel").mkdir(parents=True)
    fer_rows = ["emotion,pixels,Usage"]
    raf_rows: list[str] = []
    people = []
    label_counts = dict.fromkeys(FER7, 0)
    half = (params.public_students + 1) // 2
    row = 0
    for j in range(params.public_students):
        person = public_person(params, j)
        rng = _rng(params, _KIND_PUBLIC, _P_RENDER, j)
        usage = "PublicTest" if j < half else "PrivateTest"
        first = row
        row = _write_public_identity(renderer, person, rng, j, params.public_frames, aligned, row,
                                     name_format="test_{:04d}", usage=usage, fer_rows=fer_rows,
                                     raf_rows=raf_rows, label_counts=label_counts)
        people.append({"identity_id": person.student_id, "usage": usage, "rows": [first, row],
                       "camera": person.camera["name"]})
        counter.step(params.public_frames, "public")
    train = _write_public_train(aligned, params, counter, workers)
    # FER2013 lists its Training rows first, then PublicTest and PrivateTest
    fer_rows = fer_rows[:1] + train["fer_rows"] + fer_rows[1:]
    (tmp / "fer2013.csv").write_text("\n".join(fer_rows) + "\n")
    (tmp / "rafdb" / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(train["raf_rows"] + raf_rows) + "\n")
    meta = {"generator": GENERATOR, "version": GENERATOR_VERSION, "part_key": _public_key(params),
            "num_images": row, "num_identities": params.public_students, "label_counts": label_counts,
            "formats": {"fer2013": "fer2013.csv", "rafdb": "rafdb"}, "rafdb_codes": RAFDB_CODES,
            "identities": people, "train": {k: v for k, v in train.items() if not k.endswith("_rows")}}
    _write_json(tmp / "public.json", meta)   # written last: its presence marks a complete part
    return meta


def _write_public_identity(renderer: F.Renderer, person: Student, rng: np.random.Generator, j: int, n_frames: int,
                           aligned: Path, row: int, *, name_format: str, usage: str, fer_rows: list[str],
                           raf_rows: list[str], label_counts: dict[str, int]) -> int:
    """Render public identity `j`'s frames, save them as RAF-DB aligned JPEGs and FER2013 rows (appended
    to the lists given); returns the last row number used."""
    # balanced labels over the split: identity j starts the 7-cycle at j, then the order is shuffled
    labels = [FER7[(j + k) % 7] for k in range(n_frames)]
    labels = [labels[i] for i in rng.permutation(len(labels))]
    frames = [_frame(sample_aus(lab, person.style, rng), person.style, _look(person.camera, person.style, rng),
                     _occlusion(0.05, rng), rng, jitter=1.2) for lab in labels]
    images, _ = renderer.render_batch(person.identity, frames, rng,
                                      F.draw_background(person.background, renderer.canvas))
    for k, lab in enumerate(labels):
        row += 1
        name = name_format.format(row)
        img = Image.fromarray(images[k])
        img.save(aligned / f"{name}_aligned.jpg", "JPEG", quality=90)
        raf_rows.append(f"{name}.jpg {RAFDB_CODES[lab]}")
        gray = np.asarray(img.convert("L").resize((FER2013_SIZE, FER2013_SIZE), Image.BILINEAR))
        pixels = " ".join(map(_PIXEL_TEXT.__getitem__, gray.ravel().tolist()))
        fer_rows.append(f"{FER7.index(lab)},{pixels},{usage}")
        label_counts[lab] += 1
    return row


def _write_public_train(aligned: Path, params: SynthParams, counter: _Counter, workers: int = 1) -> dict[str, Any]:
    """The public training split (FER2013 `Training` rows, RAF-DB `train_NNNNN` names): same look as the
    test split, other identities, its own renderer noise; balanced labels like the test split.

    It is the largest part of the default dataset (19,200 faces at 100 px), so `workers` processes render
    ranges of identities side by side. An identity's faces depend only on the renderer's seed and the
    identity's own stream, and its rows are numbered by its index, so the bytes are the same either way."""
    n = params.public_train_students
    chunks = max(1, min(int(workers), n // 50))   # small splits: not worth a process
    bounds = [(n * k // chunks, n * (k + 1) // chunks) for k in range(chunks)]
    if chunks == 1:
        parts = [_write_public_train_range(aligned, params, 0, n, counter)]
    else:
        # fork, as the dataset's parts: the children need no torch and must not re-run the caller's main module
        with ProcessPoolExecutor(chunks, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_write_public_train_range, aligned, params, lo, hi) for lo, hi in bounds]
            parts = []
            for future, (lo, hi) in zip(futures, bounds):
                parts.append(future.result())
                counter.step((hi - lo) * params.public_train_frames, "public-train")
    label_counts = dict.fromkeys(FER7, 0)
    for part in parts:
        for label, count in part["label_counts"].items():
            label_counts[label] += count
    return {"num_images": n * params.public_train_frames, "num_identities": n, "label_counts": label_counts,
            "identities": [p for part in parts for p in part["identities"]],
            "fer_rows": [r for part in parts for r in part["fer_rows"]],
            "raf_rows": [r for part in parts for r in part["raf_rows"]]}


def _write_public_train_range(aligned: Path, params: SynthParams, lo: int, hi: int,
                              counter: _Counter | None = None) -> dict[str, Any]:
    """Public training identities lo..hi-1: their JPEGs in `aligned`, and their rows and label counts."""
    renderer = F.Renderer(PUBLIC_SIZE, seed=int(_rng(params, _KIND_PUBLIC_TRAIN, _P_NOISE).integers(2**31)))
    fer_rows: list[str] = []
    raf_rows: list[str] = []
    people = []
    label_counts = dict.fromkeys(FER7, 0)
    row = lo * params.public_train_frames
    for j in range(lo, hi):
        person = public_train_person(params, j)
        rng = _rng(params, _KIND_PUBLIC_TRAIN, _P_RENDER, j)
        first = row
        row = _write_public_identity(renderer, person, rng, j, params.public_train_frames, aligned, row,
                                     name_format="train_{:05d}", usage="Training", fer_rows=fer_rows,
                                     raf_rows=raf_rows, label_counts=label_counts)
        people.append({"identity_id": person.student_id, "usage": "Training", "rows": [first, row],
                       "camera": person.camera["name"]})
        if counter is not None:
            counter.step(params.public_train_frames, "public-train")
    return {"label_counts": label_counts, "identities": people, "fer_rows": fer_rows, "raf_rows": raf_rows}


INDOMAIN_HEADER = "path,label,student_id,school_id"


def _write_indomain(tmp: Path, params: SynthParams, counter: _Counter) -> dict[str, Any]:
    """Held-out students of every school, as an image folder (`<label>/<student>-fNNN.png`) the evaluation
    node reads as `synthetic-indomain`, plus labels.csv naming each image's student and school. Simulation
    only: the number a school cares about (its own kind of faces), never written into a school's folder."""
    rows: list[str] = []
    label_counts = dict.fromkeys(FER7, 0)
    per_school: dict[str, int] = {}
    for label in FER7:
        (tmp / label).mkdir(parents=True)
    writer = _Writer()
    try:
        for index in indomain_school_indices(params):
            profile = school_profile(params, index)
            renderer = F.Renderer(params.image_size,
                                  seed=int(_rng(params, _KIND_HELDOUT, index, _P_NOISE).integers(2**31)))
            for j in range(params.heldout_students):
                st = heldout_student(params, index, j, profile)
                rng = _rng(params, _KIND_HELDOUT, index, _P_RENDER, j)
                labels = [FER7[_weighted(rng, st.style.label_probs)] for _ in range(params.frames_per_student)]
                frames = [_frame(sample_aus(lab, st.style, rng), st.style, _look(profile.camera, st.style, rng),
                                 _occlusion(profile.occlusion_rate, rng), rng) for lab in labels]
                images, _ = renderer.render_batch(st.identity, frames, rng,
                                                  F.draw_background(st.background, renderer.canvas))
                for k, lab in enumerate(labels):
                    rel = f"{lab}/{st.student_id}-f{k:03d}.png"
                    writer.png(tmp / rel, images[k])
                    rows.append(f"{rel},{lab},{st.student_id},{profile.school_id}")
                    label_counts[lab] += 1
                per_school[profile.school_id] = per_school.get(profile.school_id, 0) + len(labels)
                counter.step(len(frames), "indomain")
    finally:
        writer.close()
    (tmp / "labels.csv").write_text("\n".join([INDOMAIN_HEADER] + rows) + "\n")
    meta = {"generator": GENERATOR, "version": GENERATOR_VERSION, "part_key": _indomain_key(params),
            "num_images": len(rows), "heldout_students_per_school": params.heldout_students,
            "images_per_school": per_school, "label_counts": label_counts, "format": "imagefolder"}
    _write_json(tmp / "indomain.json", meta)   # written last: its presence marks a complete part
    return meta


# ------------------------------------------------------------------------------------------------
# Atomic, locked, cached parts
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# The clip benchmark (written when schools have clips): classroom students who never train
# ------------------------------------------------------------------------------------------------

CLIP_BENCH_CLIPS = 2   # clips per benchmark student
CLIP_BENCH_HEADER = "ClipID,Boredom,Engagement,Confusion,Frustration "   # DAiSEE's, trailing space included


def clip_bench_count(params: SynthParams) -> int:
    """Images of the clip benchmark: `public_students` students x 2 clips x 16 frames (0 without clips)."""
    return params.public_students * CLIP_BENCH_CLIPS * CLIP_LENGTH if params.clips_per_student else 0


def _clip_bench_key(params: SynthParams) -> str:
    return _digest({"version": GENERATOR_VERSION, "clip_version": CLIP_VERSION, "seed": params.seed,
                    "schools": params.schools, "students": params.public_students, "image_size": params.image_size,
                    "students_per_school": params.students_per_school, "spread": params.school_size_spread})[:16]


def clip_bench_student(params: SynthParams, index: int) -> tuple[Student, SchoolProfile]:
    """Benchmark student `index`: a student of school `index % schools` (its camera, room and people) drawn
    from the benchmark's own stream, so never one of the school's training students."""
    profile = school_profile(params, index % params.schools)
    rng = _rng(params, _KIND_CLIP_BENCH, _P_STUDENT, index)
    identity = sample_identity(rng, profile.skin_weights, profile.style_weights, profile.glasses_rate)
    style = sample_style(rng, profile.camera, np.asarray(profile.label_probs))
    return Student(f"cb-{index:04d}", identity, style, _background(rng, profile.wall, profile.floor),
                   profile.camera), profile


def _write_clip_bench(tmp: Path, params: SynthParams, counter: _Counter) -> dict[str, Any]:
    """Clips with balanced FER7 labels and engagement levels in DAiSEE's layout
    (DataSet/Test/<subject>/<ClipID>/frame_NN.png + landmarks.npy, Labels/TestLabels.csv: the `daisee` reader) plus
    labels.csv (clip,label: the `clipfolder` reader), so both readers are exercised as on real data."""
    renderer = F.Renderer(params.image_size, seed=int(_rng(params, _KIND_CLIP_BENCH, _P_NOISE).integers(2**31)))
    (tmp / "Labels").mkdir(parents=True)
    daisee_rows, folder_rows = [CLIP_BENCH_HEADER], ["clip,label"]
    writer = _Writer()
    try:
        for n in range(params.public_students):
            st, profile = clip_bench_student(params, n)
            rng = _rng(params, _KIND_CLIP_BENCH, _P_RENDER, n)
            specs = [(FER7[(n * CLIP_BENCH_CLIPS + c) % len(FER7)], (n + c * 2) % len(ENGAGEMENT_LEVELS))
                     for c in range(CLIP_BENCH_CLIPS)]
            frames = [f for lab, level in specs for f in engaged_clip_frames(lab, level, st.style, profile.camera, rng, rng)]
            images, lms = renderer.render_batch(st.identity, frames, rng, F.draw_background(st.background, renderer.canvas))
            for c, (lab, level) in enumerate(specs):
                clip_id = f"{n:06d}{c:04d}"
                folder = tmp / "DataSet" / "Test" / f"{n:06d}" / clip_id
                folder.mkdir(parents=True)
                for k in range(CLIP_LENGTH):
                    writer.png(folder / f"frame_{k:02d}.png", images[c * CLIP_LENGTH + k])
                # the clip's landmarks beside its frames (read by the evaluation node for landmark models)
                np.save(folder / "landmarks.npy", lms[c * CLIP_LENGTH:(c + 1) * CLIP_LENGTH].astype(np.float32))
                daisee_rows.append(f"{clip_id}.avi,0,{level},0,0")
                folder_rows.append(f"DataSet/Test/{n:06d}/{clip_id},{lab}")
            counter.step(len(frames), "clip benchmark")
    finally:
        writer.close()
    (tmp / "Labels" / "TestLabels.csv").write_text("\n".join(daisee_rows) + "\n")
    (tmp / "labels.csv").write_text("\n".join(folder_rows) + "\n")
    meta = {"generator": GENERATOR, "version": GENERATOR_VERSION, "clip_version": CLIP_VERSION,
            "part_key": _clip_bench_key(params), "num_clips": len(folder_rows) - 1, "clip_length": CLIP_LENGTH,
            "readers": {"synthetic-clips": "clipfolder (FER7)", "synthetic-daisee": "daisee (engagement)"}}
    _write_json(tmp / "clips.json", meta)
    return meta


def ensure_clip_bench(root: str | Path, params: SynthParams, progress: Progress | None = None,
                      force: bool = False) -> Path:
    """Make <root>/clipbench complete and current (only meaningful with clips_per_student > 0)."""
    root = Path(root).expanduser()
    counter = _Counter(progress, clip_bench_count(params))
    return _build_part(root, root / "clipbench", "clips.json", _clip_bench_key(params), "clipbench", force,
                       lambda tmp: _write_clip_bench(tmp, params, counter))


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Exclusive fcntl lock on <root>/.locks/<name>.lock (blocks until the holder is done)."""
    lock_dir = root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _part_ok(marker: Path, key: str) -> bool:
    meta = _read_json(marker)
    return meta is not None and meta.get("generator") == GENERATOR and meta.get("part_key") == key


def _build_part(root: Path, final: Path, marker_name: str, key: str, lock_name: str, force: bool,
                write: Callable[[Path], Any]) -> Path:
    """Build a part into a fresh temp dir beside `final` and rename it into place, under a lock."""
    if not force and _part_ok(final / marker_name, key):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root, lock_name):
        if not force and _part_ok(final / marker_name, key):   # another process built it meanwhile
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):   # left by a crashed builder
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write(tmp)
            if final.exists():
                trash = final.parent / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def ensure_school(root: str | Path, params: SynthParams, school_index: int, progress: Progress | None = None,
                  force: bool = False) -> Path:
    """Make <root>/schools/school-NN complete and current; returns its directory.

    Depends only on the seed, the index and the per-school sizes, so a simulated client can build just
    its own school. Safe to call from several processes at once (one builds, the others wait)."""
    if not 0 <= school_index:
        raise ValueError(f"school index must be >= 0, got {school_index}")
    root = Path(root).expanduser()
    final = root / "schools" / school_id(school_index)
    counter = _Counter(progress, school_image_count(params, school_index))
    return _build_part(root, final, "school.json", _school_key(params, school_index), school_id(school_index), force,
                       lambda tmp: _write_school(tmp, params, school_index, counter))


def ensure_public(root: str | Path, params: SynthParams, progress: Progress | None = None,
                  force: bool = False, workers: int = 1) -> Path:
    """Make <root>/public complete and current (FER2013 CSV + RAF-DB layout); returns its directory.
    `workers` processes render the training split's identities (the same bytes as one)."""
    root = Path(root).expanduser()
    counter = _Counter(progress, public_image_count(params))
    return _build_part(root, root / "public", "public.json", _public_key(params), "public", force,
                       lambda tmp: _write_public(tmp, params, counter, workers))


def ensure_indomain(root: str | Path, params: SynthParams, progress: Progress | None = None,
                    force: bool = False) -> Path:
    """Make <root>/indomain complete and current (every school's held-out students); returns its directory."""
    root = Path(root).expanduser()
    counter = _Counter(progress, indomain_image_count(params))
    return _build_part(root, root / "indomain", "indomain.json", _indomain_key(params), "indomain", force,
                       lambda tmp: _write_indomain(tmp, params, counter))


def _manifest(params: SynthParams, root: Path) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for i in range(params.schools):
        meta = _read_json(root / "schools" / school_id(i) / "school.json") or _planned_school(params, i)
        counts[school_id(i)] = {"students": meta.get("num_students"), "frames": meta.get("num_frames"),
                                "clips": meta.get("num_clips"), "label_counts": meta.get("label_counts")}
    pub = _read_json(root / "public" / "public.json") or {}
    counts["public"] = {"identities": pub.get("num_identities"), "images": pub.get("num_images"),
                        "label_counts": pub.get("label_counts")}
    counts["public"]["train_images"] = (pub.get("train") or {}).get("num_images", 0)
    indomain = _read_json(root / "indomain" / "indomain.json") or {}
    counts["indomain"] = {"images": indomain.get("num_images", 0), "label_counts": indomain.get("label_counts")}
    counts["total_frames"] = sum(counts[school_id(i)]["frames"] or 0 for i in range(params.schools))
    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "seed": params.seed, "params": _hashed_params(params),
            "params_hash": params_hash(params), "schools": [school_id(i) for i in range(params.schools)],
            "counts": counts, "label_set": LABEL_SET, "labels": list(FER7), "landmarks": "ibug68",
            "clip_length": CLIP_LENGTH, "public": {"fer2013": "public/fer2013.csv", "rafdb": "public/rafdb"}}


def _planned_school(params: SynthParams, index: int) -> dict[str, Any]:
    """A school's sizes before it is built (on-demand generation): they follow from its profile alone;
    its label counts are known once it is drawn."""
    students = school_profile(params, index).num_students
    return {"num_students": students, "num_frames": students * params.frames_per_student,
            "num_clips": students * params.clips_per_student, "label_counts": None}


def _dataset_ok(root: Path, params: SynthParams, on_demand: bool = False) -> bool:
    manifest = _read_json(root / "manifest.json")
    if not manifest or manifest.get("version") != GENERATOR_VERSION or manifest.get("params") != _hashed_params(params):
        return False
    return ((on_demand or all(_part_ok(root / "schools" / school_id(i) / "school.json", _school_key(params, i))
                              for i in range(params.schools)))
            and _part_ok(root / "public" / "public.json", _public_key(params))
            and (params.heldout_students == 0 or _part_ok(root / "indomain" / "indomain.json", _indomain_key(params)))
            and (params.clips_per_student == 0 or _part_ok(root / "clipbench" / "clips.json", _clip_bench_key(params))))


def other_settings(root: str | Path, params: SynthParams) -> list[str]:
    """How the classroom already in `root` (its manifest) was made differently from `params`, as
    "name: was X, now Y" (empty: no classroom there, or the same settings). `ensure_dataset` would rebuild
    such a folder to `params`; a command given that folder by name asks first."""
    manifest = _read_json(Path(root).expanduser() / "manifest.json")
    if not manifest or manifest.get("version") != GENERATOR_VERSION or not isinstance(manifest.get("params"), dict):
        return []
    was, now = manifest["params"], _hashed_params(params)
    return [f"{key}: was {was.get(key)!r}, now {now.get(key)!r}" for key in sorted(set(was) | set(now))
            if was.get(key) != now.get(key)]


_Part = tuple[str, int, Callable[..., Path], tuple]   # name, image count, builder, builder's arguments


def ensure_dataset(root: str | Path, params: SynthParams, progress: Progress | None = None,
                   force: bool = False, workers: int | None = None, on_demand: bool = False) -> Path:
    """Generate every school and the public split unless <root> already holds them for these params.

    Parts whose inputs did not change are kept (growing `schools` from 4 to 6 builds two schools);
    schools beyond `params.schools` left by an earlier build are removed; the manifest is written last
    (atomically), so a complete manifest means a complete dataset. `force` rebuilds everything.
    `workers` processes build parts side by side (default: one per core). `on_demand` builds the
    public and in-domain parts only: each school is built by :func:`ensure_school` when it is first
    needed (simulations/school_service.py), with the same bytes; the manifest then lists every school
    with the sizes its profile fixes."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    if not force and _dataset_ok(root, params, on_demand):
        return root
    with _locked(root, "dataset"):
        if not force and _dataset_ok(root, params, on_demand):
            return root
        sizes = [0 if on_demand else school_image_count(params, i) for i in range(params.schools)]
        cores = int(workers or os.cpu_count() or 1)
        total = sum(sizes) + public_image_count(params) + indomain_image_count(params) + clip_bench_count(params)
        parts: list[_Part] = [
            (school_id(i), sizes[i], ensure_school, (root, params, i))
            for i in ([] if on_demand else range(params.schools))]
        # the public split is the longest part: it renders its training identities in `workers` processes
        # while the other parts share the pool (the cores stay busy until the last part ends)
        parts.append(("public", public_image_count(params), partial(ensure_public, workers=cores), (root, params)))
        if params.heldout_students:
            parts.append(("indomain", indomain_image_count(params), ensure_indomain, (root, params)))
        if params.clips_per_student:
            parts.append(("clipbench", clip_bench_count(params), ensure_clip_bench, (root, params)))
        workers = max(1, min(cores, len(parts)))
        if workers == 1:
            _build_parts_in_order(parts, total, progress, force)
        else:
            _build_parts_in_parallel(parts, workers, total, progress, force)
        _remove_stale_parts(root, params)
        tmp = root / f".manifest-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        _write_json(tmp, _manifest(params, root))
        os.replace(tmp, root / "manifest.json")
    return root


def _build_parts_in_order(parts: list[_Part], total: int, progress: Progress | None, force: bool) -> None:
    """Build each part in this process, reporting progress across all parts image by image."""
    def shifted(offset: int) -> Progress | None:
        if progress is None:
            return None
        return lambda done, _part_total, what: progress(offset + done, total, what)

    offset = 0
    for name, size, build, args in parts:
        build(*args, progress=shifted(offset), force=force)
        offset += size
        if progress is not None:
            progress(offset, total, name)


def _build_parts_in_parallel(parts: list[_Part], workers: int, total: int, progress: Progress | None,
                             force: bool) -> None:
    """Build parts in `workers` processes, reporting progress per finished part."""
    # Every part depends only on the seed and its own index, so parts build in parallel processes
    # with the same bytes as one after another. Progress is then reported per finished part.
    # fork, not spawn: spawn re-runs the caller's main module, and the parts need no torch.
    done = 0
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        # largest first: the public split (100 px) would otherwise start last and finish alone
        ordered = sorted(parts, key=lambda part: -part[1])
        futures = {pool.submit(build, *args, force=force): (name, size) for name, size, build, args in ordered}
        for future in as_completed(futures):
            future.result()
            name, size = futures[future]
            done += size
            if progress is not None:
                progress(done, total, name)


def _remove_stale_parts(root: Path, params: SynthParams) -> None:
    """Remove parts an earlier build left that these params do not have (extra schools, an unwanted indomain)."""
    for old in sorted((root / "schools").glob("school-*")):
        meta = _read_json(old / "school.json")
        try:
            index = int(old.name.split("-", 1)[1])
        except ValueError:
            continue
        if index >= params.schools and meta is not None and meta.get("generator") == GENERATOR:
            shutil.rmtree(old, ignore_errors=True)
    stale = _read_json(root / "indomain" / "indomain.json")
    if not params.heldout_students and stale is not None and stale.get("generator") == GENERATOR:
        shutil.rmtree(root / "indomain", ignore_errors=True)   # would otherwise score students of other params


# ------------------------------------------------------------------------------------------------
# For the CLI (`fedfer data synth`)
# ------------------------------------------------------------------------------------------------


def summary(root: str | Path) -> str:
    """A plain-text table of a built dataset (schools, camera, students, frames, clips, label counts)."""
    root = Path(root).expanduser()
    manifest = _read_json(root / "manifest.json")
    if manifest is None:
        raise ValueError(f"{root / 'manifest.json'}: missing or unreadable; build the dataset first")
    short = [label[:3] for label in FER7]
    lines = [f"synthetic classroom at {root} (seed {manifest['seed']}, generator v{manifest['version']})",
             f"{'school':<10} {'camera':<18} {'students':>8} {'frames':>7} {'clips':>6}  " + " ".join(f"{s:>5}" for s in short)]
    for sid in manifest["schools"]:
        meta = _read_json(root / "schools" / sid / "school.json") or {}
        counts = meta.get("label_counts", {})
        lines.append(f"{sid:<10} {meta.get('camera_profile', {}).get('name', '?'):<18} {meta.get('num_students', 0):>8} "
                     f"{meta.get('num_frames', 0):>7} {meta.get('num_clips', 0):>6}  "
                     + " ".join(f"{counts.get(label, 0):>5}" for label in FER7))
    pub = _read_json(root / "public" / "public.json") or {}
    counts = pub.get("label_counts", {})
    lines.append(f"{'public':<10} {'(4 photo sources)':<18} {pub.get('num_identities', 0):>8} "
                 f"{pub.get('num_images', 0):>7} {'-':>6}  " + " ".join(f"{counts.get(label, 0):>5}" for label in FER7))
    return "\n".join(lines)


ON_DEMAND_ABOVE = 100   # data.generate=auto: schools are generated when first sampled above this many


def generation_mode(cfg: Mapping[str, Any]) -> str:
    """`upfront` or `on-demand` for a config's `data.generate` (auto: on-demand above ON_DEMAND_ABOVE schools)."""
    mode = str(cfg.get("data.generate", "upfront") or "upfront")
    if mode == "auto":
        return "on-demand" if int(cfg.get("federation.schools", 0)) > ON_DEMAND_ABOVE else "upfront"
    return mode


def schools_built(cfg: Mapping[str, Any]) -> bool:
    """Whether every school of the config's synthetic classroom is already built (and current)."""
    return _dataset_ok(root_from_config(cfg), params_from_config(cfg))


def start_building_schools(cfg: Mapping[str, Any]) -> multiprocessing.process.BaseProcess:
    """Build the config's schools in a child process on one core, silently, while the caller uses the other
    (`fedfer simulate` pre-trains on the public split meanwhile: that is one thread, so a core would idle).
    Nothing to hand over: the dataset's lock makes a later :func:`ensure_for_config` wait for the child and
    then find the schools built (or build what a failed child left out, and raise its error)."""
    child = multiprocessing.get_context("fork").Process(
        target=ensure_dataset, args=(root_from_config(cfg), params_from_config(cfg)), kwargs={"workers": 1},
        name="fedfer-synth-schools", daemon=True)   # fork: the child runs no torch, and the caller's main module is not re-run
    child.start()
    return child


def ensure_for_config(cfg: Mapping[str, Any], echo: Callable[[str], None] = print, on_demand: bool = False) -> Path:
    """Build (or reuse) the synthetic classroom a config describes, printing progress by tenths;
    returns its folder. Every command that needs the data calls this once, before Flower starts, so
    the apps themselves only ever read it. `on_demand`: the schools are left to simulations/school_service.py."""
    shown = [-1]

    def progress(done: int, total: int, what: str) -> None:
        decile = 10 * done // max(total, 1)
        if decile > shown[0]:
            shown[0] = decile
            echo(f"  synthetic classroom: {done}/{total} images ({what})")

    return ensure_dataset(root_from_config(cfg), params_from_config(cfg), progress=progress, on_demand=on_demand)
