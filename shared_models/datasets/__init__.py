"""Public FER benchmark readers and their registry.

    from shared_models.datasets import open_benchmark
    bench = open_benchmark("rafdb=/data/RAF-DB/basic")           # default split: test
    bench = open_benchmark("fer2013:val=/data/fer2013.csv")      # PublicTest
    bench = open_benchmark("synthetic-fer2013", data_root=root)  # <root>/public/fer2013.csv, test rows
    face, label = bench[0]; bench.labels; bench.num_classes; bench.skipped
    torch_ds = bench.as_torch(eval_transform(64))

A spec is ``name=path`` or ``name:split=path``; the synthetic classroom's public split is named
bare (``synthetic-fer2013``, ``synthetic-rafdb``) and found under ``data_root``. Every reader
maps its benchmark's codes onto :mod:`shared_models.labels` (FER7 order; FER8 adds contempt);
the mapping is a dict at the top of its module. Splits and accepted layouts are documented in
each module (``fedfer evaluate --help`` lists the names).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from shared_models.datasets.affectnet import open_affectnet
from shared_models.datasets.base import Benchmark, BenchmarkError, UnreadableImageError, collate_skipping
from shared_models.datasets.ckplus import open_ckplus
from shared_models.datasets.clips import open_afew, open_clip_folder, open_dfew
from shared_models.datasets.daisee import open_daisee
from shared_models.datasets.fer2013 import open_fer2013
from shared_models.datasets.ferplus import open_ferplus
from shared_models.datasets.imagefolder import open_image_folder
from shared_models.datasets.kdef import open_kdef
from shared_models.datasets.rafdb import open_rafdb

__all__ = [
    "Benchmark", "BenchmarkError", "UnreadableImageError", "collate_skipping", "open_benchmark",
    "open_benchmarks", "split_benchmark_list", "READERS", "SYNTHETIC", "benchmark_names", "SCHOOL_DATA_BENCHMARKS",
    "is_school_data", "canonical_name",
]

#: benchmark name -> reader(path, *, name, split, **options)
READERS: dict[str, Callable[..., Benchmark]] = {
    "fer2013": open_fer2013,
    "ferplus": open_ferplus,
    "rafdb": open_rafdb,
    "affectnet7": partial(open_affectnet, classes=7),
    "affectnet8": partial(open_affectnet, classes=8),
    "ckplus": open_ckplus,
    "kdef": open_kdef,
    "daisee": open_daisee,
    "dfew": open_dfew,
    "afew": open_afew,
    "clipfolder": open_clip_folder,
    "imagefolder": open_image_folder,
}
#: other spellings people use
ALIASES: dict[str, str] = {
    "fer-2013": "fer2013", "fer+": "ferplus", "fer2013plus": "ferplus", "raf-db": "rafdb", "raf": "rafdb",
    "affectnet": "affectnet7", "affectnet-7": "affectnet7", "affectnet-8": "affectnet8", "ck+": "ckplus",
    "ck": "ckplus", "image-folder": "imagefolder", "clip-folder": "clipfolder",
}
#: the synthetic classroom's public split: name -> (reader, path below data_root, default split)
SYNTHETIC: dict[str, tuple[str, str, str]] = {
    # the test rows only by default: the same files hold the public training split (Training / train_)
    "synthetic-fer2013": ("fer2013", "public/fer2013.csv", "val+test"),
    "synthetic-rafdb": ("rafdb", "public/rafdb", "test"),
    # every school's held-out students (simulation only): accuracy on the schools' own kind of faces
    "synthetic-indomain": ("imagefolder", "indomain", "all"),
    # clips of classroom students who never train (written when data.clips_per_student > 0): FER7 labels
    # through the clip-folder reader, engagement levels through the DAiSEE reader
    "synthetic-clips": ("clipfolder", "clipbench", "all"),
    "synthetic-daisee": ("daisee", "clipbench", "test"),
}


#: benchmarks made of the schools' own students' faces (held out of training, but school data all the same):
#: anything that uses them to choose between models is not post-processing of DP releases with public data, so
#: the best round (server/best_round.py) is never chosen on them, and `evaluation.public_benchmarks` may not
#: name them. They exist only in a simulation. (Any other benchmark chooses it only if declared public there.)
SCHOOL_DATA_BENCHMARKS = frozenset({"synthetic-indomain"})


def is_school_data(name: str) -> bool:
    """True for a benchmark of school faces (`SCHOOL_DATA_BENCHMARKS`), by the name it is scored under."""
    return _canonical(name.split(":", 1)[0]) in SCHOOL_DATA_BENCHMARKS


_SYNTHETIC_NEEDS = {"synthetic-indomain": "; data.heldout_students must be > 0",
                    "synthetic-clips": "; data.clips_per_student must be > 0",
                    "synthetic-daisee": "; data.clips_per_student must be > 0"}


def benchmark_names() -> list[str]:
    return list(READERS) + list(SYNTHETIC)


def canonical_name(name: str) -> str:
    """A benchmark's name as the registry spells it (`RAF-DB` -> `rafdb`, ` FER2013 ` -> `fer2013`)."""
    key = name.strip().lower()
    return ALIASES.get(key, key)


