"""A school's private faces, read from its data directory.

The format is the one a school's IT admin can produce from any camera export, and the one the
synthetic classroom writes:

    <data-dir>/labels.csv      header: path,label,student_id[,clip_id,frame]
    <data-dir>/images/...      the image files `path` points to (relative to <data-dir>)

`label` is a class name of the FER7 set (angry, disgust, fear, happy, sad, surprise, neutral).
Rows whose image cannot be decoded or whose label is unknown are skipped and counted, so one bad file
never stops a school; a missing labels.csv or a missing column is an error naming the file.
A UTF-8 byte-order mark (spreadsheet exports) is accepted. A `path` must stay inside <data-dir>:
absolute paths, ``..`` and symlinks that resolve outside it are skipped and counted, and so are
files that are not regular files (a named pipe would block the reader) and images whose header
claims more than ``MAX_IMAGE_PIXELS`` pixels (decompression bombs).
Nothing here ever leaves the school: the client sends only DP-noised weights, public values and its ledger.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared_models.datasets.base import MAX_IMAGE_PIXELS   # one pixel cap for every image fedfer decodes
from shared_models.labels import FER7

REQUIRED_COLUMNS = ("path", "label", "student_id")
#: Largest labels.csv read (a school's list of frames is a few MB at most).
MAX_LABELS_BYTES = 256 * 1024 * 1024


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


class _SkippedImage(ValueError):
    """An image row skipped on purpose; args = (reason counted, detail for the message)."""


def _inside(data_dir: Path, relative: str) -> Path:
    """The file `relative` names, refusing paths that leave `data_dir` (absolute, ``..``, or a
    symlink anywhere on the way that resolves outside it)."""
    if not relative.strip():
        raise _SkippedImage("missing images", "empty path")
    candidate = Path(relative)
    if candidate.is_absolute() or candidate.drive:
        raise _SkippedImage("paths outside the data directory", f"{relative!r} is an absolute path")
    root = data_dir.resolve()
    try:
        resolved = (root / candidate).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loop, NUL byte
        raise _SkippedImage("unreadable images", f"{relative!r} cannot be resolved") from None
    if resolved != root and root not in resolved.parents:
        raise _SkippedImage("paths outside the data directory", f"{relative!r} leads outside {data_dir}")
    return resolved


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    try:
        mode = os.stat(path).st_mode
    except ValueError:
        raise _SkippedImage("unreadable images", f"{path} unreadable (bad name)") from None
    if not stat.S_ISREG(mode):  # FileNotFoundError above propagates; a FIFO would block open()
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise _SkippedImage("not regular files", f"{path} is {kind}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img_file = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _SkippedImage("images too large", f"{path} over PIL's decompression-bomb limit") from None
    with img_file as img:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise _SkippedImage("images too large", f"{path} claims {width}x{height} pixels "
                                                    f"(limit {MAX_IMAGE_PIXELS:,})")
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
    fingerprint, rows = _read_labels_csv(data_dir, labels_csv)
    images, labels, students, skipped, first_problem = _decode_rows(data_dir, labels_csv, rows, still_frames_only)
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


def still_frame_rows(data_dir: str | Path) -> list[dict]:
    """The rows of a school's labels.csv that are still frames (no clip id), read as `load_school` reads them
    but without decoding any image: what `fedfer deploy add-school` counts to propose the declared size."""
    data_dir = Path(data_dir)
    _, rows = _read_labels_csv(data_dir, data_dir / "labels.csv")
    return [row for row in rows if _is_still_frame(row)]


def _is_still_frame(row: dict) -> bool:
    return not (row.get("clip_id") or "").strip()


def _read_labels_csv(data_dir: Path, labels_csv: Path) -> tuple[str, list[dict]]:
    """The fingerprint (SHA-256 of labels.csv's bytes) and its rows; a clear error if it cannot be read."""
    if not data_dir.is_dir():
        raise SchoolDataError(f"{data_dir}: data directory not found")
    if not labels_csv.is_file():
        raise SchoolDataError(f"{labels_csv}: file not found (a school needs labels.csv: path,label,student_id)")
    with open(labels_csv, "rb") as handle:
        raw = handle.read(MAX_LABELS_BYTES + 1)
    if len(raw) > MAX_LABELS_BYTES:
        raise SchoolDataError(f"{labels_csv}: larger than {MAX_LABELS_BYTES // 2**20} MB")
    fingerprint = hashlib.sha256(raw).hexdigest()
    try:
        # utf-8-sig: spreadsheet programs save "CSV UTF-8" with a byte-order mark
        reader = csv.DictReader(raw.decode("utf-8-sig").splitlines())
        header = reader.fieldnames or []
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SchoolDataError(f"{labels_csv}: not a readable CSV ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise SchoolDataError(f"{labels_csv}: missing column(s) {', '.join(missing)}")
    return fingerprint, rows


def _decode_rows(data_dir: Path, labels_csv: Path, rows: list[dict], still_frames_only: bool
                 ) -> tuple[list[np.ndarray], list[int], list[str], dict[str, int], str]:
    """Decode each usable row: (images, label indices, student ids, skipped counts by reason, first problem)."""
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
        if still_frames_only and not _is_still_frame(row):
            continue
        name = (row.get("label") or "").strip().lower()
        if name not in FER7:
            skip("unknown labels", line, f"unknown label {row.get('label')!r}")
            continue
        student = (row.get("student_id") or "").strip()
        if not student:
            skip("rows without student_id", line, "empty student_id")
            continue
        try:
            path = _inside(data_dir, row.get("path") or "")
            face = _decode(path, size)
        except _SkippedImage as exc:
            skip(exc.args[0], line, exc.args[1])
            continue
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
    return images, labels, students, skipped, first_problem


# ------------------------------------------------------------------------------------------------ clips
#: the tasks a school's clips can be labelled for (config key `model.task`)
TASKS = ("fer7", "engagement")
#: DAiSEE's four engagement levels (also accepted in labels.csv's `engagement` column as 0..3)
ENGAGEMENT_LEVELS = ("very low", "low", "high", "very high")
LANDMARKS_FILE = "landmarks.npy"   # float32 (rows of labels.csv, 68, 2), pixel x, y; optional


@dataclass
class SchoolClips:
    """Decoded clips of one school: rows of labels.csv with a `clip_id`, grouped by clip, `frame` ordering
    them; each clip reduced to `num_frames` evenly spaced frames. Landmarks come from landmarks.npy next to
    labels.csv when it has one (68, 2) row per labels.csv row, else None."""

    data_dir: Path
    clips: np.ndarray             # uint8 (N, T, H, W, 3)
    labels: np.ndarray            # int64 (N,): FER7 indices, or engagement levels 0..3
    student_ids: list[str]        # (N,) the student of each clip (the privacy unit)
    landmarks: np.ndarray | None  # float32 (N, T, 68, 2) in pixels of the frames, or None
    task: str
    skipped: dict[str, int] = field(default_factory=dict)
    first_problem: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_students(self) -> int:
        return len(set(self.student_ids))

    @property
    def image_size(self) -> int:
        return int(self.clips.shape[2]) if self.clips.ndim == 5 else 0

    def describe_skips(self) -> str:
        return SchoolData.describe_skips(self)  # type: ignore[arg-type]


def _clip_label(row: dict, task: str, where: str) -> int:
    """The clip's label for `task` from one labels.csv row; _SkippedImage if unusable."""
    if task == "fer7":
        name = (row.get("label") or "").strip().lower()
        if name not in FER7:
            raise _SkippedImage("unknown labels", f"{where}: unknown label {row.get('label')!r}")
        return FER7.index(name)
    text = (row.get("engagement") or "").strip().lower()
    if text in ENGAGEMENT_LEVELS:
        return ENGAGEMENT_LEVELS.index(text)
    if text in ("0", "1", "2", "3"):
        return int(text)
    raise _SkippedImage("unknown engagement levels", f"{where}: engagement {row.get('engagement')!r} "
                                                     f"(expected 0..3 or {', '.join(ENGAGEMENT_LEVELS)})")


def _group_clips(rows: list[dict]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(student_id, clip_id) -> [(frame number, row index)] sorted by frame, for rows with a clip id."""
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for i, row in enumerate(rows):
        clip = (row.get("clip_id") or "").strip()
        if not clip:
            continue
        try:
            frame = int(str(row.get("frame") or "").strip())
        except ValueError:
            frame = i   # no usable frame number: keep the file's order
        groups.setdefault(((row.get("student_id") or "").strip(), clip), []).append((frame, i))
    return {key: sorted(members) for key, members in groups.items()}


def _read_landmarks(data_dir: Path, n_rows: int) -> np.ndarray | None:
    path = data_dir / LANDMARKS_FILE
    if not path.is_file():
        return None
    try:
        marks = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SchoolDataError(f"{path}: not a readable .npy array ({exc.__class__.__name__})") from None
    if marks.shape != (n_rows, 68, 2) or not np.issubdtype(marks.dtype, np.floating):
        raise SchoolDataError(f"{path}: expected float (rows of labels.csv = {n_rows}, 68, 2), got "
                              f"{marks.dtype} {marks.shape}")
    return marks.astype(np.float32)


def load_school_clips(data_dir: str | Path, num_frames: int, task: str = "fer7") -> SchoolClips:
    """Read and decode a school's labelled clips (rows of labels.csv with `clip_id` and `frame`).

    The label of a clip is that of its last frame (the apex of an onset -> apex clip): `label` (FER7) for
    task fer7, the `engagement` column for task engagement. A clip with an unusable frame is skipped whole."""
    from shared_models.datasets.frames import sample_indices

    if task not in TASKS:
        raise SchoolDataError(f"model.task must be one of {', '.join(TASKS)}; got {task!r}")
    data_dir = Path(data_dir)
    labels_csv = data_dir / "labels.csv"
    _, rows = _read_labels_csv(data_dir, labels_csv)
    if task == "engagement" and rows and "engagement" not in rows[0]:
        raise SchoolDataError(f"{labels_csv}: missing column engagement (model.task=engagement)")
    marks = _read_landmarks(data_dir, len(rows))
    out = SchoolClips(data_dir, np.zeros((0, num_frames, 1, 1, 3), np.uint8), np.zeros(0, np.int64), [],
                      None, task)
    clips, labels, chosen_rows = [], [], []
    size: tuple[int, int] | None = None
    for (student, clip), members in _group_clips(rows).items():
        picked = [members[k][1] for k in sample_indices(len(members), num_frames)]
        where = f"{labels_csv} line {members[-1][1] + 2}"
        try:
            if not student:
                raise _SkippedImage("rows without student_id", f"{where}: empty student_id")
            label = _clip_label(rows[members[-1][1]], task, where)
            frames = [_decode(_inside(data_dir, rows[i].get("path") or ""), size) for i in picked]
        except _SkippedImage as exc:
            _count_skip(out, exc.args[0], exc.args[1])
            continue
        except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError, ValueError) as exc:
            _count_skip(out, "unreadable clips", f"{where}: clip {clip} ({exc.__class__.__name__})")
            continue
        size = size or (frames[0].shape[1], frames[0].shape[0])
        clips.append(np.stack(frames))
        labels.append(label)
        out.student_ids.append(student)
        chosen_rows.append(picked)
    if clips:
        out.clips = np.stack(clips)
        out.labels = np.asarray(labels, dtype=np.int64)
        out.landmarks = marks[np.asarray(chosen_rows)] if marks is not None else None
    return out


def _count_skip(out: SchoolClips, reason: str, detail: str) -> None:
    out.skipped[reason] = out.skipped.get(reason, 0) + 1
    if not out.first_problem:
        out.first_problem = detail
