"""A school's private faces, read from its data directory.

The format is the one a school's IT admin can produce from any camera export, and the one the
synthetic classroom writes:

    <data-dir>/labels.csv      header: path,label,student_id[,clip_id,frame]
    <data-dir>/images/...      the image files `path` points to (relative to <data-dir>)

`label` is a class name of the FER7 set (angry, disgust, fear, happy, sad, surprise, neutral).
Rows whose image cannot be decoded or whose label is unknown are skipped and counted, so one bad file
never stops a school; a missing labels.csv or a missing column is an error naming the file.
Nothing here ever leaves the school: the client sends only DP-noised weights, public values and its ledger.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared_models.labels import FER7

REQUIRED_COLUMNS = ("path", "label", "student_id")


class SchoolDataError(ValueError):
    """The school's data directory cannot be used at all (one line, naming the file)."""


@dataclass
class SchoolData:
    """Decoded faces of one school, in memory, with what was skipped and why."""

    data_dir: Path
    images: np.ndarray            # uint8 (N, H, W, 3)
    labels: np.ndarray            # int64 (N,) indices into FER7
    student_ids: list[str]        # (N,)
    fingerprint: str              # sha256 of labels.csv, for local diagnostics only: never sent, and not the
                                  # accountant's identity (one random id per state dir, privacy/accounting.py)
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count
    first_problem: str = ""       # the first skipped row, as a one-line message

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_students(self) -> int:
        return len(set(self.student_ids))

    def describe_skips(self) -> str:
        if not self.skipped:
            return ""
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{self.data_dir}: skipped {parts} (first: {self.first_problem})"


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None and img.size != size:
            img = img.resize(size, Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def load_school(data_dir: str | Path, still_frames_only: bool = True) -> SchoolData:
    """Read and decode a school's labelled frames.

    `still_frames_only` keeps rows without a clip id: clips (onset -> apex) carry the apex label on
    near-neutral onset frames and are meant for temporal models.
    """
    data_dir = Path(data_dir)
    labels_csv = data_dir / "labels.csv"
    if not data_dir.is_dir():
        raise SchoolDataError(f"{data_dir}: data directory not found")
    if not labels_csv.is_file():
        raise SchoolDataError(f"{labels_csv}: file not found (a school needs labels.csv: path,label,student_id)")
    raw = labels_csv.read_bytes()
    fingerprint = hashlib.sha256(raw).hexdigest()
    try:
        reader = csv.DictReader(raw.decode("utf-8").splitlines())
        header = reader.fieldnames or []
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SchoolDataError(f"{labels_csv}: not a readable CSV ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise SchoolDataError(f"{labels_csv}: missing column(s) {', '.join(missing)}")

    images: list[np.ndarray] = []
    labels: list[int] = []
    students: list[str] = []
    skipped: dict[str, int] = {}
    first_problem = ""
    size: tuple[int, int] | None = None

    def skip(reason: str, line: int, detail: str) -> None:
        nonlocal first_problem
        skipped[reason] = skipped.get(reason, 0) + 1
        if not first_problem:
            first_problem = f"{labels_csv} line {line}: {detail}"

    for line, row in enumerate(rows, start=2):
        if still_frames_only and (row.get("clip_id") or "").strip():
            continue
        name = (row.get("label") or "").strip().lower()
        if name not in FER7:
            skip("unknown labels", line, f"unknown label {row.get('label')!r}")
            continue
        student = (row.get("student_id") or "").strip()
        if not student:
            skip("rows without student_id", line, "empty student_id")
            continue
        path = data_dir / (row.get("path") or "")
        try:
            face = _decode(path, size)
        except (FileNotFoundError, IsADirectoryError):
            skip("missing images", line, f"{path} not found")
            continue
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            skip("unreadable images", line, f"{path} unreadable ({exc.__class__.__name__})")
            continue
        if size is None:
            size = (face.shape[1], face.shape[0])  # later frames are resized to the first one's size
        images.append(face)
        labels.append(FER7.index(name))
        students.append(student)

    stacked = np.stack(images) if images else np.zeros((0, 1, 1, 3), dtype=np.uint8)
    return SchoolData(
        data_dir=data_dir,
        images=stacked,
        labels=np.asarray(labels, dtype=np.int64),
        student_ids=students,
        fingerprint=fingerprint,
        skipped=skipped,
        first_problem=first_problem,
    )
