"""RAF-DB basic emotions (the ``basic`` folder of the distribution).

* Labels: ``EmoLabel/list_patition_label.txt`` (sic, "patition"), no header, one
  ``<name> <label>`` per line, e.g. ``train_00001.jpg 5``; codes 1–7 (see ``RAFDB_TO_FER7``).
* Images: ``Image/aligned/<stem>_aligned.jpg`` (100×100 aligned faces, the usual protocol);
  ``aligned=False`` reads ``Image/original/<name>`` instead.
* Splits from the name prefix: ``train`` = ``train_NNNNN`` (12,271), ``test`` = ``test_NNNN``
  (3,068, **default**, the split every paper reports), ``all``. The synthetic classroom's
  ``synthetic-rafdb`` writes ``train_`` and ``test_`` names and is opened with ``test``.
* No identity information in RAF-DB basic.
"""

from __future__ import annotations

from pathlib import Path

from shared_models.datasets.base import (
    Benchmark, BenchmarkError, Collected, map_code, require_dir, require_file, resolve_split, text_lines,
)
from shared_models.labels import FER7

#: RAF-DB basic label code -> index in FER7.
RAFDB_TO_FER7: dict[int, int] = {
    1: FER7.index("surprise"),
    2: FER7.index("fear"),
    3: FER7.index("disgust"),
    4: FER7.index("happy"),
    5: FER7.index("sad"),
    6: FER7.index("angry"),
    7: FER7.index("neutral"),
}
SPLITS: dict[str, tuple[str, ...]] = {"train": ("train",), "test": ("test",), "all": ("train", "test")}
DEFAULT_SPLIT = "test"
LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"


def _root(path: Path) -> Path:
    """Accept the ``basic`` folder, its parent (``RAF-DB/``), or the label file itself."""
    if path.is_file():
        if path.name != LABEL_FILE.name:
            raise BenchmarkError(f"{path}: a file; RAF-DB is a folder (basic/ with {LABEL_FILE} and Image/aligned/), "
                                 f"or its {LABEL_FILE.name}")
        return path.parent.parent
    if not (path / LABEL_FILE).exists() and (path / "basic" / LABEL_FILE).exists():
        return path / "basic"
    return path


def open_rafdb(path: Path, *, name: str = "rafdb", split: str | None = None, aligned: bool = True,
               check_images: bool = True) -> Benchmark:
    """Open RAF-DB basic at `path` (see the module docstring)."""
    root = _root(Path(path))
    label_file = require_file(root / LABEL_FILE, "RAF-DB label file EmoLabel/list_patition_label.txt")
    image_dir = require_dir(root / "Image" / ("aligned" if aligned else "original"),
                            "RAF-DB image" if not aligned else "RAF-DB aligned image (Image/aligned)")
    split_name, prefixes = resolve_split(name, split, SPLITS, DEFAULT_SPLIT)
    collected = Collected()
    with label_file.open(encoding="utf-8-sig") as handle:
        for line_no, line in text_lines(handle, label_file):
            text = line.strip()
            if not text:
                continue
            parts = text.split()
            where = f"{label_file}:{line_no}"
            if len(parts) != 2:
                raise BenchmarkError(f"{where}: expected '<image name> <label 1-7>', got '{text}'")
            image_name, code = parts
            prefix = image_name.split("_", 1)[0].lower()
            if prefix not in SPLITS["all"]:
                raise BenchmarkError(f"{where}: image name '{image_name}' does not start with train_ or test_")
            label = map_code(code, RAFDB_TO_FER7, where, "the label column")
            if prefix not in prefixes:
                continue
            stem = Path(image_name).stem
            file = image_dir / (f"{stem}_aligned.jpg" if aligned else image_name)
            collected.add(file, label, image=image_name)
    return collected.build_images(
        name=name, labels=FER7, split=split_name, path=root, check_images=check_images,
        notes=(f"split {split_name} = name prefix {'+'.join(prefixes)}",
               f"images from {image_dir.relative_to(root)}"),
    )
