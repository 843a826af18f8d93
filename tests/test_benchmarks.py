"""Benchmark readers: each on small files written here in that benchmark's exact layout, plus a
malformed variant that must give a one-line error naming the file (and line/column)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared_models.datasets import BenchmarkError, open_benchmark
from shared_models.datasets.affectnet import AFFECTNET_TO_FER8
from shared_models.datasets.ckplus import CKPLUS_TO_FER8
from shared_models.datasets.clips import DFEW_TO_FER7
from shared_models.datasets.fer2013 import FER2013_TO_FER7
from shared_models.datasets.ferplus import FERPLUS_TO_FER8, majority_label
from shared_models.datasets.kdef import KDEF_TO_FER7
from shared_models.datasets.rafdb import RAFDB_TO_FER7
from shared_models.labels import FER7, FER8

RNG = np.random.default_rng(0)


def write_image(path: Path, size=(20, 20), value: int | None = None, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = RNG.integers(0, 255, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all")
    return path


def write_truncated_jpeg(path: Path) -> Path:
    write_image(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # header intact, data cut: passes the probe, fails to decode
    return path


# -- label maps ---------------------------------------------------------------------------------
def test_label_maps_are_bijections_onto_canonical_names():
    assert [FER7[FER2013_TO_FER7[c]] for c in range(7)] == list(FER7)
    assert [FER7[RAFDB_TO_FER7[c]] for c in range(1, 8)] == ["surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"]
    assert [FER8[AFFECTNET_TO_FER8[c]] for c in range(8)] == [
        "neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt"]
    assert [FER8[CKPLUS_TO_FER8[c]] for c in range(8)] == [
        "neutral", "angry", "contempt", "disgust", "fear", "happy", "sad", "surprise"]
    assert [FER8[FERPLUS_TO_FER8[c]] for c in range(8)] == [
        "neutral", "happy", "surprise", "sad", "angry", "disgust", "fear", "contempt"]
    assert [FER7[DFEW_TO_FER7[c]] for c in range(1, 8)] == ["happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"]
    assert {k: FER7[v] for k, v in KDEF_TO_FER7.items()} == {
        "AF": "fear", "AN": "angry", "DI": "disgust", "HA": "happy", "NE": "neutral", "SA": "sad", "SU": "surprise"}
    for mapping in (FER2013_TO_FER7, RAFDB_TO_FER7, AFFECTNET_TO_FER8, CKPLUS_TO_FER8, FERPLUS_TO_FER8, DFEW_TO_FER7):
        assert len(set(mapping.values())) == len(mapping)


# -- FER2013 ------------------------------------------------------------------------------------
def fer_row(label: int, usage: str, value: int, side: int = 48) -> str:
    return f"{label},{' '.join([str(value)] * (side * side))},{usage}"


def write_fer2013(path: Path, rows: list[str], header: str = "emotion,pixels,Usage") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_fer2013_splits_labels_and_pixels(tmp_path):
    csv = write_fer2013(tmp_path / "fer2013.csv", [
        fer_row(0, "Training", 10), fer_row(3, "PublicTest", 20), fer_row(6, "PrivateTest", 30),
        fer_row(5, "PrivateTest", 40), fer_row(1, "Training", 50),
    ])
    test = open_benchmark(f"fer2013={csv}")
    assert test.split == "test" and len(test) == 2 and test.labels == FER7 and test.num_classes == 7
    face, label = test[0]
    assert face.dtype == np.uint8 and face.shape == (48, 48) and int(face[0, 0]) == 30 and label == 6
    assert test[1][1] == FER7.index("surprise")
    assert len(open_benchmark(f"fer2013:val={csv}")) == 1
    assert len(open_benchmark(f"fer2013={csv}", split="all")) == 5
    assert len(open_benchmark(f"fer2013={csv}", split="val+test")) == 3
    assert test.metadata["usage"] == ["PrivateTest", "PrivateTest"]


def test_fer2013_icml_header_with_spaces_and_kaggle_train_without_usage(tmp_path):
    icml = write_fer2013(tmp_path / "icml_face_data.csv", [fer_row(2, "PrivateTest", 1)], header="emotion, Usage, pixels")
    icml.write_text("emotion, Usage, pixels\n2,PrivateTest," + " ".join(["1"] * 2304) + "\n")
    assert open_benchmark(f"fer2013={icml}")[0][1] == FER7.index("fear")
    train = tmp_path / "train.csv"
    train.write_text("emotion,pixels\n4," + " ".join(["9"] * 2304) + "\n")
    assert len(open_benchmark(f"fer2013={train}")) == 1
    with pytest.raises(BenchmarkError, match="no 'Usage' column"):
        open_benchmark(f"fer2013={train}", split="test")


def test_fer2013_errors_name_file_line_and_column(tmp_path):
    bad_header = write_fer2013(tmp_path / "a.csv", ["0,1 2,Training"], header="emotion,pixel,Usage")
    with pytest.raises(BenchmarkError, match=r"a\.csv:1: missing column 'pixels'"):
        open_benchmark(f"fer2013={bad_header}")
    bad_code = write_fer2013(tmp_path / "b.csv", [fer_row(0, "PrivateTest", 1), fer_row(9, "PrivateTest", 1)])
    with pytest.raises(BenchmarkError, match=r"b\.csv:3: unknown label code '9' in column 'emotion' \(expected 0-6\)"):
        open_benchmark(f"fer2013={bad_code}")
    bad_usage = write_fer2013(tmp_path / "c.csv", [fer_row(0, "Testing", 1)])
    with pytest.raises(BenchmarkError, match=r"c\.csv:2: unknown Usage 'Testing'"):
        open_benchmark(f"fer2013={bad_usage}")
    with pytest.raises(BenchmarkError, match=r"missing\.csv: not found"):
        open_benchmark(f"fer2013={tmp_path / 'missing.csv'}")
    with pytest.raises(BenchmarkError, match="unknown split 'dev'"):
        open_benchmark(f"fer2013={bad_usage}", split="dev")


def test_fer2013_corrupt_pixel_rows_are_counted_and_skipped(tmp_path, caplog):
    csv = write_fer2013(tmp_path / "fer2013.csv", [
        fer_row(0, "PrivateTest", 1),
        "1," + " ".join(["5"] * 2000) + ",PrivateTest",      # too few values
        "2," + " ".join(["300"] * 2304) + ",PrivateTest",    # out of range
        "3,a b c,PrivateTest",                                # not numbers
        fer_row(4, "PrivateTest", 2),
    ])
    with caplog.at_level(logging.WARNING, logger="fedfer.benchmarks"):
        bench = open_benchmark(f"fer2013={csv}")
    assert len(bench) == 2 and bench.skipped == 3
    assert [label for _, label in bench] == [0, 4]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "skipped 3" in warnings[0] and "fer2013.csv:3" in warnings[0]


# -- FERPlus ------------------------------------------------------------------------------------
@pytest.mark.parametrize("votes, expected", [
    ([6, 2, 2, 0, 0, 0, 0, 0, 0, 0], 0),   # clear neutral
    ([4, 4, 2, 0, 0, 0, 0, 0, 0, 0], None),  # tie: cannot pass 50 %
    ([5, 1, 1, 1, 1, 1, 0, 0, 0, 0], 0),   # ones zeroed: 5 of 5
    ([3, 3, 2, 2, 0, 0, 0, 0, 0, 0], None),  # 3 of 10 is no majority
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 10], None),  # NF
    ([0, 0, 0, 0, 0, 0, 0, 0, 8, 2], None),   # unknown
    ([0, 1, 0, 0, 0, 0, 0, 6, 2, 1], 7),   # contempt: 6 of 8 after zeroing
])
def test_ferplus_majority_rule(votes, expected):
    assert majority_label(np.array(votes)) == expected


FERPLUS_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"


def write_ferplus(folder: Path, rows: list[tuple[str, str, list[int]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [FERPLUS_HEADER] + [f"{u},{n},{','.join(map(str, v))}" for u, n, v in rows]
    (folder / "fer2013new.csv").write_text("\n".join(lines) + "\n")
    return folder


FERPLUS_ROWS = [
    ("Training", "fer0000000.png", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ("PrivateTest", "fer0000001.png", [0, 8, 2, 0, 0, 0, 0, 0, 0, 0]),   # happy
    ("PrivateTest", "fer0000002.png", [4, 4, 2, 0, 0, 0, 0, 0, 0, 0]),   # tie -> dropped (majority)
    ("PrivateTest", "", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),                 # NF, no image
    ("PrivateTest", "fer0000004.png", [1, 0, 0, 0, 0, 0, 0, 7, 2, 0]),   # contempt
]


def test_ferplus_with_fer2013_csv_beside_it(tmp_path):
    folder = write_ferplus(tmp_path / "ferplus", FERPLUS_ROWS)
    write_fer2013(folder / "fer2013.csv", [fer_row(6, "Training", 1), fer_row(0, "PrivateTest", 2),
                                           fer_row(0, "PrivateTest", 3), fer_row(0, "PrivateTest", 4),
                                           fer_row(0, "PrivateTest", 5)])
    bench = open_benchmark(f"ferplus={folder}")
    assert bench.labels == FER8 and len(bench) == 2
    (face0, label0), (face1, label1) = bench[0], bench[1]
    assert label0 == FER8.index("happy") and int(face0[0, 0]) == 2
    assert label1 == FER8.index("contempt") and int(face1[0, 0]) == 5
    assert sum(bench.dropped.values()) == 2
    assert bench.soft_targets.shape == (2, 8)
    assert bench.soft_targets[0, FER8.index("happy")] == pytest.approx(0.8)
    soft = open_benchmark(f"ferplus={folder}", mode="distribution")
    assert len(soft) == 3  # the tie is kept, labelled by the first of the tied votes (neutral)
    assert soft[1][1] == FER8.index("neutral")
    np.testing.assert_allclose(soft.soft_targets.sum(axis=1), 1.0)
    # matched by position: a vote file shorter than the pixel file is refused, as the reverse is
    write_ferplus(folder, FERPLUS_ROWS[:3])
    with pytest.raises(BenchmarkError, match=r"fer2013\.csv: more rows than .*fer2013new\.csv \(line 5 has no vote row\)"):
        open_benchmark(f"ferplus={folder}")


def test_ferplus_image_folders_and_errors(tmp_path):
    folder = write_ferplus(tmp_path / "ferplus", FERPLUS_ROWS)
    with pytest.raises(BenchmarkError, match="no pixels for FERPlus"):
        open_benchmark(f"ferplus={folder}")
    write_image(folder / "FER2013Test" / "fer0000001.png", (48, 48), mode="L")
    write_garbage(folder / "FER2013Test" / "fer0000004.png")
    bench = open_benchmark(f"ferplus={folder}")
    assert len(bench) == 1 and bench.skipped == 1 and bench[0][0].shape == (48, 48)
    write_fer2013(folder / "fer2013.csv", [fer_row(0, "Training", 1), fer_row(0, "PublicTest", 1)] +
                  [fer_row(0, "PrivateTest", 1)] * 3)
    with pytest.raises(BenchmarkError, match=r"fer2013new\.csv:3: Usage 'PrivateTest' but fer2013\.csv line 3 says 'PublicTest'"):
        open_benchmark(f"ferplus={folder}")
    (folder / "fer2013new.csv").write_text(FERPLUS_HEADER.replace(",contempt", "") + "\n")
    with pytest.raises(BenchmarkError, match=r"fer2013new\.csv:1: missing column 'contempt'"):
        open_benchmark(f"ferplus={folder}")


# -- RAF-DB -------------------------------------------------------------------------------------
def write_rafdb(root: Path, entries: list[tuple[str, int]], corrupt: tuple[str, ...] = (), truncated: tuple[str, ...] = ()) -> Path:
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("".join(f"{n} {c}\n" for n, c in entries))
    for name, _ in entries:
        file = root / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg"
        if name in corrupt:
            write_garbage(file)
        elif name in truncated:
            write_truncated_jpeg(file)
        else:
            write_image(file, (100, 100))
    return root


def test_rafdb_layout_split_and_mapping(tmp_path):
    root = write_rafdb(tmp_path / "basic", [("train_00001.jpg", 5), ("test_0001.jpg", 1), ("test_0002.jpg", 6),
                                            ("test_0003.jpg", 7)])
    bench = open_benchmark(f"rafdb={root}")
    assert bench.split == "test" and len(bench) == 3
    assert [label for _, label in bench] == [FER7.index("surprise"), FER7.index("angry"), FER7.index("neutral")]
    face, _ = bench[0]
    assert face.shape == (100, 100, 3) and face.dtype == np.uint8
    assert len(open_benchmark(f"rafdb={root}", split="all")) == 4
    assert len(open_benchmark(f"rafdb={tmp_path}")) == 3  # the RAF-DB folder holding basic/ also works


def test_a_file_given_as_rafdb_is_named(tmp_path):
    stray = tmp_path / "fer2013.csv"
    stray.write_text("emotion,pixels,Usage\n")
    with pytest.raises(BenchmarkError, match=rf"^{stray}: a file; RAF-DB is a folder"):
        open_benchmark(f"rafdb={stray}")


def test_rafdb_errors(tmp_path):
    root = write_rafdb(tmp_path / "basic", [("test_0001.jpg", 1), ("test_0002.jpg", 8)])
    with pytest.raises(BenchmarkError, match=r"list_patition_label\.txt:2: unknown label code '8' in the label column \(expected 1-7\)"):
        open_benchmark(f"rafdb={root}")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("test_0001.jpg\n")
    with pytest.raises(BenchmarkError, match=r"list_patition_label\.txt:1: expected '<image name> <label 1-7>'"):
        open_benchmark(f"rafdb={root}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkError, match=r"EmoLabel/list_patition_label\.txt: RAF-DB label file .* not found"):
        open_benchmark(f"rafdb={empty}")


def test_corrupt_images_counted_and_skipped_at_open_and_at_access(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    from shared_models.datasets import collate_skipping
    from shared_models.transforms import eval_transform

    entries = [(f"test_000{i}.jpg", 1 + i % 7) for i in range(1, 7)]
    root = write_rafdb(tmp_path / "basic", entries, corrupt=("test_0002.jpg",), truncated=("test_0004.jpg",))
    (root / "Image" / "aligned" / "test_0006_aligned.jpg").unlink()  # listed but missing
    with caplog.at_level(logging.WARNING, logger="fedfer.benchmarks"):
        bench = open_benchmark(f"rafdb={root}")
    assert bench.skipped == 2 and len(bench) == 4  # garbage + missing found by the probe
    assert any("skipped 2 unreadable" in r.getMessage() and "test_0002_aligned.jpg" in r.getMessage() for r in caplog.records)
    data = bench.as_torch(eval_transform(32))
    items = [data[i] for i in range(len(data))]
    assert sum(item is None for item in items) == 1 and bench.skipped == 3 and data.skipped == 3
    data[2]  # the same corrupt face again is not counted twice
    assert bench.skipped == 3
    batch = collate_skipping(items)
    assert batch[0].shape == (3, 3, 32, 32) and batch[0].dtype == torch.float32
    assert float(batch[0].min()) >= -1.0 and float(batch[0].max()) <= 1.0


# -- AffectNet ----------------------------------------------------------------------------------
AFFECTNET_HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"


def write_affectnet(root: Path, rows: list[tuple[str, int]], header: bool = True) -> Path:
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True, exist_ok=True)
    landmarks = ";".join(["1.0"] * 136)
    lines = [AFFECTNET_HEADER] if header else []
    for rel, code in rows:
        lines.append(f"{rel},4,6,20,24,{landmarks},{code},0.1,-0.2")
        write_image(root / "Manually_Annotated_Images" / rel, (40, 40))
    (lists / "validation.csv").write_text("\n".join(lines) + "\n")
    (lists / "training.csv").write_text(AFFECTNET_HEADER + "\n")
    return root


def test_affectnet_csv_7_and_8_classes_drop_codes_and_crop(tmp_path):
    rows = [(f"{i}/img{i}.jpg", code) for i, code in enumerate([0, 1, 6, 7, 8, 9, 10])]
    root = write_affectnet(tmp_path / "AffectNet", rows)
    eight = open_benchmark(f"affectnet8={root}")
    assert eight.labels == FER8 and eight.split == "val"
    assert [label for _, label in eight] == [FER8.index(n) for n in ("neutral", "happy", "angry", "contempt")]
    assert eight.dropped == {"code 8 (None)": 1, "code 9 (Uncertain)": 1, "code 10 (No-Face)": 1}
    assert eight[0][0].shape == (24, 20, 3)  # the face box is cut out
    seven = open_benchmark(f"affectnet={root}")  # alias of affectnet7
    assert seven.name == "affectnet7" and seven.labels == FER7 and len(seven) == 3
    assert seven.dropped["code 7 (Contempt) in AffectNet-7"] == 1
    assert open_benchmark(f"affectnet8={root}", crop=False)[0][0].shape == (40, 40, 3)
    headerless = write_affectnet(tmp_path / "noheader", rows[:2], header=False)
    assert len(open_benchmark(f"affectnet8={headerless}")) == 2


def test_affectnet_errors_and_other_layouts(tmp_path):
    root = write_affectnet(tmp_path / "AffectNet", [("0/a.jpg", 1), ("0/b.jpg", 11)])
    with pytest.raises(BenchmarkError, match=r"validation\.csv:3: unknown label code '11' in column 'expression'"):
        open_benchmark(f"affectnet8={root}")
    (root / "Manually_Annotated_file_lists" / "validation.csv").write_text("subDirectory_filePath,valence\n0/a.jpg,0.1\n")
    with pytest.raises(BenchmarkError, match=r"validation\.csv:1: missing column 'expression'"):
        open_benchmark(f"affectnet8={root}")
    folders = tmp_path / "dan"
    for code in (0, 3, 7):
        write_image(folders / "val" / str(code) / f"x{code}.jpg")
    dan7 = open_benchmark(f"affectnet7={folders}")
    assert sorted(label for _, label in dan7) == sorted([FER7.index("neutral"), FER7.index("surprise")])
    new = tmp_path / "new"
    for stem, code in (("1", "4"), ("2", "9")):
        write_image(new / "val_set" / "images" / f"{stem}.jpg")
        (new / "val_set" / "annotations").mkdir(parents=True, exist_ok=True)
        np.save(new / "val_set" / "annotations" / f"{stem}_exp.npy", np.array(code))
    release = open_benchmark(f"affectnet8={new}")
    assert [label for _, label in release] == [FER8.index("fear")] and sum(release.dropped.values()) == 1


# -- CK+ ----------------------------------------------------------------------------------------
def write_ckplus(root: Path, sequences: dict[str, tuple[int, str | None]]) -> Path:
    for seq, (frames, code) in sequences.items():
        subject, number = seq.split("/")
        for i in range(1, frames + 1):
            write_image(root / "cohn-kanade-images" / subject / number / f"{subject}_{number}_{i:08d}.png",
                        (32, 24), value=i, mode="L")
        if code is not None:
            emotion = root / "Emotion" / subject / number
            emotion.mkdir(parents=True, exist_ok=True)
            (emotion / f"{subject}_{number}_{frames:08d}_emotion.txt").write_text(f"   {code}\n")
    return root


def test_ckplus_last_frames_protocol_identity_and_neutral(tmp_path):
    root = write_ckplus(tmp_path / "CK+", {"S005/001": (6, "3.0000000e+00"), "S010/002": (4, "7.0000000e+00"),
                                            "S011/001": (5, None)})
    bench = open_benchmark(f"ck+={root}")
    assert bench.labels == FER8 and len(bench) == 6
    assert [label for _, label in bench] == [FER8.index("disgust")] * 3 + [FER8.index("surprise")] * 3
    assert [int(face[0, 0]) for face, _ in bench][:3] == [4, 5, 6]  # the last three frames
    assert bench.metadata["identity"] == ["S005"] * 3 + ["S010"] * 3
    with_neutral = open_benchmark(f"ckplus={root}", last_frames=1, first_as_neutral=True)
    assert [label for _, label in with_neutral] == [FER8.index("disgust"), FER8.index("neutral"),
                                                    FER8.index("surprise"), FER8.index("neutral")]
    assert int(with_neutral[1][0][0, 0]) == 1


def test_ckplus_errors(tmp_path):
    root = write_ckplus(tmp_path / "CK+", {"S005/001": (3, "9.0000000e+00")})
    with pytest.raises(BenchmarkError, match=r"S005_001_00000003_emotion\.txt: unknown label code '9\.0000000e\+00'"):
        open_benchmark(f"ckplus={root}")
    (root / "Emotion" / "S005" / "001" / "S005_001_00000003_emotion.txt").write_text("happy")
    with pytest.raises(BenchmarkError, match="unknown label code 'happy' in the emotion file"):
        open_benchmark(f"ckplus={root}")
    with pytest.raises(BenchmarkError, match=r"Emotion: CK\+ labels \(Emotion\) directory not found"):
        open_benchmark(f"ckplus={write_ckplus(tmp_path / 'nolabels', {'S001/001': (2, None)})}")


# -- KDEF ---------------------------------------------------------------------------------------
def test_kdef_names_identity_and_frontal_split(tmp_path):
    root = tmp_path / "KDEF"
    for name in ("AF01ANS.JPG", "AF01HAHL.JPG", "BM12SUS.JPG", "AF01AFFR.JPG", "BF03NES.jpg"):
        write_image(root / name[:4] / name, (28, 36))
    (root / "readme.txt").write_text("not an image")
    bench = open_benchmark(f"kdef={root}")
    assert len(bench) == 5 and bench.labels == FER7
    by_file = {Path(bench.describe(i)).name: (bench.targets[i], bench.metadata["identity"][i]) for i in range(len(bench))}
    assert by_file["AF01ANS.JPG"] == (FER7.index("angry"), "F01")
    assert by_file["AF01AFFR.JPG"] == (FER7.index("fear"), "F01")
    assert by_file["BM12SUS.JPG"] == (FER7.index("surprise"), "M12")
    assert by_file["BF03NES.jpg"][0] == FER7.index("neutral")
    assert len(open_benchmark(f"kdef={root}", split="frontal")) == 3
    write_image(root / "AF02" / "AF02XXS.JPG")
    with pytest.raises(BenchmarkError, match=r"AF02XXS\.JPG: unknown label code 'XX'"):
        open_benchmark(f"kdef={root}")
    (root / "AF02" / "AF02XXS.JPG").unlink()
    write_image(root / "AF02" / "photo.jpg")
    with pytest.raises(BenchmarkError, match=r"photo\.jpg: name does not follow the KDEF pattern"):
        open_benchmark(f"kdef={root}")


# -- generic image folders ----------------------------------------------------------------------
def test_imagefolder_synonyms_contempt_custom_labels_and_errors(tmp_path):
    root = tmp_path / "faces"
    for folder in ("Angry", "happiness", "Surprised"):
        write_image(root / "test" / folder / "a.png")
    bench = open_benchmark(f"imagefolder={root}")
    assert bench.split == "test" and bench.labels == FER7
    assert sorted(label for _, label in bench) == sorted(FER7.index(n) for n in ("angry", "happy", "surprise"))
    write_image(root / "test" / "Contempt" / "b.png")
    assert open_benchmark(f"imagefolder={root}").labels == FER8
    classroom = tmp_path / "classroom"
    for folder in ("bored", "happy"):
        write_image(classroom / folder / "c.png")
    with pytest.raises(BenchmarkError, match=r"bored: class folder 'bored' is not an FER class"):
        open_benchmark(f"imagefolder={classroom}")
    custom = open_benchmark(f"imagefolder={classroom}", labels="happy,bored,tired")
    assert custom.labels == ("happy", "bored", "tired") and sorted(custom.targets.tolist()) == [0, 1]


# -- clips: DAiSEE, DFEW, AFEW, clip folders -------------------------------------------------
def write_frames(folder: Path, count: int, size=(16, 12), start: int = 0) -> Path:
    for i in range(count):
        write_image(folder / f"frame{i + 1}.jpg", size, value=start + 10 * i)
    return folder


def test_daisee_trailing_space_header_levels_and_missing_clips(tmp_path):
    root = tmp_path / "DAiSEE"
    write_frames(root / "DataSet" / "Test" / "500044" / "5000441001", 5)
    write_frames(root / "DataSet" / "Test" / "500044" / "5000441002", 3)
    (root / "DataSet" / "Test" / "500067" / "5000671001").mkdir(parents=True)
    (root / "DataSet" / "Test" / "500067" / "5000671001" / "5000671001.avi").write_bytes(b"\x00" * 10)
    labels = root / "Labels"
    labels.mkdir()
    (labels / "TestLabels.csv").write_text(
        "ClipID,Boredom,Engagement,Confusion,Frustration \n"
        "5000441001.avi,0,3,0,1\n5000441002.avi,1,2,0,2\n9999999999.avi,0,1,0,0\n")
    bench = open_benchmark(f"daisee={root}", num_frames=4)
    assert bench.kind == "clip" and bench.labels == ("very low", "low", "high", "very high")
    assert len(bench) == 2 and bench.skipped == 1  # 9999999999 is not on disk
    frames, label = bench[0]
    assert frames.shape == (4, 12, 16, 3) and label == 3
    assert bench.metadata["identity"] == ["500044", "500044"]
    frustration = open_benchmark(f"daisee={root}", target="frustration")
    assert frustration.targets.tolist() == [1, 2]
    (labels / "TestLabels.csv").write_text("ClipID,Boredom,Engagement,Confusion,Frustration \n5000671001.avi,0,2,0,0\n")
    with pytest.raises(BenchmarkError, match=r"5000671001\.avi: decoding video needs PyAV"):
        open_benchmark(f"daisee={root}")
    (labels / "TestLabels.csv").write_text("ClipID,Boredom,Confusion\n5000441001.avi,0,1\n")
    with pytest.raises(BenchmarkError, match=r"TestLabels\.csv:1: missing column 'Engagement'"):
        open_benchmark(f"daisee={root}")
    (labels / "TestLabels.csv").write_text("ClipID,Boredom,Engagement,Confusion,Frustration \n5000441001.avi,0,4,0,1\n")
    with pytest.raises(BenchmarkError, match=r"TestLabels\.csv:2: unknown label code '4' in column 'Engagement'"):
        open_benchmark(f"daisee={root}")


def test_dfew_folds_frames_and_torch_clips(tmp_path):
    pytest.importorskip("torch")
    from shared_models.transforms import eval_transform

    root = tmp_path / "DFEW"
    for clip in ("00001", "00002", "00003"):
        write_frames(root / "Clip" / "jpg_256" / clip, 6)
    split = root / "EmoLabel_DataSplit" / "test(single-labeled)"
    split.mkdir(parents=True)
    (split / "set_1.csv").write_text("video_name,label\n1,1\n3,7\n4,2\n")
    (split / "set_2.csv").write_text("video_name,label\n2,0\n")
    bench = open_benchmark(f"dfew={root}", num_frames=3)
    assert bench.split == "test1" and len(bench) == 2 and bench.skipped == 1
    assert bench.targets.tolist() == [FER7.index("happy"), FER7.index("fear")]
    frames, _ = bench[0]
    assert frames.shape == (3, 12, 16, 3) and [int(f[0, 0, 0]) for f in frames] == [0, 20, 50]  # evenly spaced
    tensor, _ = bench.as_torch(eval_transform(24))[0]
    assert tuple(tensor.shape) == (3, 3, 24, 24)
    with pytest.raises(BenchmarkError, match=r"set_2\.csv:2: unknown label code '0' in column 'label'"):
        open_benchmark(f"dfew:test2={root}")
    with pytest.raises(BenchmarkError, match="unknown split 'test9'"):
        open_benchmark(f"dfew={root}", split="test9")


def test_afew_and_clipfolder_label_csv(tmp_path):
    afew = tmp_path / "AFEW"
    write_frames(afew / "Val_AFEW" / "Happy" / "000123456", 2)
    write_frames(afew / "Val_AFEW" / "Sad" / "000654321", 2)
    bench = open_benchmark(f"afew={afew}", num_frames=2)
    assert sorted(bench.targets.tolist()) == [FER7.index("happy"), FER7.index("sad")]
    write_frames(afew / "Val_AFEW" / "Bored" / "000000001", 1)
    with pytest.raises(BenchmarkError, match="'Bored' is not an AFEW class folder"):
        open_benchmark(f"afew={afew}")
    clips = tmp_path / "clips"
    write_frames(clips / "a", 3)
    write_frames(clips / "b", 3)
    (clips / "labels.csv").write_text("clip,label\na,anger\nb,Neutral\nmissing,happy\n")
    generic = open_benchmark(f"clipfolder={clips}", num_frames=0)
    assert generic.targets.tolist() == [FER7.index("angry"), FER7.index("neutral")] and generic.skipped == 1
    assert generic[0][0].shape[0] == 3  # num_frames=0 keeps every frame


# -- registry -----------------------------------------------------------------------------------
def test_registry_synthetic_names_and_spec_errors(tmp_path):
    public = tmp_path / "public"
    public.mkdir()
    write_fer2013(public / "fer2013.csv", [fer_row(0, "Training", 3), fer_row(3, "PublicTest", 1),
                                           fer_row(4, "PrivateTest", 2)])
    write_rafdb(public / "rafdb", [("train_00001.jpg", 1), ("test_0001.jpg", 4), ("test_0002.jpg", 5)])
    fer = open_benchmark("synthetic-fer2013", data_root=tmp_path)   # the test rows: Training is for pre-training
    assert fer.name == "synthetic-fer2013" and fer.split == "val+test" and len(fer) == 2
    assert len(open_benchmark("synthetic-fer2013:train", data_root=tmp_path)) == 1
    raf = open_benchmark("synthetic-rafdb", data_root=tmp_path)
    assert raf.name == "synthetic-rafdb" and raf.targets.tolist() == [FER7.index("happy"), FER7.index("sad")]
    with pytest.raises(BenchmarkError, match="synthetic-rafdb not found"):
        open_benchmark("synthetic-rafdb", data_root=tmp_path / "nowhere")
    with pytest.raises(BenchmarkError, match="unknown benchmark 'mnist'"):
        open_benchmark("mnist=/x")
    with pytest.raises(BenchmarkError, match="needs a path: rafdb=PATH"):
        open_benchmark("rafdb")
    with pytest.raises(BenchmarkError, match="split given twice"):
        open_benchmark(f"fer2013:val={public / 'fer2013.csv'}", split="test")
