"""Video FER benchmarks: DFEW, AFEW, and generic clip folders.

What is accepted (a *clip* is a folder of frame images, or a video file if PyAV is installed):

* **DFEW** (`path` = the DFEW folder). Labels from the official split files
  ``EmoLabel_DataSplit/{train,test}(single-labeled)/set_{1..5}.csv`` (columns ``video_name,label``;
  ``video_name`` padded to 5 digits), or the author repo's ``label/single_{train,test}set_{k}.csv``.
  Frames from the first of ``Clip/jpg_256/<id>/``, ``Clip/clip_224x224/<id>/``,
  ``Clip/clip_224x224_16f/<id>/``, ``data/<id>/``, ``Clip/<id>/`` that exists (``frames=`` names
  another folder relative to `path`). Codes ``DFEW_TO_FER7``: 1 happy … 7 fear.
  Splits: ``test1``…``test5`` / ``train1``…``train5`` (fold k), ``test`` = ``test1`` (**default**).
  Results in papers average the 5 folds: run all five and average.
* **AFEW** (`path` = the AFEW folder): class-named folders (``Angry``, ``Disgust``, ``Fear``,
  ``Happy``, ``Neutral``, ``Sad``, ``Surprise``) holding one clip each (frame folder or
  ``<9-digit id>.avi``). Split ``val`` (**default**; AFEW's test labels are not public) reads
  ``Val_AFEW/``, ``Val/``, ``val/`` or ``val_afew/`` if present, ``train`` the Train equivalents;
  if none exists, `path` itself holds the class folders.
* **clipfolder** (generic): either ``<root>/<class name>/<clip>`` as AFEW, or a label CSV
  ``<root>/labels.csv`` with columns ``clip,label`` — ``clip`` a path relative to root (frame
  folder or video), ``label`` a class name (matched as in ``imagefolder.py``). ``labels="a,b"``
  sets a custom label set as there.

Metadata: ``clip`` (id or relative path). Missing clip folders are counted in ``skipped``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from shared_models.datasets.base import (
    Benchmark, BenchmarkError, CheckedCsvReader, Collected, map_code, named_inside, natural_key, require_dir,
)
from shared_models.datasets.frames import DEFAULT_NUM_FRAMES, build_clips, clip_location, is_video_file
from shared_models.datasets.imagefolder import class_labels, normalise, parse_custom_labels
from shared_models.labels import FER7

#: DFEW label code -> index in FER7.
DFEW_TO_FER7: dict[int, int] = {
    1: FER7.index("happy"),
    2: FER7.index("sad"),
    3: FER7.index("neutral"),
    4: FER7.index("angry"),
    5: FER7.index("surprise"),
    6: FER7.index("disgust"),
    7: FER7.index("fear"),
}
#: AFEW class folder -> index in FER7.
AFEW_TO_FER7: dict[str, int] = {
    "Angry": FER7.index("angry"), "Disgust": FER7.index("disgust"), "Fear": FER7.index("fear"),
    "Happy": FER7.index("happy"), "Neutral": FER7.index("neutral"), "Sad": FER7.index("sad"),
    "Surprise": FER7.index("surprise"),
}
DFEW_FRAME_DIRS = ("Clip/jpg_256", "Clip/clip_224x224", "Clip/clip_224x224_16f", "data", "Clip")
AFEW_SPLIT_DIRS = {
    "val": ("Val_AFEW", "Val", "val", "val_afew", "Validation"),
    "train": ("Train_AFEW", "Train", "train", "train_afew", "Training"),
}


def _dfew_split(name: str, split: str | None) -> tuple[str, int, str]:
    text = (split or "test").strip().lower()
    kind = "test" if text.startswith("test") else "train" if text.startswith("train") else ""
    fold_text = text[len(kind):].lstrip(":_-") or "1"
    if not kind or not fold_text.isdigit() or not 1 <= int(fold_text) <= 5:
        raise BenchmarkError(f"{name}: unknown split '{split}' (known: test, test1..test5, train1..train5)")
    return kind, int(fold_text), f"{kind}{fold_text}"


def open_dfew(path: Path, *, name: str = "dfew", split: str | None = None, frames: str | None = None,
              num_frames: int = DEFAULT_NUM_FRAMES) -> Benchmark:
    """Open DFEW fold `split` at `path` (see the module docstring)."""
    root = require_dir(Path(path), "DFEW")
    kind, fold, split_name = _dfew_split(name, split)
    candidates = [root / "EmoLabel_DataSplit" / f"{kind}(single-labeled)" / f"set_{fold}.csv",
                  root / "label" / f"single_{kind}set_{fold}.csv"]
    label_file = next((c for c in candidates if c.is_file()), None)
    if label_file is None:
        raise BenchmarkError(f"{candidates[0]}: DFEW split file not found (nor {candidates[1]})")
    if frames is not None:
        frame_root = require_dir(root / frames, "DFEW frames")
    else:
        frame_root = next((root / d for d in DFEW_FRAME_DIRS if (root / d).is_dir()), None)
        if frame_root is None:
            raise BenchmarkError(f"{root}: no DFEW frame folder (looked for {', '.join(DFEW_FRAME_DIRS)})")
    collected = Collected()
    with label_file.open(newline="", encoding="utf-8-sig") as handle:
        reader = CheckedCsvReader(handle, label_file)
        header = next(reader, None)
        if header is None:
            raise BenchmarkError(f"{label_file}: empty file (expected header video_name,label)")
        columns = {h.strip().lower(): i for i, h in enumerate(header)}
        for needed in ("video_name", "label"):
            if needed not in columns:
                raise BenchmarkError(f"{label_file}:1: missing column '{needed}' (header: {','.join(header)})")
        for fields in reader:
            if not fields or not "".join(fields).strip():
                continue
            where = f"{label_file}:{reader.line_num}"
            label = map_code(fields[columns["label"]], DFEW_TO_FER7, where, "column 'label'")
            raw = fields[columns["video_name"]].strip()
            clip_id = raw.zfill(5) if raw.isdigit() else raw
            if named_inside(frame_root, clip_id) is None:
                collected.skip(where, f"clip {clip_id!r} leaves {frame_root}")
                continue
            location = clip_location(frame_root / clip_id)
            if location is None:
                collected.skip(frame_root / clip_id, "clip folder missing or empty")
                continue
            collected.add(location, label, clip=clip_id)
    return build_clips(
        collected, name=name, labels=FER7, split=split_name, path=root, num_frames=num_frames,
        notes=(f"fold {fold} {kind} list {label_file.relative_to(root)}", f"frames from {frame_root}"),
    )


def _collect_class_folders(folder: Path, mapping: dict[str, int], collected: Collected) -> None:
    for class_name, label in sorted(mapping.items()):
        for clip in sorted((folder / class_name).iterdir(), key=lambda p: natural_key(p.name)):
            if clip.is_file() and not is_video_file(clip):
                continue
            location = clip_location(clip)
            if location is None:
                collected.skip(clip, "empty clip folder")
                continue
            collected.add(location, label, clip=f"{class_name}/{clip.name}")


def open_afew(path: Path, *, name: str = "afew", split: str | None = None,
              num_frames: int = DEFAULT_NUM_FRAMES) -> Benchmark:
    """Open AFEW's class-folder layout (see the module docstring)."""
    root = require_dir(Path(path), "AFEW")
    split_name = (split or "val").strip().lower()
    if split_name not in AFEW_SPLIT_DIRS and split_name != "all":
        raise BenchmarkError(f"{name}: unknown split '{split}' (known: val, train, all)")
    folder = root
    if split_name in AFEW_SPLIT_DIRS:
        folder = next((root / d for d in AFEW_SPLIT_DIRS[split_name] if (root / d).is_dir()), root)
    found = {normalise(p.name): p.name for p in folder.iterdir() if p.is_dir()}
    mapping: dict[str, int] = {}
    for class_name, label in AFEW_TO_FER7.items():
        if normalise(class_name) in found:
            mapping[found[normalise(class_name)]] = label
    unknown = sorted(set(found.values()) - set(mapping))
    if unknown:
        raise BenchmarkError(f"{folder / unknown[0]}: '{unknown[0]}' is not an AFEW class folder "
                             f"({', '.join(AFEW_TO_FER7)})")
    if not mapping:
        raise BenchmarkError(f"{folder}: no AFEW class folders ({', '.join(AFEW_TO_FER7)})")
    collected = Collected()
    _collect_class_folders(folder, mapping, collected)
    return build_clips(collected, name=name, labels=FER7, split=split_name, path=folder, num_frames=num_frames,
                       notes=(f"class folders under {folder}",))


