"""Generic image folders: ``<root>/<class name>/**/<image>``, the ImageFolder convention.

Class folder names are matched case-insensitively to the canonical FER classes through
``CLASS_NAME_SYNONYMS`` (``Angry``, ``anger``, ``Happiness``, ``fearful``, ``surprised`` …).
The label set is FER7, or FER8 when a contempt folder exists. A folder whose name matches no
FER class is an error naming it — unless ``labels="a,b,c"`` gives the class names and their order
explicitly (a classroom set such as happy, dedicated, neutral, confused, tired, bored).

Splits: if ``<root>/<split>/`` exists (``train``, ``val``/``valid``/``validation``,
``test``) that folder is read; with no split given, ``test`` then ``val`` are tried and otherwise
``root`` itself is the benchmark (``all``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from shared_models.datasets.base import (
    Benchmark, BenchmarkError, Collected, is_image_file, natural_key, require_dir,
)
from shared_models.labels import FER7, FER8

#: folder name (lower case, spaces/underscores/hyphens removed) -> canonical FER class name.
CLASS_NAME_SYNONYMS: dict[str, str] = {
    "angry": "angry", "anger": "angry", "an": "angry",
    "disgust": "disgust", "disgusted": "disgust", "di": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear", "af": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy", "ha": "happy",
    "sad": "sad", "sadness": "sad", "sa": "sad",
    "surprise": "surprise", "surprised": "surprise", "su": "surprise",
    "neutral": "neutral", "ne": "neutral",
    "contempt": "contempt", "contemptuous": "contempt",
}
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training", "Train", "Training"),
    "val": ("val", "valid", "validation", "Val", "Valid", "Validation"),
    "test": ("test", "Test", "testing"),
}


def normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def parse_custom_labels(labels: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if labels is None:
        return None
    names = [n.strip() for n in (labels.split(",") if isinstance(labels, str) else labels) if n.strip()]
    if len(names) < 2 or len(set(map(normalise, names))) != len(names):
        raise BenchmarkError(f"labels must be two or more distinct class names, got '{labels}'")
    return tuple(names)


def class_labels(class_names: Sequence[str], custom: tuple[str, ...] | None, where: Path) -> tuple[tuple[str, ...], dict[str, int]]:
    """The label set and folder-name -> label index for the class folders found under `where`."""
    if custom is not None:
        index = {normalise(n): i for i, n in enumerate(custom)}
        mapping = {}
        for folder in class_names:
            if normalise(folder) not in index:
                raise BenchmarkError(f"{where / folder}: class folder '{folder}' is not in labels ({', '.join(custom)})")
            mapping[folder] = index[normalise(folder)]
        return custom, mapping
    canonical = {}
    for folder in class_names:
        fer = CLASS_NAME_SYNONYMS.get(normalise(folder))
        if fer is None:
            raise BenchmarkError(
                f"{where / folder}: class folder '{folder}' is not an FER class "
                f"({', '.join(FER8)}); pass labels=... for another label set"
            )
        canonical[folder] = fer
    labels = FER8 if "contempt" in canonical.values() else FER7
    return labels, {folder: labels.index(fer) for folder, fer in canonical.items()}


def resolve_folder(root: Path, split: str | None) -> tuple[Path, str]:
    """The folder holding the class folders for `split` (see the module docstring)."""
    if split in (None, ""):
        for candidate in ("test", "val"):
            for folder in SPLIT_FOLDERS[candidate]:
                if (root / folder).is_dir():
                    return root / folder, candidate
        return root, "all"
    if split == "all":
        return root, "all"
    if split not in SPLIT_FOLDERS:
        if (root / split).is_dir():
            return root / split, split
        raise BenchmarkError(f"{root}: unknown split '{split}' (known: train, val, test, all, or a sub-folder name)")
    for folder in SPLIT_FOLDERS[split]:
        if (root / folder).is_dir():
            return root / folder, split
    raise BenchmarkError(f"{root}: no folder for split '{split}' (looked for {', '.join(SPLIT_FOLDERS[split])})")


def open_image_folder(path: Path, *, name: str = "imagefolder", split: str | None = None,
                      labels: str | Sequence[str] | None = None, check_images: bool = True) -> Benchmark:
    """Open ``<path>[/<split>]/<class>/…`` (see the module docstring)."""
    root = require_dir(Path(path), "image folder")
    folder, split_name = resolve_folder(root, split)
    class_dirs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name)
    if not class_dirs:
        raise BenchmarkError(f"{folder}: no class folders")
    label_set, mapping = class_labels([d.name for d in class_dirs], parse_custom_labels(labels), folder)
    collected = Collected()
    for class_dir in class_dirs:
        for file in sorted((p for p in class_dir.rglob("*") if p.is_file() and is_image_file(p)),
                           key=lambda p: natural_key(str(p))):
            collected.add(file, mapping[class_dir.name], file=str(file.relative_to(folder)))
    if not collected.paths:
        raise BenchmarkError(f"{folder}: no images in the class folders")
    return collected.build_images(
        name=name, labels=label_set, split=split_name, path=folder, check_images=check_images,
        notes=(f"classes from folder names under {folder}",),
    )