_canonical = canonical_name   # the readers' and the config's spelling


def open_benchmark(spec: str, *, data_root: Path | None = None, split: str | None = None,
                   **options: Any) -> Benchmark:
    """Open one benchmark from ``name=path``, ``name:split=path`` or a bare synthetic name.

    `split` overrides the default split (a split inside the spec wins over neither: giving both
    is an error). `options` go to the reader (e.g. ``mode="distribution"`` for FERPlus,
    ``last_frames=1`` for CK+, ``labels="a,b,c"`` for folders)."""
    text = spec.strip()
    if not text:
        raise BenchmarkError("empty benchmark spec (expected name=path, e.g. fer2013=/data/fer2013.csv)")
    head, sep, path_text = text.partition("=")
    name_text, _, spec_split = head.partition(":")
    if spec_split and split and spec_split != split:
        raise BenchmarkError(f"benchmark '{spec}': split given twice ('{spec_split}' and '{split}')")
    split = spec_split.strip() or split
    key = _canonical(name_text)
    if key in SYNTHETIC:
        reader_name, relative, default_split = SYNTHETIC[key]
        if sep:
            path = Path(path_text.strip()).expanduser()
        elif data_root is None:
            raise BenchmarkError(f"{key}: no data root given (the synthetic classroom folder that holds public/; "
                                 "--data-root on the command line)")
        else:
            path = Path(data_root).expanduser() / relative
        if not path.exists():
            raise BenchmarkError(
                f"{path}: {key} not found (written by the synthetic classroom; run `fedfer data synth` "
                f"or set --data-root{_SYNTHETIC_NEEDS.get(key, '')})"
            )
        return READERS[reader_name](path, name=key, split=split or default_split, **options)
    if key not in READERS:
        raise BenchmarkError(f"unknown benchmark '{name_text}' (known: {', '.join(benchmark_names())})")
    if not sep or not path_text.strip():
        raise BenchmarkError(f"benchmark '{name_text}' needs a path: {key}=PATH")
    path = Path(path_text.strip()).expanduser()
    if not path.exists():
        raise BenchmarkError(f"{path}: not found (benchmark {key})")
    return READERS[key](path, name=key, split=split, **options)


def split_benchmark_list(specs: str | Sequence[str]) -> list[str]:
    """The config's ``evaluation.benchmarks`` (comma-separated) or a list, as a list of specs."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    return [item.strip() for item in items if item and item.strip()]


def open_benchmarks(specs: str | Sequence[str], *, data_root: Path | None = None) -> list[Benchmark]:
    """Open every benchmark of a comma-separated list (the config key) or a list of specs."""
    return [open_benchmark(spec, data_root=data_root) for spec in split_benchmark_list(specs)]
