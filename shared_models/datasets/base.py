"""What every benchmark reader returns: a :class:`Benchmark`, a lazy, index-addressable list of
``(face, label)`` samples (``(frames, label)`` for clip benchmarks) whose labels are already in a
canonical label set of :mod:`shared_models.labels`.

Why a small class of our own rather than ``torchvision.datasets.ImageFolder`` and friends: the
readers must map each benchmark's codes onto one canonical order, keep identity metadata, count
unreadable files instead of dying on them, and stay importable without torch (``fedfer --help``).
``Benchmark`` is duck-type compatible with ``torch.utils.data.Dataset`` (``__len__`` and
``__getitem__``); :meth:`Benchmark.as_torch` wraps it into a real one that yields tensors.

Unreadable images are handled at two moments:

* at open time each image file is *probed* (``PIL.Image.open`` parses the header, no decode):
  missing files and files that are not images are dropped, counted in ``skipped`` and reported
  in one warning line;
* at access time an image whose data is corrupt (e.g. a truncated JPEG) raises
  :class:`UnreadableImageError`; the torch wrapper catches it, counts it in the benchmark's
  ``skipped`` and yields ``None``, which :func:`collate_skipping` drops from the batch.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:   # PIL is imported where an image is opened
    from PIL import Image

LOG = logging.getLogger("fedfer.benchmarks")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

#: Largest image (width × height) a reader decodes. Face benchmarks hold faces of a few hundred
#: pixels a side (AffectNet's originals reach a few thousand); a header claiming more is a damaged
#: file or a decompression bomb, and decoding it would take gigabytes. Lower than PIL's own limit
#: (89 M pixels warns, 179 M raises).
MAX_IMAGE_PIXELS = 40_000_000
#: Longest cell a benchmark CSV may hold. Python's csv default (131,072) is below a 256×256 FER2013
#: face (up to 4 characters per pixel); this admits the largest FER2013 face we read, 512×512.
MAX_CSV_FIELD = 4 * 512 * 512 + 64
#: Longest line of a plain-text label list (RAF-DB) and largest small label file (CK+, AffectNet .npy).
MAX_TEXT_LINE = 64 * 1024
MAX_LABEL_FILE_BYTES = 64 * 1024


class BenchmarkError(ValueError):
    """A benchmark file problem, phrased as one line naming the file (and line/column)."""


class UnreadableImageError(BenchmarkError):
    """An image (or frame) that exists but cannot be decoded."""


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``frame2`` before ``frame10`` (frame folders are rarely zero-padded)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def not_regular_file(path: Path | str) -> str | None:
    """Why `path` cannot be read as a file (missing, a directory, a named pipe, a device …), or None.

    Checked with os.stat before any open: opening a named pipe blocks until someone writes to it,
    so a FIFO planted among the images would hang the reader."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing file"
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        return f"cannot be read ({getattr(exc, 'strerror', None) or exc.__class__.__name__})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe, not a regular file"
    return "not a regular file (device or socket)"


def special_file(path: Path | str) -> str | None:
    """Why `path` exists but is not a regular file (a named pipe, a directory, a device …), or None — also for a
    missing file, which the caller's own read reports in its words. For files read whole (a policy, a seat
    map): a named pipe would block that read until someone writes to it."""
    why = not_regular_file(path)
    return None if why == "missing file" else why


class ImageRefused(ValueError):
    """A file not decoded on purpose: not a regular file, or a header claiming too many pixels."""


def open_checked_image(path: Path | str) -> Image.Image:
    """PIL image of `path` with only the header parsed. Raises FileNotFoundError when missing and
    ImageRefused (message = the reason) when it is not a regular file or claims more than
    MAX_IMAGE_PIXELS pixels (PIL's decompression-bomb warning or error included)."""
    from PIL import Image

    why = not_regular_file(path)
    if why == "missing file":
        raise FileNotFoundError(path)
    if why is not None:
        raise ImageRefused(why)
    with warnings.catch_warnings():
        # PIL warns (and only raises at twice its limit): both mean "do not decode this"
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRefused("image too large (over PIL's decompression-bomb limit)") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ImageRefused(f"image too large ({width}x{height} pixels, limit {MAX_IMAGE_PIXELS:,})")
    return image


