"""KDEF (Karolinska Directed Emotional Faces): the label is in the file name.

``AF01ANS.JPG``: series (A/B), gender (F/M), identity 01–35, expression (2 letters, see
``KDEF_TO_FER7``), angle (FL, HL, S, HR, FR). Files usually sit in per-sitting folders
(``KDEF/AF01/``); `path` is searched recursively. Label set FER7 (KDEF has no contempt).

Metadata: ``identity`` = gender + number (``F01``; one person across series A and B), ``series``,
``angle``. Splits: ``all`` (**default**: KDEF has no official split) or ``frontal`` (angle S only,
the subset most FER papers use). An image whose name does not follow the pattern, or whose
expression code is unknown, stops the reader with an error naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

from shared_models.datasets.base import (
    Benchmark, BenchmarkError, Collected, is_image_file, map_code, natural_key, require_dir, resolve_split,
)
from shared_models.labels import FER7

#: KDEF expression letters -> index in FER7.
KDEF_TO_FER7: dict[str, int] = {
    "AF": FER7.index("fear"),
    "AN": FER7.index("angry"),
    "DI": FER7.index("disgust"),
    "HA": FER7.index("happy"),
    "NE": FER7.index("neutral"),
    "SA": FER7.index("sad"),
    "SU": FER7.index("surprise"),
}
ANGLES = ("FL", "HL", "S", "HR", "FR")
NAME = re.compile(r"^(?P<series>[AB])(?P<gender>[FM])(?P<number>\d{2})(?P<expr>[A-Z]{2})(?P<angle>FL|HL|HR|FR|S)$")
SPLITS: dict[str, tuple[str, ...]] = {"all": ANGLES, "frontal": ("S",)}


def open_kdef(path: Path, *, name: str = "kdef", split: str | None = None, check_images: bool = True) -> Benchmark:
    """Open KDEF below `path` (see the module docstring)."""
    root = require_dir(Path(path), "KDEF")
    split_name, angles = resolve_split(name, split, SPLITS, "all")
    collected = Collected()
    files = sorted((p for p in root.rglob("*") if p.is_file() and is_image_file(p)), key=lambda p: natural_key(p.name))
    if not files:
        raise BenchmarkError(f"{root}: no KDEF images found")
    for file in files:
        match = NAME.match(file.stem.upper())
        if match is None:
            raise BenchmarkError(
                f"{file}: name does not follow the KDEF pattern <A|B><F|M><NN><expression><angle> (e.g. AF01ANS.JPG)"
            )
        label = map_code(match["expr"], KDEF_TO_FER7, str(file), "the file name's expression letters", parse=str)
        if match["angle"] not in angles:
            continue
        collected.add(file, label, identity=match["gender"] + match["number"], series=match["series"],
                      angle=match["angle"])
    return collected.build_images(
        name=name, labels=FER7, split=split_name, path=root, check_images=check_images,
        notes=(f"split {split_name} = angles {'+'.join(angles)}",),
    )
