"""AffectNet, 7 classes (``affectnet7``) or 8 classes (``affectnet8``).

Three layouts are accepted (`path` is the AffectNet folder, or the CSV itself):

1. **Original release** (the one the brief and the papers use):
   ``Manually_Annotated_file_lists/{training,validation}.csv`` with columns
   ``subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal``
   and images under ``Manually_Annotated_Images/<subDirectory_filePath>``. A CSV without the header
   line is accepted when its rows have the 9 fields in that order. With ``crop=True`` (default) the
   face box (face_x, face_y, face_width, face_height) is cut out, as landmark/box-based loaders do;
   an empty or negative box keeps the whole image.
2. **Newer release**: ``{train_set,val_set}/images/<id>.jpg`` + ``annotations/<id>_exp.npy``.
3. **Class-number folders** (DAN's ``convert_affectnet.py``): ``{train,val}/<code 0..7>/*.jpg``.

``expression`` codes (``AFFECTNET_TO_FER8``): 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear,
5 Disgust, 6 Anger, 7 Contempt, 8 None, 9 Uncertain, 10 No-Face. Codes 8–10 are dropped (counted
in ``bench.dropped``), and AffectNet-7 also drops 7 (contempt). Other codes are an error.

Splits: ``val`` = the official validation set (5,500 manually annotated images; it serves as the
test set in every paper), **default**; ``test`` is an alias of ``val``; ``train`` = training.
"""

from __future__ import annotations

from pathlib import Path

import math

import numpy as np

from shared_models.datasets.base import (
    MAX_IMAGE_PIXELS, Benchmark, BenchmarkError, CheckedCsvReader, Collected, is_image_file, map_code,
    named_inside, read_small_file, require_file, resolve_split,
)
from shared_models.labels import FER7, FER8

#: AffectNet ``expression`` code -> index in FER8 (codes 8, 9, 10 are not listed: dropped).
AFFECTNET_TO_FER8: dict[int, int] = {
    0: FER8.index("neutral"),
    1: FER8.index("happy"),
    2: FER8.index("sad"),
    3: FER8.index("surprise"),
    4: FER8.index("fear"),
    5: FER8.index("disgust"),
    6: FER8.index("angry"),
    7: FER8.index("contempt"),
}
#: codes present in AffectNet that no FER class matches; rows with them are left out.
DROPPED_CODES: dict[int, str] = {8: "None", 9: "Uncertain", 10: "No-Face"}
#: every code the files may hold (identity map; used to validate before _keep decides)
ALL_CODES: dict[int, int] = {code: code for code in (*AFFECTNET_TO_FER8, *DROPPED_CODES)}

COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
           "facial_landmarks", "expression", "valence", "arousal")
SPLITS: dict[str, tuple[str, ...]] = {"train": ("train",), "val": ("val",), "test": ("val",),
                                      "all": ("train", "val")}
DEFAULT_SPLIT = "val"
CSV_NAMES = {"train": "training.csv", "val": "validation.csv"}
NEW_DIRS = {"train": "train_set", "val": "val_set"}


def _keep(code: int, classes: int, collected: Collected) -> int | None:
    """The FER index of `code`, or None after counting why the row is left out."""
    if code in DROPPED_CODES:
        collected.drop(f"code {code} ({DROPPED_CODES[code]})")
        return None
    if classes == 7 and code == 7:
        collected.drop("code 7 (Contempt) in AffectNet-7")
        return None
    return AFFECTNET_TO_FER8[code]


def _read_csv(csv_path: Path, image_root: Path, classes: int, crop: bool, collected: Collected) -> None:
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = CheckedCsvReader(handle, csv_path)
        first = next(reader, None)
        if first is None:
            raise BenchmarkError(f"{csv_path}: empty file (expected header {','.join(COLUMNS)})")
        names = [h.strip() for h in first]
        if "expression" in names or "subDirectory_filePath" in names:
            index = {h: i for i, h in enumerate(names)}
            for needed in ("subDirectory_filePath", "expression"):
                if needed not in index:
                    raise BenchmarkError(f"{csv_path}:1: missing column '{needed}' (header: {','.join(first)})")
            pending: list[list[str]] = []
            width = len(names)
        elif len(first) == len(COLUMNS):  # headerless: the documented column order
            index = {h: i for i, h in enumerate(COLUMNS)}
            pending, width = [first], len(COLUMNS)
        else:
            raise BenchmarkError(
                f"{csv_path}:1: missing column 'expression' (expected header {','.join(COLUMNS)})"
            )
        box_columns = [index.get(c) for c in ("face_x", "face_y", "face_width", "face_height")]

        def rows():
            for fields in pending:
                yield 1, fields
            for fields in reader:
                yield reader.line_num, fields

        for line, fields in rows():
            if not fields:
                continue
            where = f"{csv_path}:{line}"
            if len(fields) != width:
                raise BenchmarkError(f"{where}: expected {width} columns, got {len(fields)}")
            code = map_code(fields[index["expression"]], ALL_CODES, where, "column 'expression'")
            label = _keep(code, classes, collected)
            if label is None:
                continue
            box = None
            if crop and all(i is not None for i in box_columns):
                try:
                    values = [float(fields[i]) for i in box_columns]  # type: ignore[index]
                except ValueError:
                    raise BenchmarkError(f"{where}: face box columns must be numbers") from None
                if not all(math.isfinite(v) and abs(v) <= MAX_IMAGE_PIXELS for v in values):
                    raise BenchmarkError(f"{where}: face box ({', '.join(fields[i] for i in box_columns)}) "  # type: ignore[index]
                                         f"must be finite numbers within ±{MAX_IMAGE_PIXELS:,}")
                x, y, w, h = (int(v) for v in values)
                if w > 0 and h > 0 and x >= 0 and y >= 0:
                    box = (x, y, w, h)
            relative = fields[index["subDirectory_filePath"]].strip()
            image = named_inside(image_root, relative)
            if image is None:
                collected.skip(where, f"image path {relative!r} leaves {image_root}")
                continue
            collected.add(image, label, box, image=relative)


