"""The synthetic classroom: layout contract, determinism, skew, disjointness, formats, concurrency."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared_models.labels import FER7
from simulations import faces, synth

TINY = synth.SynthParams(schools=3, students_per_school=3, frames_per_student=6, public_students=4, public_frames=6, image_size=32,
                         seed=11, clips_per_student=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.ensure_dataset(tmp_path_factory.mktemp("synth") / "root", TINY)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---- layout contract -------------------------------------------------------------------------------


def test_manifest_lists_schools_params_counts(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["schools"] == ["school-00", "school-01", "school-02"]
    assert manifest["seed"] == TINY.seed
    assert manifest["params"] == {"schools": 3, "students_per_school": 3, "frames_per_student": 6,
                                  "public_students": 4, "public_frames": 6, "image_size": 32, "seed": 11,
                                  "clips_per_student": 1, "public_train_students": 0, "public_train_frames": 8,
                                  "heldout_students": 0, "school_size_spread": 30}
    assert manifest["label_set"] == "fer7"
    assert manifest["version"] == synth.GENERATOR_VERSION
    for sid in manifest["schools"]:
        meta = json.loads((built / "schools" / sid / "school.json").read_text())
        assert manifest["counts"][sid]["frames"] == meta["num_frames"]
    assert manifest["counts"]["public"]["images"] == 4 * 6


def test_school_files_and_headers(built: Path) -> None:
    for i in range(TINY.schools):
        sdir = built / "schools" / f"school-{i:02d}"
        meta = json.loads((sdir / "school.json").read_text())
        for key in ("school_id", "camera_profile", "num_students", "num_frames", "label_counts"):
            assert key in meta
        assert meta["school_id"] == sdir.name
        lines = (sdir / "labels.csv").read_text().split("\n")
        assert lines[0] == "path,label,student_id,clip_id,frame,engagement"   # TINY has clips
        every_row = _rows(sdir / "labels.csv")
        rows = [r for r in every_row if not r["clip_id"]]   # the stills come first, then the clip frames
        assert every_row[:len(rows)] == rows
        assert len(rows) == meta["num_frames"] == meta["num_students"] * TINY.frames_per_student
        assert sum(meta["label_counts"].values()) == len(rows)
        students = {r["student_id"] for r in rows}
        assert len(students) == meta["num_students"]
        for r in rows:
            assert r["label"] in FER7
            assert r["clip_id"] == "" and r["frame"] == "-1"
            assert r["path"].startswith("images/") and r["path"].endswith(".png")
            assert r["student_id"].startswith(f"s{i:02d}-st")
            assert r["path"] == f"images/{r['student_id']}-f{r['path'][-7:-4]}.png"
        img = Image.open(sdir / rows[0]["path"])
        assert img.size == (32, 32) and img.mode == "RGB"
        marks = np.load(sdir / "landmarks.npy")
        assert marks.dtype == np.float32 and marks.shape == (len(every_row), 68, 2)
        assert np.isfinite(marks).all()
        # inner-face landmarks (brows, nose, eyes, lips) fall inside the tight face crop; the jaw
        # contour may leave it a little, as in real aligned crops (a wide-open jaw pushes the chin below it)
        inner = marks[:, 17:]
        assert ((inner >= 0) & (inner < 32)).all(axis=2).mean() > 0.97
        assert ((marks > -8) & (marks < 44)).all()


def test_clips_have_sixteen_frames(built: Path) -> None:
    sdir = built / "schools" / "school-01"
    assert (sdir / "clips.csv").read_text().split("\n")[0] == "clip_id,student_id,label,folder,engagement"
    clips = _rows(sdir / "clips.csv")
    meta = json.loads((sdir / "school.json").read_text())
    assert len(clips) == meta["num_students"] * TINY.clips_per_student
    for clip in clips:
        assert clip["label"] in FER7
        folder = sdir / clip["folder"]
        assert clip["folder"] == f"clips/{clip['clip_id']}"
        names = sorted(p.name for p in folder.iterdir())
        assert names == [f"frame_{k:02d}.png" for k in range(16)]
        first = np.asarray(Image.open(folder / "frame_00.png"), np.int16)
        last = np.asarray(Image.open(folder / "frame_15.png"), np.int16)
        assert first.shape == (32, 32, 3) and last.shape == (32, 32, 3)


def test_clip_ramps_from_rest_to_apex() -> None:
    style = synth.student(TINY, 0, 0).style
    frames = synth._clip_frames("surprise", style, synth.school_profile(TINY, 0).camera, np.random.default_rng(3))
    jaw = [f.aus[faces.AU_INDEX["AU26"]] - style.resting[faces.AU_INDEX["AU26"]] for f in frames]
    assert len(frames) == synth.CLIP_LENGTH
    assert abs(jaw[0]) < 1e-6                     # onset: the resting face
    assert all(b >= a - 1e-6 for a, b in zip(jaw, jaw[1:]))   # monotone ramp
    assert jaw[-1] == pytest.approx(max(jaw))


# ---- determinism -------------------------------------------------------------------------------------


def test_same_params_same_bytes(built: Path, tmp_path: Path) -> None:
    other = synth.ensure_school(tmp_path / "again", TINY, 1)
    ref = built / "schools" / "school-01"
    assert (other / "labels.csv").read_bytes() == (ref / "labels.csv").read_bytes()
    assert (other / "clips.csv").read_bytes() == (ref / "clips.csv").read_bytes()
    assert np.array_equal(np.load(other / "landmarks.npy"), np.load(ref / "landmarks.npy"))
    for row in _rows(ref / "labels.csv")[:5]:
        assert (other / row["path"]).read_bytes() == (ref / row["path"]).read_bytes()


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file() and ".locks" not in f.parts}


def test_parallel_build_writes_the_same_bytes_as_one_process(tmp_path: Path) -> None:
    seen: list[str] = []
    parallel = synth.ensure_dataset(tmp_path / "par", TINY, workers=2, progress=lambda done, total, what: seen.append(what))
    serial = synth.ensure_dataset(tmp_path / "one", TINY, workers=1)
    assert _tree_bytes(parallel) == _tree_bytes(serial)
    assert set(seen) == {"school-00", "school-01", "school-02", "public", "clipbench"}   # TINY has clips


def test_public_training_split_rendered_in_processes_has_the_same_bytes_and_rows(tmp_path: Path) -> None:
    """The public training split is rendered by identity ranges in several processes (it is the longest
    part of the default dataset): the same files, FER2013 rows in the same order, the same metadata."""
    params = synth.SynthParams(**{**TINY.__dict__, "public_train_students": 120, "public_train_frames": 1,
                                  "clips_per_student": 0})
    progress: list[tuple[int, int]] = []
    split = synth.ensure_public(tmp_path / "three", params, workers=3,
                                progress=lambda done, total, what: progress.append((done, total)))
    single = synth.ensure_public(tmp_path / "one", params, workers=1)
    assert _tree_bytes(split) == _tree_bytes(single)
    rows = (split / "fer2013.csv").read_text().splitlines()
    assert sum(row.endswith(",Training") for row in rows) == 120 and rows[1].endswith(",Training")
    assert progress[-1][0] == progress[-1][1] == synth.public_image_count(params)


def test_schools_built_in_the_background_complete_the_dataset_the_public_part_started(tmp_path: Path) -> None:
    """`fedfer simulate` builds the public and in-domain parts first (pre-training reads them), then the schools
    in a child process while it pre-trains: the result is the dataset one build makes, byte for byte."""
    from shared_models.config import load_config

    tiny = ["federation.schools=2", "data.students_per_school=4", "data.frames_per_student=2", "data.public_students=2",
            "data.public_frames=7", "data.public_train_students=2", "data.heldout_students=1", "data.image_size=32"]
    cfg = load_config(overrides=tiny + [f"data.root={tmp_path / 'two-steps'}"])
    root = synth.ensure_for_config(cfg, echo=lambda line: None, on_demand=True)
    assert not (root / "schools" / "school-00" / "school.json").exists()
    child = synth.start_building_schools(cfg)
    child.join(timeout=120)
    assert child.exitcode == 0
    whole = synth.ensure_dataset(tmp_path / "one-build", synth.params_from_config(cfg), workers=1)
    assert _tree_bytes(root) == _tree_bytes(whole)
    assert synth.ensure_for_config(cfg, echo=lambda line: pytest.fail(f"rebuilt: {line}")) == root


def test_seed_changes_the_data(built: Path, tmp_path: Path) -> None:
    other = synth.ensure_school(tmp_path / "seed", synth.SynthParams(**{**TINY.__dict__, "seed": 12}), 0)
    assert (other / "labels.csv").read_bytes() != (built / "schools" / "school-00" / "labels.csv").read_bytes()


def test_school_does_not_depend_on_school_count(built: Path, tmp_path: Path) -> None:
    more = synth.SynthParams(**{**TINY.__dict__, "schools": 5})
    alone = synth.ensure_school(tmp_path / "more", more, 2)
    assert (alone / "labels.csv").read_bytes() == (built / "schools" / "school-02" / "labels.csv").read_bytes()


def test_ensure_dataset_reuses_and_rebuilds(built: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    calls: list[tuple[int, int, str]] = []
    synth.ensure_dataset(root, TINY, progress=lambda d, t, w: calls.append((d, t, w)))
    assert calls and calls[-1][0] == calls[-1][1]                       # progress reaches the total
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))          # and never goes back
    stamp = (root / "schools" / "school-00" / "school.json").stat().st_mtime_ns
    calls.clear()
    synth.ensure_dataset(root, TINY, progress=lambda d, t, w: calls.append((d, t, w)))
    assert calls == []                                                  # nothing to do
    assert (root / "schools" / "school-00" / "school.json").stat().st_mtime_ns == stamp
    fewer = synth.SynthParams(**{**TINY.__dict__, "schools": 2})
    synth.ensure_dataset(root, fewer)
    assert not (root / "schools" / "school-02").exists()                 # stale school removed
    assert (root / "schools" / "school-00" / "school.json").stat().st_mtime_ns == stamp   # kept
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["params"]["schools"] == 2 and manifest["schools"] == ["school-00", "school-01"]
    leftovers = [p.name for p in (root / "schools").iterdir() if p.name.startswith((".tmp", ".trash"))]
    assert leftovers == []


# ---- non-IID and disjointness ---------------------------------------------------------------------------


def test_label_skew_differs_between_schools() -> None:
    params = synth.SynthParams()
    probs = np.array([synth.school_profile(params, i).label_probs for i in range(6)])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    spread = np.abs(probs[:, None, :] - probs[None, :, :]).sum(axis=2)   # L1 distance between schools
    off_diagonal = spread[~np.eye(6, dtype=bool)]
    assert off_diagonal.min() > 0.1
    cameras = {synth.school_profile(params, i).camera["name"] for i in range(6)}
    assert len(cameras) == 6
    sizes = {synth.school_profile(params, i).num_students for i in range(6)}
    assert len(sizes) > 1


def test_written_label_counts_differ_between_schools(built: Path) -> None:
    counts = [json.loads((built / "schools" / f"school-{i:02d}" / "school.json").read_text())["label_counts"]
              for i in range(TINY.schools)]
    assert len({tuple(c[label] for label in FER7) for c in counts}) == TINY.schools


def test_public_identities_disjoint_from_schools(built: Path) -> None:
    public = json.loads((built / "public" / "public.json").read_text())
    public_ids = {p["identity_id"] for p in public["identities"]}
    school_ids = set()
    school_faces = set()
    for i in range(TINY.schools):
        rows = _rows(built / "schools" / f"school-{i:02d}" / "labels.csv")
        school_ids |= {r["student_id"] for r in rows}
        n = json.loads((built / "schools" / f"school-{i:02d}" / "school.json").read_text())["num_students"]
        school_faces |= {synth.student(TINY, i, j).identity for j in range(n)}
    assert len(public_ids) == TINY.public_students and not public_ids & school_ids
    public_faces = {synth.public_person(TINY, j).identity for j in range(TINY.public_students)}
    assert not public_faces & school_faces
    school_cams = {synth.school_profile(TINY, i).camera["name"] for i in range(TINY.schools)}
    assert not {p["camera"] for p in public["identities"]} & school_cams


# ---- public formats ------------------------------------------------------------------------------------


def test_fer2013_csv_rows(built: Path) -> None:
    text = (built / "public" / "fer2013.csv").read_text()
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "emotion,pixels,Usage"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == TINY.public_students * TINY.public_frames
    for emotion, pixels, usage in rows:
        assert 0 <= int(emotion) <= 6
        values = pixels.split(" ")
        assert len(values) == 2304 and all(0 <= int(v) <= 255 for v in values)
        assert usage in ("PublicTest", "PrivateTest")
    usages = [r[2] for r in rows]
    per_identity = TINY.public_frames
    assert usages[:2 * per_identity] == ["PublicTest"] * 2 * per_identity     # half the identities
    assert usages[2 * per_identity:] == ["PrivateTest"] * 2 * per_identity
    counts = np.bincount([int(r[0]) for r in rows], minlength=7)
    assert counts.max() - counts.min() <= 1                                      # balanced classes


def test_rafdb_layout_codes_and_same_faces(built: Path) -> None:
    raf = built / "public" / "rafdb"
    lines = (raf / "EmoLabel" / "list_patition_label.txt").read_text().rstrip("\n").split("\n")
    fer = [line.split(",") for line in (built / "public" / "fer2013.csv").read_text().rstrip("\n").split("\n")[1:]]
    assert len(lines) == len(fer)
    code_of = {"angry": 6, "disgust": 3, "fear": 2, "happy": 4, "sad": 5, "surprise": 1, "neutral": 7}
    for k, (line, (emotion, pixels, _)) in enumerate(zip(lines, fer)):
        name, code = line.split(" ")
        assert name == f"test_{k + 1:04d}.jpg"
        assert int(code) == code_of[FER7[int(emotion)]]
        if k < 4:
            img = Image.open(raf / "Image" / "aligned" / f"test_{k + 1:04d}_aligned.jpg")
            assert img.format == "JPEG" and img.size == (100, 100) and img.mode == "RGB"
            small = np.asarray(img.convert("L").resize((48, 48), Image.BILINEAR), np.float32)
            gray = np.asarray(pixels.split(" "), np.float32).reshape(48, 48)
            assert np.abs(small - gray).mean() < 6.0       # the same face (up to JPEG loss)


def test_rafdb_code_table_matches_reference() -> None:
    assert synth.RAFDB_CODES == {"surprise": 1, "fear": 2, "disgust": 3, "happy": 4, "sad": 5, "angry": 6,
                                 "neutral": 7}


# ---- params and config ----------------------------------------------------------------------------------


def test_params_from_config_and_errors() -> None:
    cfg = {"federation.schools": 4, "data.students_per_school": 10, "data.frames_per_student": 5,
           "data.public_students": 8, "data.image_size": 48, "data.seed": 3, "data.root": ""}
    assert synth.params_from_config(cfg) == synth.SynthParams(schools=4, students_per_school=10, frames_per_student=5,
                                                              public_students=8, image_size=48, seed=3)
    with pytest.raises(ValueError, match="data.image_size"):
        synth.params_from_config({**cfg, "data.image_size": "big"})
    with pytest.raises(ValueError, match="federation.schools"):
        synth.params_from_config({**cfg, "federation.schools": 0})
    with pytest.raises(ValueError, match="frames_per_student"):
        synth.SynthParams(frames_per_student=0)


def test_default_root_depends_on_params(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, b = synth.default_root(TINY), synth.default_root(synth.SynthParams(**{**TINY.__dict__, "seed": 99}))
    assert a.parent == tmp_path / "fedfer" / "synth" and a != b
    assert synth.default_root(TINY) == a


def test_png_encoder_round_trips() -> None:
    rng = np.random.default_rng(0)
    for shape in ((7, 5, 3), (16, 9)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        decoded = np.asarray(Image.open(io.BytesIO(faces.encode_png(img))))
        assert np.array_equal(decoded, img)


# ---- concurrency ------------------------------------------------------------------------------------------


def _build_school(root: str) -> str:
    return str(synth.ensure_school(Path(root), TINY, 0))


def test_concurrent_ensure_school(built: Path, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        dirs = pool.map(_build_school, [str(root)] * 3)
    assert len(set(dirs)) == 1
    sdir = Path(dirs[0])
    ref = built / "schools" / "school-00"
    assert (sdir / "labels.csv").read_bytes() == (ref / "labels.csv").read_bytes()
    rows = _rows(sdir / "labels.csv")
    stills = [r for r in rows if not r["clip_id"]]
    assert sorted(p.name for p in (sdir / "images").iterdir()) == sorted(Path(r["path"]).name for r in stills)
    for row in rows:
        assert (sdir / row["path"]).read_bytes() == (ref / row["path"]).read_bytes()
    leftovers = [p.name for p in (root / "schools").iterdir() if p.name != "school-00"]
    assert leftovers == []


# ---- two domains: public training split, in-domain held-out students ------------------------------------

SPLIT = synth.SynthParams(schools=2, students_per_school=3, frames_per_student=3, public_students=4, public_frames=7,
                          image_size=32, seed=5, clips_per_student=0, public_train_students=5, public_train_frames=4,
                          heldout_students=2)


@pytest.fixture(scope="module")
def split_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.ensure_dataset(tmp_path_factory.mktemp("split") / "root", SPLIT, workers=1)


def test_public_train_and_test_splits_are_disjoint(split_built: Path) -> None:
    from shared_models.datasets import open_benchmark

    public = json.loads((split_built / "public" / "public.json").read_text())
    test_ids = {p["identity_id"] for p in public["identities"]}
    train_ids = {p["identity_id"] for p in public["train"]["identities"]}
    assert len(test_ids) == SPLIT.public_students and len(train_ids) == SPLIT.public_train_students
    assert not test_ids & train_ids
    test_faces = {synth.public_person(SPLIT, j).identity for j in range(SPLIT.public_students)}
    train_faces = {synth.public_train_person(SPLIT, j).identity for j in range(SPLIT.public_train_students)}
    assert not test_faces & train_faces
    # FER2013: Training rows first, then the test usages; no pixel row is in both splits
    rows = [line.split(",") for line in (split_built / "public" / "fer2013.csv").read_text().split("\n")[1:] if line]
    usages = [usage for _, _, usage in rows]
    n_train = SPLIT.public_train_students * SPLIT.public_train_frames
    assert usages[:n_train] == ["Training"] * n_train
    assert set(usages[n_train:]) == {"PublicTest", "PrivateTest"}
    assert not {px for _, px, u in rows if u == "Training"} & {px for _, px, u in rows if u != "Training"}
    # RAF-DB names carry the split; the readers' splits see exactly these rows
    names = [line.split(" ")[0] for line in
             (split_built / "public" / "rafdb" / "EmoLabel" / "list_patition_label.txt").read_text().split("\n") if line]
    assert sum(n.startswith("train_") for n in names) == n_train
    assert sum(n.startswith("test_") for n in names) == SPLIT.public_students * SPLIT.public_frames
    assert len(open_benchmark("synthetic-fer2013:train", data_root=split_built)) == n_train
    assert len(open_benchmark("synthetic-rafdb:train", data_root=split_built)) == n_train
    # the evaluation node's default reads the test rows only
    assert len(open_benchmark("synthetic-fer2013", data_root=split_built)) == SPLIT.public_students * SPLIT.public_frames
    assert len(open_benchmark("synthetic-rafdb", data_root=split_built)) == SPLIT.public_students * SPLIT.public_frames


def test_heldout_students_never_in_a_school_folder(split_built: Path) -> None:
    from shared_models.datasets import open_benchmark

    held = _rows(split_built / "indomain" / "labels.csv")
    assert len(held) == SPLIT.schools * SPLIT.heldout_students * SPLIT.frames_per_student
    held_ids = {r["student_id"] for r in held}
    assert {r["school_id"] for r in held} == {synth.school_id(i) for i in range(SPLIT.schools)}
    for i in range(SPLIT.schools):
        school = split_built / "schools" / synth.school_id(i)
        trained = {r["student_id"] for r in _rows(school / "labels.csv")}
        assert trained and not trained & held_ids
        assert not (school / "indomain").exists() and not any("-ho" in p.name for p in school.rglob("*"))
        n = json.loads((school / "school.json").read_text())["num_students"]
        faces = {synth.student(SPLIT, i, j).identity for j in range(n)}
        assert not faces & {synth.heldout_student(SPLIT, i, j).identity for j in range(SPLIT.heldout_students)}
        # the same classroom: the held-out students sit in their school's room, before its camera
        assert synth.heldout_student(SPLIT, i, 0).camera == synth.school_profile(SPLIT, i).camera
    bench = open_benchmark("synthetic-indomain", data_root=split_built)
    assert len(bench) == len(held)
    assert sorted(bench.targets.tolist()) == sorted(FER7.index(r["label"]) for r in held)


def test_adding_splits_changes_no_school_byte(split_built: Path, tmp_path: Path) -> None:
    plain = dataclasses.replace(SPLIT, public_train_students=0, heldout_students=0)
    root = synth.ensure_dataset(tmp_path / "plain", plain, workers=1)
    for i in range(SPLIT.schools):
        sid = synth.school_id(i)
        assert (root / "schools" / sid / "labels.csv").read_bytes() == (split_built / "schools" / sid / "labels.csv").read_bytes()
        first = sorted((root / "schools" / sid / "images").iterdir())[0].name
        assert (root / "schools" / sid / "images" / first).read_bytes() == \
            (split_built / "schools" / sid / "images" / first).read_bytes()
    assert not (root / "indomain").exists()
