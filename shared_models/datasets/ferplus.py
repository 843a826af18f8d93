"""FERPlus (microsoft/FERPlus ``fer2013new.csv``): ten annotators' votes per FER2013 face.

Header: ``Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF``.
The file has no pixels. They come from either

* ``fer2013.csv`` — same rows in the same order (matched by row position, Usage checked per row),
  looked for beside ``fer2013new.csv`` and one folder up; or
* the PNG folders FERPlus's ``generate_training_data.py`` writes: ``FER2013Train``,
  ``FER2013Valid``, ``FER2013Test`` (beside the CSV or under ``data/``), file = ``Image name``.
  The name is taken from the column, never from the row number (the README's rule is wrong).

Labels (``mode``):

* ``majority`` (default; the FERPlus rule of ``src/ferplus.py``, used for Valid/Test): counts ≤ 1
  are zeroed; if the largest count is more than half of the remaining votes it is the label,
  otherwise the face is *unknown*; faces whose label is unknown or NF are dropped (ties cannot
  pass 50 % so they drop too).
* ``distribution``: every row with at least one emotion vote is kept, the label is the
  argmax of the raw emotion votes (first in FERPlus order on a tie), and
  ``bench.soft_targets`` (N, 8) holds the vote distribution over the 8 emotions in FER8 order.
  ``soft_targets`` is filled in majority mode too.

Splits: ``train`` = Training, ``val`` = PublicTest (FER2013Valid), ``test`` = PrivateTest
(FER2013Test, **default**, as for FER2013), ``all``. Label set: FER8 (contempt = 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from shared_models.datasets.base import (
    Benchmark, BenchmarkError, CheckedCsvReader, Collected, PixelArray, named_inside, require_file, resolve_split,
)
from shared_models.datasets.fer2013 import SPLITS, Row, parse_pixels, read_rows
from shared_models.labels import FER8

#: FERPlus vote columns, in file order.
VOTE_COLUMNS: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF",
)
#: FERPlus emotion index (column order, 0..7) -> index in FER8.
FERPLUS_TO_FER8: dict[int, int] = {
    0: FER8.index("neutral"),
    1: FER8.index("happy"),
    2: FER8.index("surprise"),
    3: FER8.index("sad"),
    4: FER8.index("angry"),
    5: FER8.index("disgust"),
    6: FER8.index("fear"),
    7: FER8.index("contempt"),
}
#: Usage -> image folder written by FERPlus's generate_training_data.py.
FOLDERS: dict[str, str] = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}
MODES = ("majority", "distribution")
DEFAULT_SPLIT = "test"


def majority_label(votes: np.ndarray) -> int | None:
    """FERPlus majority rule on the 10 vote counts: the FERPlus emotion index 0..7, or None
    (unknown / NF / no clear majority) — a transcription of ``_process_data`` in ``src/ferplus.py``."""
    counts = np.where(votes <= 1, 0, votes).astype(float)
    total = counts.sum()
    top = int(np.argmax(counts))
    if total <= 0 or counts[top] <= 0.5 * total:
        return None  # forced to 'unknown'
    return top if top < 8 else None  # unknown (8) and NF (9) are dropped by the loader


def _vote_distribution(votes: np.ndarray) -> np.ndarray:
    """Raw votes over the 8 emotions, normalised, reordered to FER8."""
    emotions = votes[:8].astype(np.float64)
    dist = np.zeros(len(FER8))
    total = emotions.sum()
    if total > 0:
        for j, k in FERPLUS_TO_FER8.items():
            dist[k] = emotions[j] / total
    return dist


def _find_pixel_source(csv_path: Path) -> tuple[str, Path]:
    for candidate in (csv_path.parent / "fer2013.csv", csv_path.parent.parent / "fer2013.csv",
                      csv_path.parent / "fer2013" / "fer2013.csv"):
        if candidate.is_file():
            return "csv", candidate
    for root in (csv_path.parent, csv_path.parent / "data"):
        if any((root / folder).is_dir() for folder in FOLDERS.values()):
            return "folders", root
    raise BenchmarkError(
        f"{csv_path}: no pixels for FERPlus: put fer2013.csv beside it, or the FER2013Train/FER2013Valid/"
        "FER2013Test image folders (beside it or under data/)"
    )


def open_ferplus(path: Path, *, name: str = "ferplus", split: str | None = None, mode: str = "majority",
                 pixels: Path | None = None, check_images: bool = True) -> Benchmark:
    """Open FERPlus: `path` is ``fer2013new.csv`` or its folder; `pixels` optionally names
    ``fer2013.csv`` or the folder holding ``FER2013Train/…`` explicitly."""
    if mode not in MODES:
        raise BenchmarkError(f"{name}: unknown mode '{mode}' (expected one of {', '.join(MODES)})")
    path = Path(path)
    if path.is_dir():
        path = path / "fer2013new.csv"
    require_file(path, "FERPlus vote file fer2013new.csv")
    split_name, usages = resolve_split(name, split, SPLITS, DEFAULT_SPLIT)
    if pixels is None:
        kind, source_path = _find_pixel_source(path)
    else:
        pixels = Path(pixels)
        kind, source_path = ("csv", pixels) if pixels.is_file() else ("folders", pixels)

    pixel_rows = read_rows(source_path, need_emotion=False) if kind == "csv" else None
    rows = _read_vote_rows(path, _PixelSource(kind, source_path, pixel_rows), set(usages), mode)
    notes = (f"split {split_name} = Usage {'+'.join(usages)}", f"labels: FERPlus {mode} rule",
             f"pixels from {source_path}")
    if kind == "csv":
        array = np.stack(rows.faces) if rows.faces else np.zeros((0, 48, 48), np.uint8)
        bench = Benchmark(
            name=name, labels=FER8, targets=rows.collected.targets, split=split_name, path=path,
            source=PixelArray(array, rows.where), metadata=rows.collected.metadata, skipped=rows.skipped,
            dropped=rows.collected.dropped, notes=notes,
        )
        bench.soft_targets = np.array(rows.soft).reshape(-1, len(FER8))
        return bench
    # image folders: probe files, then keep the soft targets of the readable ones
    rows.collected.metadata["_soft"] = rows.soft
    bench = rows.collected.build_images(name=name, labels=FER8, split=split_name, path=path,
                                        check_images=check_images, notes=notes)
    bench.soft_targets = np.array(bench.metadata.pop("_soft")).reshape(-1, len(FER8))
    return bench


@dataclass
class _PixelSource:
    """Where the faces come from: ``fer2013.csv`` rows read in step with the vote file ("csv"), or
    the FERPlus PNG folders ("folders", `rows` None)."""

    kind: str
    path: Path
    rows: Iterator[Row] | None


@dataclass
class _VoteRows:
    """What the vote file yields: the kept rows (`collected`), their faces and where each came from
    (CSV pixels only), vote distributions, and the faces whose pixels could not be parsed."""

    collected: Collected = field(default_factory=Collected)
    faces: list[np.ndarray] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    soft: list[np.ndarray] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    side: int | None = None      # the side of the first parsed face; every face must match it


def _read_vote_rows(path: Path, source: _PixelSource, wanted: set[str], mode: str) -> _VoteRows:
    """Every row of ``fer2013new.csv``: checked (column count, Usage, agreement with the pixel file's
    row), then kept if its Usage is wanted and its votes give a label under `mode`."""
    rows = _VoteRows()
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = CheckedCsvReader(handle, path)
        header, i_use, i_name, i_votes = _read_header(reader, path)
        for fields in reader:
            if not fields:
                continue
            line = reader.line_num
            pixel_row = _next_pixel_row(source, path, line)
            if len(fields) != len(header):
                raise BenchmarkError(f"{path}:{line}: expected {len(header)} columns, got {len(fields)}")
            usage = fields[i_use].strip()
            if usage not in FOLDERS:
                raise BenchmarkError(f"{path}:{line}: unknown Usage '{usage}' (expected Training, PublicTest, PrivateTest)")
            if pixel_row is not None and pixel_row.usage is not None and pixel_row.usage != usage:
                raise BenchmarkError(
                    f"{path}:{line}: Usage '{usage}' but {source.path.name} line {pixel_row.line} says "
                    f"'{pixel_row.usage}' — the two files must have the same rows in the same order"
                )
            if usage not in wanted:
                continue
            votes = _parse_votes(fields, i_votes, path, line)
            ferplus_index = _label_index(votes, mode, rows.collected)
            if ferplus_index is None:
                continue
            if _keep_face(rows, source, pixel_row, f"{path}:{line}", FERPLUS_TO_FER8[ferplus_index],
                          fields[i_name].strip(), usage):
                rows.soft.append(_vote_distribution(votes))
    if source.rows is not None:
        extra = next(source.rows, None)
        if extra is not None:   # matched by position: a shorter vote file would pair the rest with nothing
            raise BenchmarkError(f"{source.path}: more rows than {path} (line {extra.line} has no vote row); "
                                 "the two files must have the same rows in the same order")
    return rows


def _read_header(reader: Any, path: Path) -> tuple[list[str], int, int, list[int]]:
    """The header row and the positions of Usage, Image name and the vote columns (any order, any case)."""
    header = next(reader, None)
    if header is None:
        raise BenchmarkError(f"{path}: empty file (expected header Usage,Image name,{','.join(VOTE_COLUMNS)})")
    columns = {h.strip().lower(): i for i, h in enumerate(header)}
    for needed in ("Usage", "Image name") + VOTE_COLUMNS:
        if needed.lower() not in columns:
            raise BenchmarkError(f"{path}:1: missing column '{needed}' (header: {','.join(header)})")
    return header, columns["usage"], columns["image name"], [columns[c.lower()] for c in VOTE_COLUMNS]


def _next_pixel_row(source: _PixelSource, path: Path, line: int) -> Row | None:
    """The pixel file's row for this vote row (files matched by position); None for image folders."""
    if source.rows is None:
        return None
    pixel_row = next(source.rows, None)
    if pixel_row is None:
        raise BenchmarkError(f"{source.path}: fewer rows than {path} (ran out at {path.name} line {line})")
    return pixel_row


