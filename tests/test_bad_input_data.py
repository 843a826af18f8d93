"""Hostile or careless data files (issue 20): benchmark files, a school's data folder, ledgers and a
run's confusion matrix. Each case must end in one line naming the file (and line), a skipped and
counted sample, or a correct read — never a traceback, a hang or a file read outside its folder."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared_models.datasets.school_folder import load_school
from privacy.ledger import LedgerError, read_ledger_file
from shared_models.datasets import BenchmarkError, open_benchmark


def png(path: Path, side: int = 8, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(path)
    return path


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid PNG header claiming side×side pixels, with almost no data (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    return path


# -- benchmark readers -------------------------------------------------------------------------------
def test_fer2013_256x256_is_read_and_a_cell_beyond_512x512_is_one_line(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("emotion,pixels,Usage\n3," + " ".join(["255"] * 256 * 256) + ",PrivateTest\n")
    bench = open_benchmark(f"fer2013={path}")  # each cell is 262,143 characters: over csv's default limit
    face, label = bench[0]
    assert face.shape == (256, 256) and label == 3 and int(face.max()) == 255
    path.write_text("emotion,pixels,Usage\n3," + "255 " * 300_000 + ",PrivateTest\n")
    with pytest.raises(BenchmarkError, match=r"big\.csv:2: a cell longer than"):
        open_benchmark(f"fer2013={path}")


def test_named_pipes_are_refused_or_skipped_without_opening(tmp_path):
    os.mkfifo(tmp_path / "fer2013.csv")
    with pytest.raises(BenchmarkError, match="named pipe"):
        open_benchmark(f"fer2013={tmp_path / 'fer2013.csv'}")
    root = tmp_path / "raf"
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("test_0001.jpg 1\ntest_0002.jpg 2\n")
    png(root / "Image" / "aligned" / "test_0001_aligned.jpg")
    os.mkfifo(root / "Image" / "aligned" / "test_0002_aligned.jpg")
    bench = open_benchmark(f"rafdb={root}")
    assert len(bench) == 1 and bench.skipped == 1 and "named pipe" in bench.skipped_files[0][1]


def test_decompression_bomb_is_skipped_and_counted(tmp_path):
    png(tmp_path / "happy" / "ok.png")
    png(tmp_path / "sad" / "ok.png")
    bomb_png(tmp_path / "sad" / "bomb.png")
    bench = open_benchmark(f"imagefolder={tmp_path}")
    assert len(bench) == 2 and bench.skipped == 1
    assert bench.skipped_files[0][0].endswith("bomb.png") and "too large" in bench.skipped_files[0][1]


def _affectnet(tmp_path: Path, row: str) -> Path:
    lists = tmp_path / "Manually_Annotated_file_lists"
    lists.mkdir()
    png(tmp_path / "Manually_Annotated_Images" / "x.jpg", side=16)
    (lists / "validation.csv").write_text(
        "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
        + row + "\n")
    return tmp_path


@pytest.mark.parametrize("box", ["0,0,inf,4", "nan,0,4,4", "0,0,1e300,4"])
def test_affectnet_non_finite_or_absurd_face_box_is_one_line(tmp_path, box):
    root = _affectnet(tmp_path, f"x.jpg,{box},,1,0,0")
    with pytest.raises(BenchmarkError, match=r"validation\.csv:2: face box"):
        open_benchmark(f"affectnet={root}")


def test_affectnet_box_past_the_image_is_clipped_not_padded(tmp_path):
    root = _affectnet(tmp_path, "x.jpg,8,8,100,100,,1,0,0")
    face, _ = open_benchmark(f"affectnet={root}")[0]
    assert face.shape == (8, 8, 3)


def test_affectnet_empty_or_corrupt_npy_is_one_line(tmp_path):
    folder = tmp_path / "val_set"
    png(folder / "images" / "1.jpg")
    (folder / "annotations").mkdir()
    np.save(folder / "annotations" / "1_exp.npy", np.array([]))
    with pytest.raises(BenchmarkError, match=r"1_exp\.npy: empty expression annotation"):
        open_benchmark(f"affectnet={tmp_path}")
    (folder / "annotations" / "1_exp.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(BenchmarkError, match=r"1_exp\.npy: not a readable \.npy"):
        open_benchmark(f"affectnet={tmp_path}")


@pytest.mark.parametrize("code", ["inf", "-inf", "nan", "1e400"])
def test_ckplus_non_finite_emotion_code_is_one_line(tmp_path, code):
    png(tmp_path / "cohn-kanade-images" / "S005" / "001" / "S005_001_00000001.png")
    label = tmp_path / "Emotion" / "S005" / "001" / "S005_001_00000001_emotion.txt"
    label.parent.mkdir(parents=True)
    label.write_text(f"   {code}\n")
    with pytest.raises(BenchmarkError, match=r"_emotion\.txt: unknown label code"):
        open_benchmark(f"ckplus={tmp_path}")


def test_rafdb_overlong_line_is_one_line(tmp_path):
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "Image" / "aligned").mkdir(parents=True)
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("test_0001.jpg 1\n" + "x" * 100_000 + "\n")
    with pytest.raises(BenchmarkError, match=r"list_patition_label\.txt:2: line longer than"):
        open_benchmark(f"rafdb={tmp_path}")


# -- a school's data folder ---------------------------------------------------------------------------
def test_school_folder_bom_escapes_pipes_and_bombs(tmp_path):
    png(tmp_path / "other" / "secret.png", value=200)
    school = tmp_path / "school"
    png(school / "images" / "a.png")
    os.symlink(tmp_path / "other" / "secret.png", school / "images" / "link.png")
    os.mkfifo(school / "images" / "pipe.png")
    bomb_png(school / "images" / "bomb.png")
    rows = ["images/a.png,happy,s1", "../other/secret.png,happy,s1", f"{tmp_path}/other/secret.png,sad,s1",
            "images/link.png,sad,s2", "images/pipe.png,sad,s2", "images/bomb.png,sad,s2", "images/a.png,joy,s2"]
    (school / "labels.csv").write_bytes(b"\xef\xbb\xbf" + ("path,label,student_id\n" + "\n".join(rows) + "\n").encode())
    data = load_school(school)
    assert len(data) == 1 and int(data.images.max()) == 0  # the image outside the folder was never read
    assert data.skipped == {"paths outside the data directory": 3, "not regular files": 1, "images too large": 1,
                            "unknown labels": 1}
    assert "labels.csv line 3" in data.first_problem and "leads outside" in data.first_problem


def test_privacy_attack_without_usable_images_exits_2_not_the_privacy_bug_code(tmp_path, capsys):
    from fedfer.cli import main

    (tmp_path / "labels.csv").write_text("path,label,student_id\nmissing.png,happy,s1\n")
    assert main(["privacy", "canary-audit", "--data-dir", str(tmp_path)]) == 2   # 1 is "bound above claim"
    assert "no usable images" in capsys.readouterr().err


# -- ledger lines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("line, message", [
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    (b'{"round": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"a": NaN}', "not valid JSON"),
    (b'{"a": "' + b"x" * (2 * 1024 * 1024) + b'"}', "line longer than"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_ledger_lines_are_refused_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"{}\n" + line + b"\n")
    with pytest.raises(LedgerError, match=rf"ledger\.jsonl line 2: {message}"):
        read_ledger_file(path)


def test_ledger_field_checks_refuse_integers_too_large_for_a_float(tmp_path):
    from privacy.ledger import check_entry_fields

    with pytest.raises(LedgerError, match="field 'schema' has a bad value"):
        check_entry_fields({"event": "round", "schema": 10**4000}, "x line 1")


def test_ledger_that_is_a_named_pipe_is_refused(tmp_path):
    os.mkfifo(tmp_path / "ledger.jsonl")
    with pytest.raises(LedgerError, match="not a regular file"):
        read_ledger_file(tmp_path / "ledger.jsonl")


# -- the run report's confusion matrix ---------------------------------------------------------------
def test_confusion_heatmap_of_300_classes_is_drawn_and_absurd_ones_refused(tmp_path):
    from server import plots

    counts = np.random.default_rng(0).integers(0, 50, (300, 300)).tolist()
    path = plots.confusion_heatmap(counts, [str(i) for i in range(300)], tmp_path / "c.png", title="300 classes")
    assert path.is_file()
    for bad, why in [([[1, 2], [3]], "not square"), ([[1, "a"], [2, 3]], "not numbers"),
                     ([[-1, 0], [0, 1]], "negative"), ([[0] * 1001] * 1001, "1001 rows")]:
        with pytest.raises(ValueError, match=why):
            plots.confusion_heatmap(bad, ["a", "b"], tmp_path / "bad.png", title="bad")


def test_affectnet_image_path_leaving_its_folder_is_skipped_not_opened(tmp_path):
    """A file list that names '../x' or '/etc/x' must not make the reader open files outside the benchmark."""
    png(tmp_path / "outside.jpg", side=16)
    (tmp_path / "AffectNet").mkdir()
    root = _affectnet(tmp_path / "AffectNet", "x.jpg,0,0,8,8,,1,0,0\n"
                      f"../../outside.jpg,0,0,8,8,,1,0,0\n{tmp_path / 'outside.jpg'},0,0,8,8,,1,0,0")
    bench = open_benchmark(f"affectnet={root}")
    assert len(bench) == 1 and bench.skipped == 2
    assert all("leaves" in why for _, why in bench.skipped_files), bench.skipped_files


def test_ferplus_image_name_leaving_its_folder_is_skipped_not_opened(tmp_path):
    from test_benchmarks import write_ferplus

    happy = [0, 8, 2, 0, 0, 0, 0, 0, 0, 0]
    folder = write_ferplus(tmp_path / "ferplus", [("PrivateTest", "fer0000001.png", happy),
                                                  ("PrivateTest", "../escape.png", happy),
                                                  ("PrivateTest", str(tmp_path / "ferplus" / "escape.png"), happy)])
    png(folder / "FER2013Test" / "fer0000001.png", side=48)
    png(folder / "escape.png", side=48)
    bench = open_benchmark(f"ferplus={folder}")
    assert len(bench) == 1 and bench.skipped == 2
    assert all("leaves" in why for _, why in bench.skipped_files), bench.skipped_files
