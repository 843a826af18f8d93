"""Property-based tests (Hypothesis) for the files fedfer reads from outside: benchmark readers
(FER2013 CSV, RAF-DB list, image folders), a school's data folder and the privacy ledger.

The property everywhere: whatever the bytes, the reader either returns its result or raises its own
one-line error type (BenchmarkError, SchoolDataError, LedgerError) — never another exception — and
what it returns is what the valid part of the input says. The example budget is fixed and the
search derandomised, so the suite is deterministic and quick (well under a minute together).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from shared_models.datasets.school_folder import SchoolDataError, load_school
from privacy.ledger import LedgerError, read_ledger_file
from shared_models.datasets import BenchmarkError, open_benchmark
from shared_models.labels import FER7

BUDGET = settings(max_examples=30, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- building blocks ----------------------------------------------------------------------------
# cell text with the characters that break CSVs (quotes, separators, newlines, NUL, BOM, non-ASCII)
messy_text = st.text(alphabet=st.sampled_from(list("0123456789 -,.\"'\n\r\t\x00abcé\ufeff+eEinfa")), max_size=40)
usages = st.sampled_from(["Training", "PublicTest", "PrivateTest", "", "private", "Training "])


def _png_bytes(side: int, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), value, np.uint8), "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _open(spec: str):
    try:
        return open_benchmark(spec)
    except BenchmarkError as exc:
        assert "\n" not in str(exc)
        return None


# -- FER2013 CSV --------------------------------------------------------------------------------
@BUDGET
@given(rows=st.lists(st.tuples(messy_text, messy_text, usages), max_size=6),
       header=st.sampled_from(["emotion,pixels,Usage", "emotion,pixels", " Usage,emotion, pixels", "pixels", ""]))
def test_fer2013_any_cells_give_a_benchmark_or_one_benchmark_error(rows, header):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fer2013.csv"
        body = "".join(",".join(f'"{c}"' if i == 1 else c for i, c in enumerate(r)) + "\n" for r in rows)
        path.write_text(header + "\n" + body, encoding="utf-8")
        bench = _open(f"fer2013:all={path}")
        if bench is not None:
            assert len(bench) + bench.skipped <= len(rows)
            for i in range(len(bench)):
                face, label = bench[i]
                assert face.dtype == np.uint8 and 0 <= label < 7


@BUDGET
@given(faces=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 255), st.sampled_from(["Training", "PrivateTest"])),
                      min_size=1, max_size=8),
       side=st.sampled_from([2, 3, 48, 256]))  # 256: cells over Python's default csv field limit
def test_fer2013_valid_rows_are_all_read_with_their_labels_and_pixels(faces, side):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fer2013.csv"
        lines = ["emotion,pixels,Usage"] + [f"{e},{' '.join([str(v)] * side * side)},{u}" for e, v, u in faces]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        bench = open_benchmark(f"fer2013:all={path}")
        assert len(bench) == len(faces) and bench.skipped == 0
        for i, (emotion, value, _) in enumerate(faces):
            face, label = bench[i]
            assert label == emotion and face.shape == (side, side) and int(face[0, 0]) == value


# -- RAF-DB list ---------------------------------------------------------------------------------
raf_lines = st.one_of(
    st.tuples(st.sampled_from(["train", "test", "val", "TEST", ""]), st.integers(0, 99999), st.integers(-1, 9))
    .map(lambda t: f"{t[0]}_{t[1]:05d}.jpg {t[2]}"),
    messy_text,
)


@BUDGET
@given(lines=st.lists(raf_lines, max_size=8), with_images=st.booleans())
def test_rafdb_any_list_gives_a_benchmark_or_one_benchmark_error(lines, with_images):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "EmoLabel").mkdir()
        aligned = root / "Image" / "aligned"
        aligned.mkdir(parents=True)
        (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        expected_images = 0
        if with_images:
            for line in lines:
                parts = line.split()
                if len(parts) == 2 and parts[0].endswith(".jpg") and "/" not in parts[0] and "\x00" not in parts[0]:
                    (aligned / f"{Path(parts[0]).stem}_aligned.jpg").write_bytes(_png_bytes(4, 7))
                    expected_images += 1
        bench = _open(f"rafdb:all={root}")
        if bench is not None:
            assert len(bench) <= expected_images
            assert all(0 <= label < 7 for label in bench.targets)


# -- image folders -------------------------------------------------------------------------------
folder_names = st.sampled_from(["happy", "Sad", "anger", "neutral", "Contempt", "cats", "su", "x y"])
file_kinds = st.sampled_from(["png", "garbage", "empty", "fifo", "dir", "txt"])


@BUDGET
@given(files=st.lists(st.tuples(folder_names, file_kinds), min_size=1, max_size=8))
def test_image_folder_counts_every_image_file_as_read_or_skipped(files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image_files = 0
        for i, (folder, kind) in enumerate(files):
            (root / folder).mkdir(exist_ok=True)
            path = root / folder / f"f{i}.png"
            if kind == "png":
                path.write_bytes(_png_bytes(5, i))
            elif kind == "garbage":
                path.write_bytes(b"\x89PNG not really")
            elif kind == "empty":
                path.write_bytes(b"")
            elif kind == "fifo":
                os.mkfifo(path)  # must never be opened: it would block
            elif kind == "dir":
                path.mkdir()
            else:
                (root / folder / f"f{i}.txt").write_text("not an image")
            image_files += kind in ("png", "garbage", "empty")
        bench = _open(f"imagefolder:all={root}")
        if bench is not None:
            assert len(bench) + bench.skipped == image_files
            assert len(bench) == sum(kind == "png" for _, kind in files)


# -- a school's data folder ------------------------------------------------------------------------
school_paths = st.sampled_from([
    "images/a.png", "images/b.png", "images/missing.png", "../outside.png", "images/../../outside.png",
    "/etc/hostname", "images/link-out.png", "images/link-in.png", "images/pipe.png", "images", "", "images/bad.png",
])
labels = st.sampled_from(list(FER7) + ["Happy", "joy", "", "7"])
GOOD_PATHS = {"images/a.png", "images/b.png", "images/link-in.png"}


@BUDGET
@given(rows=st.lists(st.tuples(school_paths, labels, st.sampled_from(["s1", "s2", ""])), max_size=10),
       bom=st.booleans())
def test_school_folder_reads_only_inside_images_and_counts_the_rest(rows, bom):
    with tempfile.TemporaryDirectory() as tmp:
        outside = Path(tmp) / "outside.png"
        outside.write_bytes(_png_bytes(6, 200))
        school = Path(tmp) / "school"
        images = school / "images"
        images.mkdir(parents=True)
        (images / "a.png").write_bytes(_png_bytes(6, 1))
        (images / "b.png").write_bytes(_png_bytes(6, 2))
        (images / "bad.png").write_bytes(b"garbage")
        os.symlink(outside, images / "link-out.png")
        os.symlink(images / "a.png", images / "link-in.png")
        os.mkfifo(images / "pipe.png")
        text = "path,label,student_id\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows)
        (school / "labels.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
        try:
            data = load_school(school)
        except SchoolDataError:
            raise AssertionError("a labels.csv with the right header must be readable") from None
        usable = [r for r in rows if r[0] in GOOD_PATHS and r[1] in FER7 and r[2]]
        assert len(data) == len(usable)
        assert sum(data.skipped.values()) == len(rows) - len(usable)
        assert not (data.images == 200).all(axis=(1, 2, 3)).any()  # the outside image is never read


@BUDGET
@given(content=st.binary(max_size=300))
def test_school_folder_any_labels_csv_bytes_give_data_or_one_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        school = Path(tmp)
        (school / "labels.csv").write_bytes(content)
        try:
            data = load_school(school)
        except SchoolDataError as exc:
            assert str(exc).startswith(str(school))
        else:
            assert len(data) == 0


# -- the ledger parser -------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**18 + 1, 10**18 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@BUDGET
@given(values=st.lists(json_values, max_size=5))
def test_ledger_parser_reads_back_any_json_lines(values):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.jsonl"
        path.write_text("".join(json.dumps(v) + "\n" for v in values), encoding="utf-8")
        assert read_ledger_file(path) == values


ledger_noise = st.one_of(
    st.binary(max_size=200),
    # sizes on both sides of the limits (Python's recursion limit, its 4,300-digit int limit, ours)
    st.sampled_from([1, 30, 999, 5000, 100_000]).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from([15, 19, 400, 4301, 5000]).map(lambda n: b'{"steps": ' + b"9" * n + b"}\n"),
    st.sampled_from([b"NaN\n", b'{"a": Infinity}\n', b"-Infinity\n", b"\n", b"{}", b"\xff\xfe\n", b"[1e999]\n"]),
)


@BUDGET
@given(lines=st.lists(ledger_noise, min_size=1, max_size=4))
def test_ledger_parser_refuses_bad_lines_with_one_ledger_error(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.jsonl"
        path.write_bytes(b"".join(lines))
        try:
            entries = read_ledger_file(path)
        except LedgerError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        else:
            assert len(entries) == b"".join(lines).count(b"\n")