def _parse_votes(fields: list[str], i_votes: list[int], path: Path, line: int) -> np.ndarray:
    """The ten vote counts of a row, in VOTE_COLUMNS order; a non-integer or negative count is an error."""
    votes = np.empty(len(VOTE_COLUMNS), dtype=np.int64)
    for k, (column, i) in enumerate(zip(VOTE_COLUMNS, i_votes)):
        try:
            votes[k] = int(fields[i].strip())
        except ValueError:
            votes[k] = -1
        if votes[k] < 0:
            raise BenchmarkError(
                f"{path}:{line}: column '{column}' must be a vote count >= 0, got '{fields[i]}'"
            )
    return votes


def _label_index(votes: np.ndarray, mode: str, collected: Collected) -> int | None:
    """The FERPlus emotion index under `mode`, or None (counted as dropped) when the row has none."""
    if mode == "majority":
        ferplus_index = majority_label(votes)
        if ferplus_index is None:
            collected.drop("unknown, NF or no majority")
        return ferplus_index
    if votes[:8].sum() == 0:
        collected.drop("no emotion votes")
        return None
    return int(np.argmax(votes[:8]))


def _keep_face(rows: _VoteRows, source: _PixelSource, pixel_row: Row | None, where: str, label: int,
               image_name: str, usage: str) -> bool:
    """Add the row's face: its parsed CSV pixels, or its PNG path in the Usage's folder. False when
    it has none (unparseable pixels are skipped, a row without an image name is dropped)."""
    if source.kind == "csv":
        face, why = parse_pixels(pixel_row.pixels, rows.side)  # type: ignore[union-attr]
        if face is None:
            rows.skipped.append((f"{source.path}:{pixel_row.line}", why))  # type: ignore[union-attr]
            return False
        rows.side = face.shape[0]
        rows.faces.append(face)
        rows.where.append(f"{source.path}:{pixel_row.line}")  # type: ignore[union-attr]
        rows.collected.add(where, label, image=image_name, usage=usage)
        return True
    if not image_name:
        rows.collected.drop("no image name (no PNG written)")
        return False
    image = named_inside(source.path / FOLDERS[usage], image_name)
    if image is None:
        rows.collected.skip(where, f"image name {image_name!r} leaves {source.path / FOLDERS[usage]}")
        return False
    rows.collected.add(image, label, image=image_name, usage=usage)
    return True