def open_clip_folder(path: Path, *, name: str = "clipfolder", split: str | None = None,
                     labels: str | Sequence[str] | None = None,
                     num_frames: int = DEFAULT_NUM_FRAMES) -> Benchmark:
    """Open a generic clip benchmark: class folders of clips, or ``labels.csv`` (clip,label)."""
    root = require_dir(Path(path), "clip folder")
    folder = root / split if split not in (None, "", "all") else root
    require_dir(folder, f"split '{split}'")
    custom = parse_custom_labels(labels)
    collected = Collected()
    label_csv = folder / "labels.csv"
    if label_csv.is_file():
        with label_csv.open(newline="", encoding="utf-8-sig") as handle:
            reader = CheckedCsvReader(handle, label_csv)
            header = next(reader, None) or []
            columns = {h.strip().lower(): i for i, h in enumerate(header)}
            for needed in ("clip", "label"):
                if needed not in columns:
                    raise BenchmarkError(f"{label_csv}:1: missing column '{needed}' (header: {','.join(header)})")
            rows = [(reader.line_num, f) for f in reader if f and "".join(f).strip()]
        names = sorted({f[columns["label"]].strip() for _, f in rows})
        label_set, mapping = _labels_for(names, custom, label_csv)
        for line, fields in rows:
            clip = fields[columns["clip"]].strip()
            if named_inside(folder, clip) is None:
                collected.skip(label_csv, f"{label_csv.name} line {line}: clip {clip!r} leaves {folder}")
                continue
            location = clip_location(folder / clip)
            if location is None:
                collected.skip(folder / clip, f"{label_csv.name} line {line}: clip missing or empty")
                continue
            collected.add(location, mapping[fields[columns["label"]].strip()], clip=clip)
    else:
        class_dirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not class_dirs:
            raise BenchmarkError(f"{folder}: no labels.csv and no class folders")
        label_set, mapping = class_labels(class_dirs, custom, folder)
        _collect_class_folders(folder, mapping, collected)
    return build_clips(collected, name=name, labels=label_set, split=split or "all", path=folder,
                       num_frames=num_frames, notes=(f"clips under {folder}",))


def _labels_for(names: list[str], custom: tuple[str, ...] | None, where: Path) -> tuple[tuple[str, ...], dict[str, int]]:
    try:
        return class_labels(names, custom, where.parent)
    except BenchmarkError as exc:
        raise BenchmarkError(f"{where}: column 'label': {exc}") from None
