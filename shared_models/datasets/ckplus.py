"""CK+ (Extended Cohn-Kanade): posed sequences from neutral to peak.

Layout (`path` = the folder holding both):

* frames ``cohn-kanade-images/S005/001/S005_001_00000011.png``
* labels ``Emotion/S005/001/S005_001_00000011_emotion.txt`` — one code stored as float text
  (``   3.0000000e+00``), parsed with ``int(float(text))``; only 327 of the 593 sequences have one,
  and a sequence without an Emotion file has no label and is not used.

Protocol (the common one): the **last ``last_frames`` frames** (default 3) of each labelled
sequence take its label; with ``first_as_neutral=True`` the first frame is added as *neutral*.
Label set FER8 (CK+ has contempt). Metadata: ``identity`` = subject (``S005``), ``sequence``
(``S005/001``), ``frame`` index. There is no official split: ``all`` is the only split; build
subject-disjoint folds from ``bench.metadata['identity']``.
"""

from __future__ import annotations

import math
from pathlib import Path

from shared_models.datasets.base import (
    Benchmark, BenchmarkError, Collected, is_image_file, map_code, natural_key, read_small_file, require_dir,
    resolve_split,
)
from shared_models.labels import FER8

#: CK+ emotion code -> index in FER8.
CKPLUS_TO_FER8: dict[int, int] = {
    0: FER8.index("neutral"),
    1: FER8.index("angry"),
    2: FER8.index("contempt"),
    3: FER8.index("disgust"),
    4: FER8.index("fear"),
    5: FER8.index("happy"),
    6: FER8.index("sad"),
    7: FER8.index("surprise"),
}
SPLITS: dict[str, tuple[str, ...]] = {"all": ("all",)}


def _float_code(text: str) -> int:
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(text)
    return int(value)


def open_ckplus(path: Path, *, name: str = "ckplus", split: str | None = None, last_frames: int = 3,
                first_as_neutral: bool = False, check_images: bool = True) -> Benchmark:
    """Open CK+ at `path` (see the module docstring)."""
    if last_frames < 1:
        raise BenchmarkError(f"{name}: last_frames must be >= 1, got {last_frames}")
    root = Path(path)
    images = require_dir(root / "cohn-kanade-images", "CK+ frames (cohn-kanade-images)")
    emotion = require_dir(root / "Emotion", "CK+ labels (Emotion)")
    split_name, _ = resolve_split(name, split, SPLITS, "all")
    collected = Collected()
    files = sorted(emotion.rglob("*_emotion.txt"), key=lambda p: natural_key(str(p)))
    if not files:
        raise BenchmarkError(f"{emotion}: no *_emotion.txt files")
    for label_file in files:
        sequence = label_file.parent.relative_to(emotion)
        if len(sequence.parts) != 2:
            raise BenchmarkError(f"{label_file}: expected Emotion/<subject>/<sequence>/…_emotion.txt")
        text = read_small_file(label_file, "CK+ emotion file").decode("utf-8", errors="replace").strip()
        label = map_code(text, CKPLUS_TO_FER8, str(label_file), "the emotion file", parse=_float_code)
        frame_dir = images / sequence
        frames = sorted((p for p in frame_dir.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name)) \
            if frame_dir.is_dir() else []
        if not frames:
            raise BenchmarkError(f"{frame_dir}: no frames for labelled sequence {sequence.as_posix()}")
        subject = sequence.parts[0]
        chosen = list(range(max(0, len(frames) - last_frames), len(frames)))
        for i in chosen:
            collected.add(frames[i], label, identity=subject, sequence=sequence.as_posix(), frame=i)
        if first_as_neutral and 0 not in chosen:
            collected.add(frames[0], FER8.index("neutral"), identity=subject, sequence=sequence.as_posix(), frame=0)
    return collected.build_images(
        name=name, labels=FER8, split=split_name, path=root, check_images=check_images,
        notes=(f"{len(files)} labelled sequences; last {last_frames} frame(s) labelled"
               + ("; first frame as neutral" if first_as_neutral else ""),),
    )