def probe_image(path: Path) -> str | None:
    """Why `path` is not a readable image, or None when its header parses.

    Only the header is read (cheap enough for tens of thousands of files); a file whose pixel data
    is damaged passes here and is caught when it is decoded."""
    from PIL import UnidentifiedImageError

    try:
        with open_checked_image(path):
            pass
    except FileNotFoundError:
        return "missing file"
    except ImageRefused as exc:
        return str(exc)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"not a readable image ({exc.__class__.__name__})"
    return None


def read_image(path: Path | str, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Decode an image file to uint8 (H, W) for grayscale or (H, W, 3) for anything else.

    `box` = (x, y, width, height) crops before conversion. Raises UnreadableImageError naming the
    file when the data cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_checked_image(path) as image, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            if box is not None:
                x, y, w, h = box
                # a box reaching past the image would be padded with black (and a huge one would
                # allocate a huge canvas): keep the part that overlaps the image
                left, top = min(max(x, 0), image.width), min(max(y, 0), image.height)
                right, bottom = min(max(x + w, left), image.width), min(max(y + h, top), image.height)
                if right > left and bottom > top:
                    image = image.crop((left, top, right, bottom))
            if image.mode in ("L", "I;16", "I", "F"):
                image = image.convert("L")
            elif image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise UnreadableImageError(f"{path}: missing image file") from None
    except ImageRefused as exc:
        raise UnreadableImageError(f"{path}: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImageError(f"{path}: image too large (decompression-bomb limit)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImageError(f"{path}: unreadable image ({exc})") from None


class SampleSource(Protocol):
    """Where sample i's pixels come from; pickle-able so DataLoader workers can carry it."""

    def load(self, index: int) -> np.ndarray: ...

    def describe(self, index: int) -> str: ...


@dataclass
class PixelArray:
    """Faces already decoded into one compact uint8 array (N, H, W[, 3]) — FER2013's CSV."""

    pixels: np.ndarray
    where: Sequence[str]

    def load(self, index: int) -> np.ndarray:
        return self.pixels[index].copy()  # a copy: callers may write into it; torch warns on read-only

    def describe(self, index: int) -> str:
        return self.where[index]


@dataclass
class ImageFiles:
    """One image file per sample, decoded on access; `boxes[i]` (x, y, w, h) crops when given."""

    paths: Sequence[str]
    boxes: Sequence[tuple[int, int, int, int] | None] | None = None

    def load(self, index: int) -> np.ndarray:
        box = self.boxes[index] if self.boxes is not None else None
        return read_image(self.paths[index], box)

    def describe(self, index: int) -> str:
        return str(self.paths[index])


@dataclass
class ProbeResult:
    """The kept indices of a list of image paths, and the (path, reason) of those dropped."""

    kept: list[int]
    dropped: list[tuple[str, str]]


def probe_images(paths: Sequence[str | Path], check: bool = True) -> ProbeResult:
    """Probe every path (see :func:`probe_image`); with check=False only test existence."""
    kept: list[int] = []
    dropped: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        path = Path(path)
        reason = probe_image(path) if check else not_regular_file(path)
        if reason is None:
            kept.append(i)
        else:
            dropped.append((str(path), reason))
    return ProbeResult(kept, dropped)


class Benchmark:
    """A benchmark split, ready to score: ``bench[i] -> (face uint8 ndarray, label int)``.

    Attributes: ``name``, ``labels`` (class names in label order), ``num_classes``, ``split``,
    ``path`` (what was opened), ``kind`` (``image`` or ``clip``), ``targets`` (int64 array),
    ``metadata`` (per-sample lists, e.g. ``identity``, ``file``), ``skipped`` (count of unreadable
    samples, grows if corrupt data turns up at access time), ``dropped`` (rows left out on purpose,
    by reason, e.g. AffectNet's code 8 *None*), ``notes`` (protocol choices worth printing).
    """

    def __init__(
        self,
        *,
        name: str,
        labels: Sequence[str],
        targets: Sequence[int] | np.ndarray,
        source: SampleSource,
        split: str,
        path: Path | str,
        kind: str = "image",
        metadata: Mapping[str, Sequence[Any]] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
        dropped: Mapping[str, int] | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.labels: tuple[str, ...] = tuple(labels)
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        self.source = source
        self.split = split
        self.path = Path(path)
        self.kind = kind
        self.metadata: dict[str, list[Any]] = {k: list(v) for k, v in (metadata or {}).items()}
        self.dropped: dict[str, int] = dict(dropped or {})
        self.notes: tuple[str, ...] = tuple(notes)
        #: (N, C) soft labels where the benchmark has them (FERPlus vote distribution), else None.
        self.soft_targets: np.ndarray | None = None
        self.skipped_files: list[tuple[str, str]] = list(skipped)
        self._skipped_at_access: set[int] = set()
        if self.targets.size and (self.targets.min() < 0 or self.targets.max() >= len(self.labels)):
            raise ValueError(f"{name}: a label falls outside the {len(self.labels)} classes")
        for key, values in self.metadata.items():
            if len(values) != len(self.targets):
                raise ValueError(f"{name}: metadata '{key}' has {len(values)} entries for {len(self.targets)} samples")
        if self.skipped_files:
            first_path, first_reason = self.skipped_files[0]
            LOG.warning(
                "%s: skipped %d unreadable sample(s) (first: %s: %s)",
                name, len(self.skipped_files), first_path, first_reason,
            )

    # -- Dataset protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} samples")
        return self.source.load(index), int(self.targets[index])

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (f"Benchmark(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, kind={self.kind!r}, skipped={self.skipped})")

    # -- facts ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def skipped(self) -> int:
        """Unreadable samples: dropped when the benchmark was opened plus any found corrupt since."""
        return len(self.skipped_files)

    def describe(self, index: int) -> str:
        """Where sample `index` comes from (file, or file:line)."""
        return self.source.describe(index)

    def record_unreadable(self, index: int, reason: str) -> None:
        """Count a sample found corrupt at access time (once per sample) and say so in one line."""
        if index in self._skipped_at_access:
            return
        self._skipped_at_access.add(index)
        self.skipped_files.append((self.describe(index), reason))
        LOG.warning("%s: skipped unreadable sample %s (%d skipped so far)", self.name, reason, self.skipped)

    # -- torch ------------------------------------------------------------------------------
    def as_torch(self, transform: Callable[[Any], Any] | None = None) -> "TorchBenchmark":
        """A ``torch.utils.data.Dataset`` yielding ``(tensor, label)``.

        Image benchmarks: ``transform(to_tensor_image(face))`` — pass a transform from
        :mod:`shared_models.transforms` (e.g. ``eval_transform(S)``) to get (3, S, S) floats.
        Clip benchmarks: the frames become one uint8 tensor (T, 3, H, W) and the transform is
        applied once to it (torchvision v2 transforms treat leading dims as a batch, so random
        augmentations stay consistent across a clip), giving (T, 3, S, S).
        A sample that turns out corrupt yields ``None``; batch with :func:`collate_skipping`.
        """
        return _torch_dataset_class()(self, transform)


def collate_skipping(batch: list[Any]) -> Any:
    """``default_collate`` after dropping ``None`` samples (corrupt faces); None if nothing is left."""
    from torch.utils.data import default_collate

    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


_TORCH_DATASET: type | None = None


def _torch_dataset_class() -> type:
    """Build the torch wrapper class on first use so importing this module never imports torch."""
    global _TORCH_DATASET
    if _TORCH_DATASET is not None:
        return _TORCH_DATASET
    import torch
    from torch.utils.data import Dataset

    from shared_models.transforms import to_tensor_image

    class _TorchBenchmark(Dataset):
        def __init__(self, benchmark: Benchmark, transform: Callable[[Any], Any] | None) -> None:
            self.benchmark = benchmark
            self.transform = transform
            self.name = benchmark.name
            self.labels = benchmark.labels
            self.num_classes = benchmark.num_classes
            self.kind = benchmark.kind
            self.targets = benchmark.targets

        def __len__(self) -> int:
            return len(self.benchmark)

        @property
        def skipped(self) -> int:
            return self.benchmark.skipped

        def __getitem__(self, index: int):
            try:
                array, label = self.benchmark[index]
            except UnreadableImageError as exc:
                self.benchmark.record_unreadable(index, str(exc))
                return None
            if self.benchmark.kind == "clip":
                tensor = torch.stack([to_tensor_image(frame) for frame in array])
            else:
                tensor = to_tensor_image(array)
            if self.transform is not None:
                tensor = self.transform(tensor)
            return tensor, label

    _TorchBenchmark.__name__ = _TorchBenchmark.__qualname__ = "TorchBenchmark"
    _TORCH_DATASET = _TorchBenchmark
    return _TORCH_DATASET


TorchBenchmark = Any  # the class is built lazily by _torch_dataset_class (keeps torch out of imports)


# -- splits ---------------------------------------------------------------------------------
def resolve_split(
    bench: str, requested: str | None, parts: Mapping[str, Sequence[str]], default: str
) -> tuple[str, tuple[str, ...]]:
    """Turn a split name (or ``a+b``) into the benchmark's own partition names.

    `parts` maps our split names (``train``, ``val``, ``test``, ``all`` …) to the benchmark's
    partitions; a benchmark's own partition name is accepted too (e.g. ``PrivateTest``).
    Returns (canonical split name, partitions)."""
    name = (requested or default).strip()
    own = {p.lower(): p for values in parts.values() for p in values}
    chosen: list[str] = []
    for piece in name.split("+"):
        key = piece.strip().lower()
        if key in parts:
            chosen.extend(parts[key])
        elif key in own:
            chosen.append(own[key])
        else:
            known = ", ".join(list(parts) + sorted(set(own.values()) - set(parts)))
            raise BenchmarkError(f"{bench}: unknown split '{piece.strip()}' (known: {known})")
    unique = tuple(dict.fromkeys(chosen))
    return name, unique


def map_code(
    text: str | None, mapping: Mapping[Any, int], where: str, column: str,
    parse: Callable[[str], Any] = int,
) -> int:
    """Map a benchmark's label code to our label index via `mapping` (the reader's documented dict).

    A code that does not parse or is not in the mapping is a one-line BenchmarkError naming
    `where` (``file:line`` or file) and the column."""
    try:
        code = parse(str(text).strip())
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        code = None
    if code is None or code not in mapping:
        keys = sorted(mapping, key=str)
        ints = all(isinstance(k, int) for k in keys)
        if ints and keys == list(range(min(keys), max(keys) + 1)):
            known = f"{min(keys)}-{max(keys)}"
        else:
            known = ", ".join(str(k) for k in keys)
        raise BenchmarkError(f"{where}: unknown label code '{text}' in {column} (expected {known})")
    return mapping[code]


def require_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file, else a one-line BenchmarkError naming it."""
    why = not_regular_file(path)
    if why is not None:
        if why == "missing file" or path.is_dir():
            hint = " (a directory was given)" if path.is_dir() else ""
            raise BenchmarkError(f"{path}: {what} not found{hint}")
        raise BenchmarkError(f"{path}: {what} is {why}")
    return path


def read_small_file(path: Path, what: str, limit: int = MAX_LABEL_FILE_BYTES) -> bytes:
    """The bytes of a small label file (CK+ emotion text, AffectNet .npy), refusing non-regular files
    and anything larger than `limit` with one line naming the file."""
    from shared_models.small_files import SmallFileError, read_small_file as read_bounded

    require_file(path, what)   # the reader's words for a missing file, a folder given, a pipe
    try:
        return read_bounded(path, limit)
    except SmallFileError as exc:
        raise BenchmarkError(f"{path}: {what} is {exc.why}") from None


def text_lines(handle: Any, path: Path, limit: int = MAX_TEXT_LINE) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file opened by a reader, refusing a line over `limit`
    characters and bytes that are not UTF-8 with one line naming file and line."""
    line_no = 0
    while True:
        line_no += 1
        try:
            line = handle.readline(limit + 1)
        except UnicodeDecodeError:
            raise BenchmarkError(f"{path}:{line_no}: not UTF-8 text") from None
        if not line:
            return
        if len(line) > limit and not line.endswith("\n"):
            raise BenchmarkError(f"{path}:{line_no}: line longer than {limit:,} characters")
        yield line_no, line


class CheckedCsvReader:
    """``csv.reader`` over an opened benchmark CSV that turns csv errors (a cell over MAX_CSV_FIELD,
    a NUL byte) and undecodable bytes into one BenchmarkError naming file and line."""

    def __init__(self, handle: Any, path: Path) -> None:
        # the limit is process-wide; only ever raise it (to what the largest supported face needs)
        if csv.field_size_limit() < MAX_CSV_FIELD:
            csv.field_size_limit(MAX_CSV_FIELD)
        self._reader = csv.reader(handle)
        self.path = path

    @property
    def line_num(self) -> int:
        return self._reader.line_num

    def __iter__(self) -> "CheckedCsvReader":
        return self

    def __next__(self) -> list[str]:
        try:
            return next(self._reader)
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise BenchmarkError(
                    f"{self.path}:{self._reader.line_num}: a cell longer than {csv.field_size_limit():,} characters "
                    f"(the largest supported face is 512x512)"
                ) from None
            raise BenchmarkError(f"{self.path}:{self._reader.line_num}: not a readable CSV ({exc})") from None
        except UnicodeDecodeError:
            raise BenchmarkError(f"{self.path}:{self._reader.line_num + 1}: not UTF-8 text") from None


def named_inside(root: Path, name: str) -> Path | None:
    """``root / name`` for a file or folder a label file names, or None when the name leaves ``root`` (an
    absolute path, or a ``..`` part): a label file names the benchmark's own images, and one that was edited or
    came from elsewhere must not make the reader open files outside the benchmark's folder."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\x00" in name:
        return None
    return Path(root) / name


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise BenchmarkError(f"{path}: {what} directory not found")
    return path


@dataclass
class Collected:
    """What a reader gathers before it builds a Benchmark (keeps the readers short)."""

    paths: list[str] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    metadata: dict[str, list[Any]] = field(default_factory=dict)
    boxes: list[tuple[int, int, int, int] | None] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, target: int, box: tuple[int, int, int, int] | None = None, **meta: Any) -> None:
        self.paths.append(str(path))
        self.targets.append(int(target))
        self.boxes.append(box)
        for key, value in meta.items():
            self.metadata.setdefault(key, []).append(value)

    def drop(self, reason: str) -> None:
        """A row left out on purpose (e.g. a label code with no FER class)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def skip(self, where: str | Path, reason: str) -> None:
        """A sample that cannot be read (missing or empty clip, …); counted in ``skipped``."""
        self.skipped.append((str(where), reason))

    def build_images(
        self, *, name: str, labels: Sequence[str], split: str, path: Path, check_images: bool = True,
        notes: Sequence[str] = (),
    ) -> Benchmark:
        """Probe the collected image files and build the Benchmark of the readable ones."""
        probed = probe_images(self.paths, check=check_images)
        kept, skipped = probed.kept, probed.dropped
        boxes = [self.boxes[i] for i in kept]
        source = ImageFiles(
            paths=[self.paths[i] for i in kept],
            boxes=boxes if any(b is not None for b in boxes) else None,
        )
        return Benchmark(
            name=name, labels=labels, split=split, path=path,
            targets=[self.targets[i] for i in kept], source=source,
            metadata={key: [values[i] for i in kept] for key, values in self.metadata.items()},
            skipped=self.skipped + skipped, dropped=self.dropped, notes=notes,
        )