def _npy_code(label_file: Path) -> str:
    """The expression code stored in a newer-release ``<id>_exp.npy``, as text (one line on error)."""
    import io

    data = read_small_file(label_file, "expression annotation")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BenchmarkError(f"{label_file}: not a readable .npy expression annotation ({exc})") from None
    if array.size == 0:
        raise BenchmarkError(f"{label_file}: empty expression annotation (expected one code 0-10)")
    return str(np.asarray(array).reshape(-1)[0])


def _read_new_release(folder: Path, classes: int, collected: Collected) -> None:
    images = folder / "images"
    annotations = folder / "annotations"
    for image in sorted(images.iterdir(), key=lambda p: p.name):
        if not is_image_file(image):
            continue
        label_file = annotations / f"{image.stem}_exp.npy"
        if not label_file.is_file():
            raise BenchmarkError(f"{label_file}: missing expression annotation for {image.name}")
        code_text = _npy_code(label_file)
        code = map_code(code_text, ALL_CODES, str(label_file), "the expression annotation")
        label = _keep(code, classes, collected)
        if label is not None:
            collected.add(image, label, image=image.name)


def _read_code_folders(folder: Path, classes: int, collected: Collected) -> None:
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        code = map_code(sub.name, ALL_CODES, str(sub), "the class folder name")
        label = _keep(code, classes, collected)
        for image in sorted(sub.rglob("*")):
            if not is_image_file(image):
                continue
            if label is None:
                collected.drop("image in a dropped class folder")
                continue
            collected.add(image, label, image=str(image.relative_to(folder)))


def open_affectnet(path: Path, *, name: str | None = None, split: str | None = None, classes: int = 8,
                   crop: bool = True, check_images: bool = True) -> Benchmark:
    """Open AffectNet-`classes` (7 or 8) at `path` (see the module docstring)."""
    if classes not in (7, 8):
        raise BenchmarkError(f"affectnet: classes must be 7 or 8, got {classes}")
    name = name or f"affectnet{classes}"
    path = Path(path)
    split_name, parts = resolve_split(name, split, SPLITS, DEFAULT_SPLIT)
    labels = FER8 if classes == 8 else FER7
    collected = Collected()
    layout = ""
    for part in parts:
        if path.is_file():  # a CSV named directly: images beside it or in ../Manually_Annotated_Images
            csv_path = path
            image_root = next((p for p in (path.parent.parent / "Manually_Annotated_Images",
                                           path.parent / "Manually_Annotated_Images") if p.is_dir()), path.parent)
            _read_csv(csv_path, image_root, classes, crop, collected)
            layout = "csv"
            break
        if (path / "Manually_Annotated_file_lists").is_dir():
            csv_path = require_file(path / "Manually_Annotated_file_lists" / CSV_NAMES[part], "AffectNet file list")
            _read_csv(csv_path, path / "Manually_Annotated_Images", classes, crop, collected)
            layout = "csv"
        elif (path / NEW_DIRS[part] / "images").is_dir():
            _read_new_release(path / NEW_DIRS[part], classes, collected)
            layout = "npy"
        elif (path / part).is_dir():
            _read_code_folders(path / part, classes, collected)
            layout = "folders"
        else:
            raise BenchmarkError(
                f"{path}: no AffectNet {part} data (expected Manually_Annotated_file_lists/{CSV_NAMES[part]}, "
                f"{NEW_DIRS[part]}/images or {part}/<0..7>/)"
            )
    return collected.build_images(
        name=name, labels=labels, split=split_name, path=path, check_images=check_images,
        notes=(f"split {split_name} = {'+'.join(parts)} ({layout} layout)",
               f"AffectNet-{classes}: codes 8-10{' and 7' if classes == 7 else ''} dropped"
               + (", face box cropped" if crop and layout == "csv" else "")),
    )
