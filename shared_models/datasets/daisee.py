"""DAiSEE (engagement in the wild): 10-second clips of students in front of a laptop.

* Clips: ``DataSet/{Train,Validation,Test}/<6-digit subject>/<10-digit ClipID>/<ClipID>.avi``.
  A clip folder holding extracted frame images instead is read as frames (see ``frames.py``;
  decoding ``.avi`` needs PyAV).
* Labels: ``Labels/{Train,Validation,Test,All}Labels.csv``, header
  ``ClipID,Boredom,Engagement,Confusion,Frustration `` — note the trailing space after
  ``Frustration``; headers are matched after stripping spaces. ``ClipID`` carries the extension
  (``5000441001.avi``), which is stripped to find the folder.
* Label set: the four levels of one affective state (``target``, default ``Engagement``):
  0 very low, 1 low, 2 high, 3 very high (``DAISEE_LEVELS``). This is *not* an FER label set;
  a model scored on it must have been trained on these levels.
* Splits: ``train``, ``val`` (Validation), ``test`` (**default**), ``all``.
* Metadata: ``identity`` = subject folder, ``clip`` = ClipID.
A ClipID listed in the CSV but absent on disk is counted in ``skipped``.
"""

from __future__ import annotations

from pathlib import Path

from shared_models.datasets.base import (
    Benchmark, BenchmarkError, CheckedCsvReader, Collected, map_code, require_dir, require_file, resolve_split,
)
from shared_models.datasets.frames import DEFAULT_NUM_FRAMES, build_clips, clip_location

#: DAiSEE level code -> label index (identity: the levels are the label set).
DAISEE_TO_LEVEL: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 3}
DAISEE_LEVELS: tuple[str, ...] = ("very low", "low", "high", "very high")
TARGETS = ("Boredom", "Engagement", "Confusion", "Frustration")
SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("Train",), "val": ("Validation",), "test": ("Test",), "all": ("Train", "Validation", "Test"),
}
DEFAULT_SPLIT = "test"


def _index_clips(folder: Path) -> dict[str, tuple[Path, str]]:
    """ClipID -> (clip folder, subject) for every ``<subject>/<ClipID>/`` below `folder`."""
    found: dict[str, tuple[Path, str]] = {}
    for subject in sorted(p for p in folder.iterdir() if p.is_dir()):
        for clip in sorted(p for p in subject.iterdir() if p.is_dir()):
            found[clip.name] = (clip, subject.name)
    return found


def open_daisee(path: Path, *, name: str = "daisee", split: str | None = None, target: str = "Engagement",
                num_frames: int = DEFAULT_NUM_FRAMES) -> Benchmark:
    """Open DAiSEE at `path` (the folder holding ``DataSet/`` and ``Labels/``)."""
    root = Path(path)
    wanted_target = next((t for t in TARGETS if t.lower() == target.strip().lower()), None)
    if wanted_target is None:
        raise BenchmarkError(f"{name}: unknown target '{target}' (expected one of {', '.join(TARGETS)})")
    split_name, parts = resolve_split(name, split, SPLITS, DEFAULT_SPLIT)
    dataset = require_dir(root / "DataSet", "DAiSEE clips (DataSet)")
    collected = Collected()
    for part in parts:
        label_file = require_file(root / "Labels" / f"{part}Labels.csv", f"DAiSEE labels for {part}")
        clips = _index_clips(require_dir(dataset / part, f"DAiSEE {part} clips"))
        with label_file.open(newline="", encoding="utf-8-sig") as handle:
            reader = CheckedCsvReader(handle, label_file)
            header = next(reader, None)
            if header is None:
                raise BenchmarkError(f"{label_file}: empty file (expected header ClipID,{','.join(TARGETS)})")
            columns = {h.strip().lower(): i for i, h in enumerate(header)}
            for needed in ("ClipID", wanted_target):
                if needed.lower() not in columns:
                    raise BenchmarkError(f"{label_file}:1: missing column '{needed}' (header: {','.join(header)})")
            i_clip, i_level = columns["clipid"], columns[wanted_target.lower()]
            for fields in reader:
                if not fields or not "".join(fields).strip():
                    continue
                where = f"{label_file}:{reader.line_num}"
                if len(fields) <= max(i_clip, i_level):
                    raise BenchmarkError(f"{where}: expected {len(header)} columns, got {len(fields)}")
                label = map_code(fields[i_level], DAISEE_TO_LEVEL, where, f"column '{wanted_target}'")
                clip_id = Path(fields[i_clip].strip()).stem
                if clip_id not in clips:
                    collected.skip(f"{dataset / part}/*/{clip_id}", "clip listed in labels but not on disk")
                    continue
                folder, subject = clips[clip_id]
                location = clip_location(folder)
                if location is None:
                    collected.skip(folder, "no frames or video in clip folder")
                    continue
                collected.add(location, label, identity=subject, clip=clip_id)
    return build_clips(
        collected, name=name, labels=DAISEE_LEVELS, split=split_name, path=root, num_frames=num_frames,
        notes=(f"split {split_name} = {'+'.join(parts)}", f"label = {wanted_target} level 0-3"),
    )
