"""Issue 17: the classroom pipeline (detection, alignment, tracks, ingest), the seed-001 indicators, the
lesson report's privacy switches and bad input. The synthetic lessons are small (a few students, tens
of frames) so the module stays within its time budget."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from client.classroom import indicators as ind
from shared_models.labels import FER7

A, S_, F_, H, N, D, SU = (FER7.index(c) for c in ("angry", "sad", "fear", "happy", "neutral", "disgust", "surprise"))
NO = ind.NO_LABEL


# ---------------------------------------------------------------------------- indicators (seed 001)
def test_focus_is_inattentive_only_below_half_of_a_ten_second_window():
    assert ind.window_size(1.0) == 10 and ind.window_size(2.0) == 20
    four, five, six = ([True] * n + [False] * (10 - n) for n in (4, 5, 6))
    assert ind.inattentive(np.array(four + five + six), 10).tolist() == [True, False, False]
    # a short last window is judged on its own samples: 1 of 3 is less than half
    assert ind.inattentive(np.array([True] * 10 + [True, False, False]), 10).tolist() == [False, True]


def test_difficulty_is_thirty_distress_detections_in_a_row():
    assert ind.difficulty_triggers(np.array([A] * 29 + [N] + [A] * 29)) == []
    assert ind.difficulty_triggers(np.array([A] * 30)) == [29]
    mixed = np.array([A, S_, F_] * 10)                       # anger and distress classes mix in one run
    assert ind.difficulty_triggers(mixed) == [29]
    gaps = np.array([A] * 15 + [NO] * 7 + [S_] * 15)         # samples without a face neither count nor break
    assert ind.difficulty_triggers(gaps) == [36]
    assert ind.difficulty_triggers(np.array([A] * 60)) == [29]   # one trigger per run
    assert ind.difficulty_triggers(np.array([A] * 30 + [H] + [A] * 30)) == [29, 60]
    assert ind.difficulty_triggers(np.array([D] * 40)) == []     # disgust is not distress


def test_engagement_is_the_share_of_happy_or_surprised_detections():
    assert ind.engagement(np.array([H, SU, N, NO, NO])) == pytest.approx(2 / 3)
    assert math.isnan(ind.engagement(np.array([NO, NO])))


def test_involvement_is_passive_above_half_the_time_bowed_in_the_seat():
    present = np.array([True] * 10 + [False] * 5)
    assert ind.passive(np.array([True] * 6 + [False] * 9), present)
    assert not ind.passive(np.array([True] * 5 + [False] * 10), present)           # exactly half: not passive
    assert ind.bowed_share(np.array([True] * 3 + [False] * 12), present) == pytest.approx(0.3)
    assert not ind.passive(np.zeros(15, bool), np.zeros(15, bool))                  # never there: not passive


def _face_at(x: float, y: float, width: int = 50):
    from client.classroom.faces import Face

    return Face((int(round(x)), int(round(y)), width, width), (x + 15, y + 20), (x + 35, y + 20), False, 0.0)


def test_a_face_that_drops_or_slides_in_its_seat_is_a_bowed_or_turned_head():
    from client.classroom import posture
    from client.classroom.analyse import SampleResult

    seat = posture.SeatPosture()
    # fewer than MIN_REFERENCE earlier faces: no reference yet, a face is taken as it is
    assert [seat.judge(_face_at(100 + (k % 2), 100)) for k in range(posture.MIN_REFERENCE)] == ["face"] * 5
    width = 50
    assert seat.judge(_face_at(100, 100 + 0.8 * posture.BOW_DROP * width)) == "face"      # a small nod
    assert seat.judge(_face_at(100, 100 + 1.3 * posture.BOW_DROP * width)) == "down"
    assert seat.judge(_face_at(100 - 1.3 * posture.TURN_SHIFT * width, 100)) == "turned"
    assert seat.judge(_face_at(100 + 0.8 * posture.TURN_SHIFT * width, 100)) == "face"
    # a passive student, bowed most of the time: the upright reference is a low quantile, not the median
    passive = posture.SeatPosture()
    heads = [100.0] * 4 + [112.0] * 16           # 20 % upright
    assert [passive.judge(_face_at(100, y)) for y in heads][-1] == "down"
    assert passive.judge(_face_at(100, 100)) == "face"
    # the filter moves bowed/turned faces of seats to the seat's state; faces without a seat stay
    judge = posture.PostureFilter()
    for step in range(6):
        judge(SampleResult(step, step, "f", faces=[("a", _face_at(100, 100), None), (None, _face_at(300, 100), None)]))
    sample = judge(SampleResult(6, 6, "f", faces=[("a", _face_at(100, 112), None), (None, _face_at(300, 112), None)]))
    assert [u for u, _, _ in sample.faces] == [None] and sample.states == [("a", "down")]


def test_the_bench_truth_is_the_seed_definitions_on_the_drawn_states():
    from simulations.bench.classroom import agreement_of_states

    # student a: 25 s facing the camera and angry, 12 s bowed (still angry), 3 s facing and happy; the
    # pipeline keeps 7 bowed samples as faces. Student b is never there (no window, no trigger).
    steps = 40
    pitch = np.zeros((2, steps))
    pitch[0, 25:37] = 0.7
    label = np.full((2, steps), A)
    label[0, 37:] = H
    truth = {"students": np.array(["a", "b"]), "present": np.array([[True] * steps, [False] * steps]),
             "yaw": np.zeros((2, steps)), "pitch": pitch, "label": label}
    states = {"a": ["face"] * 32 + ["down"] * 5 + ["face"] * 3, "b": ["absent"] * steps}
    out = agreement_of_states(truth, states, steps, 1.0)
    assert out["student_windows"] == 4
    # 30-39: 3 of 10 faces turned to the camera (inattentive) vs 5 kept faces (exactly half: not)
    assert out["focus_agreement"] == 0.75
    # 30-39: 7 of 10 bowed (passive) vs 5 down (exactly half: not)
    assert out["involvement_agreement"] == 0.75 and out["involvement_student_agreement"] == 1.0
    # 25 angry faces in truth (no trigger); 25 + 7 kept bowed ones complete a run of 30
    assert out["students_with_difficulty_truth"] == 0 and out["difficulty_student_agreement"] == 0.5
    assert out["confusion"]["difficulty_students"]["truth not triggered / pipeline triggered"] == 1
    assert out["engagement_mean_abs_gap"] == pytest.approx((1.0 - 3 / 5) / 4)     # 30-39: 3 of 3 vs 3 of 5
    assert out["sample_states_truth_x_pipeline"] == {"visible": {"face": 28}, "bowed": {"face": 7, "down": 5},
                                                     "absent": {"absent": 40}}


# ---------------------------------------------------------------------------- a small synthetic lesson
@pytest.fixture(scope="module")
def lesson(tmp_path_factory) -> Path:
    from simulations import classroom_scenes as scenes

    room = scenes.make_room(5, 8)
    script = scenes.script_lesson(room, 45, 1.0, seed=1, hard_topic=(1.0, 44.0), struggling_share=0.5, passive_share=0.25)
    return scenes.write_lesson(tmp_path_factory.mktemp("lesson") / "l", room, script)


@pytest.fixture(scope="module")
def ingested(lesson: Path) -> Path:
    from client.classroom.ingest import ingest

    ingest(lesson / "frames", lesson / "ingested", seat_map=lesson / "seat_map.json", labels=lesson / "labels.csv",
           empty_frame=lesson / "empty_room.png", size=48, echo=lambda line: None)
    return lesson / "ingested"


def test_ingest_writes_a_trainable_school_folder_keyed_by_the_seat_map(lesson: Path, ingested: Path):
    from shared_models.datasets.school_folder import load_school

    seats = [s["student_id"] for s in json.loads((lesson / "seat_map.json").read_text())["seats"]]
    meta = json.loads((ingested / "lesson.json").read_text())
    assert meta["samples"] == 45 and meta["unreadable"] == 0 and meta["students"] == seats
    school = load_school(ingested)
    assert len(school) == meta["labelled_faces"] > 45
    assert set(school.student_ids) <= set(seats) and school.images.shape[1:3] == (48, 48)
    rows = list(csv.DictReader((ingested / "observations.csv").read_text().splitlines()))
    assert len(rows) == 45 * len(seats)                       # one row per sample and seat
    states = {r["state"] for r in rows}
    assert "face" in states and states <= {"face", "turned", "down", "absent"}
    truth = np.load(lesson / "truth" / "script.npz")
    absent_truth = {(t, sid) for i, sid in enumerate(truth["students"].tolist()) for t in range(45)
                    if not truth["present"][i, t]}
    absent_seen = {(int(r["step"]), r["student_id"]) for r in rows if r["state"] == "absent"}
    assert absent_seen == absent_truth                       # the empty-room frame tells who is not there


def test_detection_alignment_and_tracking_against_the_ground_truth(lesson: Path):
    import cv2

    from client.classroom.faces import FaceDetector, align_crop
    from client.classroom.tracks import assign_to_seats, load_seat_map
    from simulations.bench.classroom import match
    from simulations.classroom_scenes import FaceTruth

    seats = load_seat_map(lesson / "seat_map.json")
    detector = FaceDetector()
    hits, right, errors = [], [], []
    for line in (lesson / "truth" / "faces.jsonl").read_text().splitlines()[::4]:
        record = json.loads(line)
        gray = cv2.imread(str(lesson / "frames" / record["frame"]), cv2.IMREAD_GRAYSCALE)
        found = detector.detect_in_seats(gray, [s.box for s in seats])
        owner = {id(f): sid for sid, f in assign_to_seats(found, seats)[0].items()}
        truths = [FaceTruth(**{**t, "box": tuple(t["box"]), "left_eye": tuple(t["left_eye"]),
                               "right_eye": tuple(t["right_eye"])}) for t in record["faces"]]
        for truth, k in zip(truths, match(found, truths)[0]):
            frontal = abs(truth.yaw) < 0.3 and truth.pitch < 0.2
            if frontal:
                hits.append(k is not None)
            if k is not None:
                right.append(owner.get(id(found[k])) == truth.student_id)
                if frontal:
                    errors.append(abs(found[k].angle - truth.angle))
                crop = align_crop(gray, found[k], 40)
                assert crop.shape == (40, 40) and crop.dtype == np.uint8
    assert np.mean(hits) >= 0.6 and np.mean(right) >= 0.98
    assert errors and np.median(errors) <= 3.0


def test_the_indicators_agree_with_what_the_generator_drew(lesson: Path, ingested: Path):
    from simulations.bench.classroom import indicator_agreement

    agreement = indicator_agreement(lesson, ingested)
    assert agreement["student_windows"] >= 20
    assert agreement["focus_agreement"] >= 0.6
    assert agreement["involvement_agreement"] >= 0.6
    assert agreement["students_with_difficulty_truth"] >= 1
    assert agreement["difficulty_student_agreement"] >= 0.75
    assert agreement["engagement_mean_abs_gap"] <= 0.15


def _stand_in_classifier(crops: np.ndarray) -> np.ndarray:
    """A deterministic function of the crop's pixels: equal crops, equal labels."""
    return crops[:, ::5, ::3].astype(np.int64).sum(axis=(1, 2)) % len(FER7)


def test_frames_straight_to_the_report_match_ingest_whatever_the_number_of_workers(lesson: Path, tmp_path: Path,
                                                                                  monkeypatch):
    from client.classroom import analyse
    from client.classroom.ingest import ingest
    from client.classroom.lesson import lesson_from_source
    from client.classroom.report import classify_lesson, load_lesson
    from client.classroom.sources import _read_image
    from client.classroom.tracks import load_seat_map

    monkeypatch.setattr(analyse, "CHUNK", 16)          # 45 samples: three chunks, each starting afresh
    ingest(lesson / "frames", tmp_path / "i", seat_map=lesson / "seat_map.json", empty_frame=lesson / "empty_room.png",
           size=48, echo=lambda line: None, workers=1)
    folder = load_lesson(tmp_path / "i")
    from_disk = classify_lesson(folder, _stand_in_classifier)
    seats, empty = load_seat_map(lesson / "seat_map.json"), _read_image(lesson / "empty_room.png")
    # two worker processes, three chunks, crops never written: the same lesson as ingest wrote in one process
    memory, labels = lesson_from_source(lesson / "frames", seats=seats, empty=empty, size=48, workers=2,
                                        classify=_stand_in_classifier, warn=pytest.fail)
    assert memory.steps == folder.steps == 45 and sorted(memory.units) == sorted(folder.units)
    assert memory.states == folder.states and memory.faces_per_step.tolist() == folder.faces_per_step.tolist()
    assert all(labels[u].tolist() == from_disk[u].tolist() for u in folder.units)
    assert sum(s == "face" for states in folder.states.values() for s in states) > 45


# ---------------------------------------------------------------------------- the report and the policy
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    from shared_models.models import registry

    torch.manual_seed(0)
    model = registry.build("hafnet", num_classes=7, preset="dp")
    path = tmp_path_factory.mktemp("ckpt") / "round-0001.pt"
    torch.save({"round": 1, "model": {"name": "hafnet", "preset": "dp", "num_classes": 7},
                "state_dict": model.state_dict()}, path)
    return path


def _run(*argv: str) -> int:
    from fedfer.cli import main

    return main(list(argv))


def test_the_report_shows_class_figures_over_k_students_and_students_only_if_allowed(ingested, checkpoint, tmp_path,
                                                                                     capsys):
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r")) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## Students" not in text and "at least 5 students" in text
    assert (tmp_path / "r" / "plots" / "indicators.png").stat().st_size > 0
    rows = list(csv.DictReader((tmp_path / "r" / "timeline.csv").read_text().splitlines()))
    assert len(rows) == 5 and all(r["shown"] == "1" for r in rows)
    seats = json.loads((ingested / "lesson.json").read_text())["students"]

    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps({"report-min-students": len(seats) + 1}))
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s"),
                "--policy", str(strict)) == 0
    rows = list(csv.DictReader((tmp_path / "s" / "timeline.csv").read_text().splitlines()))
    assert all(r["shown"] == "0" and r["inattentive_share"] == "" and r["happy"] == "" for r in rows)

    open_policy = tmp_path / "open.json"
    open_policy.write_text(json.dumps({"report-min-students": 2, "per-student-figures": True}))
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"),
                "--policy", str(open_policy)) == 0
    text = (tmp_path / "o" / "report.md").read_text()
    assert "## Students" in text and sum(sid in text for sid in seats) >= len(seats) - 1


def test_a_state_dir_gives_the_report_the_schools_policy_and_the_report_says_which(ingested, checkpoint, tmp_path,
                                                                                     capsys):
    seats = json.loads((ingested / "lesson.json").read_text())["students"]
    state = tmp_path / "state"          # a deployed school's state dir: no policy.json until the school writes one
    state.mkdir()
    args = ("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--state-dir", str(state))
    assert _run(*args, "--out", str(tmp_path / "d")) == 0
    out = capsys.readouterr().out
    assert f"policy: fedfer's defaults ({state} has no policy.json): report-min-students 5" in out
    assert "Policy: fedfer's defaults" in (tmp_path / "d" / "report.md").read_text()

    (state / "policy.json").write_text(json.dumps({"report-min-students": len(seats) + 1}))
    assert _run(*args, "--out", str(tmp_path / "s")) == 0
    out = capsys.readouterr().out
    assert f"policy: {state / 'policy.json'}: report-min-students {len(seats) + 1}" in out
    assert "not stated there, so the defaults: per-student-figures" in out
    rows = list(csv.DictReader((tmp_path / "s" / "timeline.csv").read_text().splitlines()))
    assert rows and all(r["shown"] == "0" for r in rows)
    assert f"Policy: {state / 'policy.json'}" in (tmp_path / "s" / "report.md").read_text()

    assert _run("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--state-dir",
                str(tmp_path / "missing"), "--out", str(tmp_path / "m")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "state" in err[0] and not (tmp_path / "m").exists()
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--policy",
                str(tmp_path / "nope.json"), "--out", str(tmp_path / "m")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedfer: {tmp_path / 'nope.json'}: no such policy file (--policy names a school's policy.json or "
                   f"its state dir; --state-dir DIR uses the defaults when DIR has none)"]
    blocked = tmp_path / "blocked"                   # the record cannot be read or added to: one line, no report
    (blocked / "classroom-reports.jsonl").mkdir(parents=True)
    assert _run(*args[:-1], str(blocked), "--out", str(tmp_path / "m")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classroom-reports.jsonl: unreadable report record (" in err[0] and "internal" not in err[0]
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["mafnet", "r2plus1d_sta"])
def test_a_clip_models_checkpoint_or_a_run_without_one_yet_is_one_line(ingested, checkpoint, tmp_path, capsys, name):
    import torch

    from shared_models.models import registry

    clip = tmp_path / "round-0001.pt"
    torch.save({"round": 1, "model": {"name": name, "preset": "dp", "num_classes": 7},
                "state_dict": registry.build(name, num_classes=7, preset="dp").state_dict()}, clip)
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(clip), "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clip model" in err[0] and "hafnet" in err[0] and not (tmp_path / "r").exists()
    run = tmp_path / "runs" / "20261205-000000-abcd"     # started: config.yaml written, no round ended yet
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("federation.rounds: 2\n")
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(run), "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint yet" in err[0] and str(run) in err[0]


def test_two_reports_of_one_lesson_cannot_be_subtracted_to_one_childs_figures(lesson, ingested, checkpoint, tmp_path,
                                                                              capsys):
    """A child's consent is withdrawn: the lesson is reported again with the child's seat out of the seat map.
    Without a record the two timelines subtract to that child's own figures although k = 5 holds in both;
    with the school's state dir the second report withholds every window the first one showed."""
    seats = json.loads((lesson / "seat_map.json").read_text())["seats"]
    child = seats[0]["student_id"]
    (tmp_path / "without_child.json").write_text(json.dumps({"seats": seats[1:]}))

    def report(source: Path, out: str, *extra: str) -> list[dict]:
        args = ["classroom", "report", str(source), "--checkpoint", str(checkpoint), "--out", str(tmp_path / out)]
        if source.name == "frames":
            args += ["--empty-frame", str(lesson / "empty_room.png")]
        assert _run(*args, *extra) == 0
        return list(csv.DictReader((tmp_path / out / "timeline.csv").read_text().splitlines()))

    def child_revealed(full: list[dict], partial: list[dict]) -> bool:
        """Whether some window shows figures in both reports over student counts one apart (so the
        difference of the counts x shares is the child's own flag)."""
        return any(a["shown"] == b["shown"] == "1" and int(a["students"]) - int(b["students"]) == 1
                   for a, b in zip(full, partial))

    without_child = ("--seat-map", str(tmp_path / "without_child.json"))
    # the attack, without a record: both reports show, one student apart
    full, partial = report(ingested, "a"), report(lesson / "frames", "b", *without_child)
    assert child_revealed(full, partial)
    assert "not checked against earlier reports" in (tmp_path / "b" / "report.md").read_text()

    state = tmp_path / "state"
    state.mkdir()
    # the ingested folder and the raw frames are the same minutes (the record keys windows by frame pixels)
    full = report(ingested, "c", "--state-dir", str(state))
    assert all(r["shown"] == "1" for r in full)
    partial = report(lesson / "frames", "d", *without_child, "--state-dir", str(state))
    assert not child_revealed(full, partial)
    assert all(r["shown"] == "0" and r["students"] == r["inattentive_share"] == r["happy"] == "" for r in partial)
    text = (tmp_path / "d" / "report.md").read_text()
    assert f"withheld {len(partial)}" in text and "## Limits" in text and child not in text
    # the same students again add nothing to subtract: shown
    again = report(ingested, "e", "--state-dir", str(state))
    assert all(r["shown"] == "1" for r in again)
    # the lesson without a seat map (anonymous tracks) after the seat-map reports cannot be compared: withheld
    tracks = report(lesson / "frames", "f", "--state-dir", str(state))
    assert all(r["shown"] == "0" for r in tracks)
    # cut at another second (its first 5 frames left out), without the child: every window shares frames
    # with one the first report showed, one student apart
    recut = tmp_path / "recut" / "frames"
    recut.mkdir(parents=True)
    for path in sorted((lesson / "frames").iterdir())[5:]:
        (recut / path.name).write_bytes(path.read_bytes())
    assert all(r["shown"] == "0" for r in report(recut, "g", *without_child, "--state-dir", str(state)))


def test_a_combination_of_reports_that_singles_out_a_child_is_withheld():
    from client.classroom.report_record import singles_out

    everyone = frozenset(f"st-{i:02d}" for i in range(10))
    first_half, second_half = frozenset(sorted(everyone)[:5]), frozenset(sorted(everyone)[5:9])
    assert not singles_out(everyone, [], 5) and not singles_out(everyone, [everyone], 5)
    assert singles_out(everyone - {"st-03"}, [everyone], 5)                   # one apart
    assert singles_out(everyone - {"st-03", "st-04"}, [everyone], 5)          # two apart: a group under k
    assert not singles_out(first_half, [everyone], 5)                         # five apart: k holds
    # every pair differs by 5 or more, but everyone - first half - second half = st-09's own figures
    assert not singles_out(second_half, [first_half], 5)
    assert singles_out(second_half, [everyone, first_half], 5)


def test_an_interrupted_report_leaves_the_previous_report_whole(ingested, checkpoint, tmp_path, monkeypatch):
    from client.classroom import plots

    out = tmp_path / "r"
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps({"report-min-students": 1000}))
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--out", str(out),
                "--policy", str(strict)) == 0
    before = {name: (out / name).read_bytes() for name in ("report.md", "timeline.csv")}

    def interrupted(*args, **kwargs):        # Ctrl-C while the second plot is drawn
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "indicators", interrupted)
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--out", str(out)) == 130
    assert {name: (out / name).read_bytes() for name in before} == before      # no new timeline under the old report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "strict.json"]  # no staging folder left
    monkeypatch.undo()
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--out", str(out)) == 0
    assert (out / "timeline.csv").read_bytes() != before["timeline.csv"]


def test_analysis_options_given_with_an_ingested_lesson_are_named_not_silently_dropped(lesson, ingested, checkpoint,
                                                                                       tmp_path, capsys):
    assert _run("classroom", "report", str(ingested), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r"),
                "--seat-map", str(lesson / "seat_map.json"), "--fps", "2") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "ingested lesson" in line]
    assert len(lines) == 1 and "--seat-map, --fps" in lines[0] and "ignored" in lines[0]


def test_the_report_runs_on_raw_frames_and_writes_only_the_report(lesson: Path, checkpoint: Path, tmp_path: Path,
                                                                  capsys):
    args = ("classroom", "report", str(lesson / "frames"), "--checkpoint", str(checkpoint), "--seat-map",
            str(lesson / "seat_map.json"), "--empty-frame", str(lesson / "empty_room.png"), "--out", str(tmp_path / "r"))
    assert _run(*args, "--workers", "1") == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["plots", "report.md", "timeline.csv"]
    text = (tmp_path / "r" / "report.md").read_text()
    assert "45 samples" in text and "involvement: on average" in text and "units: students (seat map)" in text
    assert _run(*args, "--workers", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers" in err[0]


def _lesson_of(states: dict[str, str], steps: int = 10, bowing_known: bool = True, label: int = H):
    """A seat-map lesson at 1 sample/s where each unit keeps one state throughout (faces labelled `label`)."""
    from client.classroom.report import Lesson, series_of

    lesson = Lesson(Path("l"), 1.0, steps, True, bowing_known, list(states), {u: [st] * steps for u, st in states.items()},
                    {}, np.array([sum(st == "face" for st in states.values())] * steps, np.int64))
    labels = {u: np.full(steps, label if st == "face" else NO, np.int64) for u, st in states.items()}
    return lesson, series_of(lesson, labels)


def test_seats_nobody_was_seen_in_do_not_count_towards_k():
    from client.classroom.report import class_timeline

    # no empty-room frame: every seat without a face is 'unseen', which is no evidence of a student there,
    # so a roster of 24 with one face in the room is one student, not 24 (the figures would be that child's)
    lesson, series = _lesson_of({"st-00": "face", **{f"st-{i:02d}": "unseen" for i in range(1, 24)}},
                                bowing_known=False)
    (window,) = class_timeline(lesson, series, 5)
    assert window.in_room == 1 and not window.shown and math.isnan(window.engagement) and sum(window.mix) == 0
    lesson, series = _lesson_of({**{f"st-{i:02d}": "face" for i in range(5)}, "st-05": "unseen"}, bowing_known=False)
    (window,) = class_timeline(lesson, series, 5)
    assert window.in_room == 5 and window.shown and window.engagement == 1.0


def test_expressions_are_shown_only_over_k_students_faces(tmp_path):
    from client.classroom.report import class_timeline, write_timeline_csv

    # six in the room, one face and five bowed heads: the room passes k = 5, but the expression mix and
    # engagement would be one child's own; the presence figures (over all six) stay
    lesson, series = _lesson_of({"st-00": "face", **{f"st-{i:02d}": "down" for i in range(1, 6)}})
    (window,) = class_timeline(lesson, series, 5)
    assert window.shown and window.in_room == 6 and window.inattentive == pytest.approx(5 / 6)
    assert math.isnan(window.engagement) and sum(window.mix) == 0 and not window.expressions_shown
    write_timeline_csv(tmp_path / "t.csv", [window])
    (row,) = csv.DictReader((tmp_path / "t.csv").read_text().splitlines())
    assert row["shown"] == "1" and row["engagement"] == "" and all(row[c] == "" for c in FER7)
    lesson, series = _lesson_of({**{f"st-{i:02d}": "face" for i in range(5)}, "st-05": "down"})
    (window,) = class_timeline(lesson, series, 5)
    assert window.expressions_shown and window.engagement == 1.0 and window.mix[H] == 50


def test_report_policy_keys_are_checked(tmp_path):
    from privacy.policy import PolicyError, read_policy_file, read_report_policy
    from shared_models.config import defaults

    cfg = defaults()
    assert read_report_policy(None, cfg).min_students == cfg["classroom.report_min_students"]
    bad = tmp_path / "policy.json"
    for values, key in (({"report-min-students": 0}, "report-min-students"),
                        ({"per-student-figures": "yes"}, "per-student-figures"), ({"report-k": 3}, "report-k")):
        bad.write_text(json.dumps(values))
        with pytest.raises(PolicyError, match=key):
            read_report_policy(tmp_path, cfg)
    # the training policy file may carry the report keys
    bad.write_text(json.dumps({"unit": "student", "delta": 1e-5, "budget": 8, "max-round-epsilon": 8,
                               "declared-students": 100, "report-min-students": 7}))
    assert read_policy_file(tmp_path).declared_units == 100 and read_report_policy(bad, cfg).min_students == 7


def test_a_config_cannot_loosen_what_the_school_policy_leaves_to_the_defaults(tmp_path):
    from privacy.policy import read_report_policy
    from shared_models.config import defaults

    # the policy.json fedfer simulate / deploy add-school write holds no report key; a run's config.yaml
    # (the coordinator's run-config) handed to the report asks for k = 1 and named figures
    (tmp_path / "policy.json").write_text(json.dumps({"unit": "student", "delta": 1e-5, "budget": 8,
                                                      "max-round-epsilon": 8, "declared-students": 100}))
    loose = {**defaults(), "classroom.report_min_students": 1, "classroom.per_student_figures": True}
    for path in (tmp_path, None):
        policy = read_report_policy(path, loose)
        assert policy.min_students == defaults()["classroom.report_min_students"] and not policy.per_student_figures
    # a config may ask for more privacy; what the school's policy states is the school's decision
    assert read_report_policy(tmp_path, {**defaults(), "classroom.report_min_students": 9}).min_students == 9
    (tmp_path / "policy.json").write_text(json.dumps({"report-min-students": 2, "per-student-figures": True}))
    assert read_report_policy(tmp_path, defaults()) == read_report_policy(tmp_path, loose)
    assert read_report_policy(tmp_path, loose).min_students == 2 and read_report_policy(tmp_path, loose).per_student_figures


# ---------------------------------------------------------------------------- bad input
def test_bad_frames_and_a_corrupt_seat_map_cost_one_line_each_and_the_lesson_goes_on(lesson: Path, tmp_path: Path):
    from client.classroom.ingest import ingest

    frames = tmp_path / "frames"
    frames.mkdir()
    for name in sorted(p.name for p in (lesson / "frames").iterdir())[:3]:
        (frames / name).write_bytes((lesson / "frames" / name).read_bytes())
    (frames / "frame_00001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")        # unreadable
    blank = np.full((480, 640), 128, np.uint8)
    import cv2

    cv2.imwrite(str(frames / "frame_00003.png"), blank)                                # no faces
    seat_map = tmp_path / "seats.json"
    seat_map.write_text('{"seats": [{"student_id": "a", "box": [0, 0, "x", 5]}]}')
    lines: list[str] = []
    report = ingest(frames, tmp_path / "out", seat_map=seat_map, echo=lines.append)
    assert report.samples == 3 and report.unreadable == 1 and report.without_faces == 1 and report.faces > 0
    assert any(str(frames / "frame_00001.png") in line and "unreadable" in line for line in lines)
    assert any("frame_00003.png" in line and "no faces" in line for line in lines)
    assert any(str(seat_map) in line and "box" in line for line in lines)
    assert all("\n" not in line for line in lines)
    meta = json.loads((tmp_path / "out" / "lesson.json").read_text())
    assert meta["students"] == [] and "whole folder" in meta["privacy_unit"]
    ids = {r["student_id"] for r in csv.DictReader((tmp_path / "out" / "observations.csv").read_text().splitlines())}
    assert ids == {"whole-folder"}


def test_a_seat_outside_the_frame_is_unseen_and_the_lesson_goes_on(lesson: Path, tmp_path: Path):
    from client.classroom.ingest import ingest

    # a seat map drawn for a larger camera frame: boxes beyond the 640 x 480 frame, one reaching past it
    seats = json.loads((lesson / "seat_map.json").read_text())["seats"][:2]
    seats += [{"student_id": "far", "box": [2000, 1500, 2100, 1600]}, {"student_id": "edge", "box": [600, 440, 900, 700]},
              {"student_id": "huge", "box": [0, 0, 1e12, 1e12]}]
    (tmp_path / "seats.json").write_text(json.dumps({"seats": seats}))
    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((lesson / "frames").iterdir())[:2]:
        (frames / path.name).write_bytes(path.read_bytes())
    report = ingest(frames, tmp_path / "out", seat_map=tmp_path / "seats.json", empty_frame=lesson / "empty_room.png",
                    size=48, echo=lambda line: None)
    assert report.samples == 2 and report.faces > 0
    rows = list(csv.DictReader((tmp_path / "out" / "observations.csv").read_text().splitlines()))
    assert {r["state"] for r in rows if r["student_id"] == "far"} == {"unseen"}
    assert {r["student_id"] for r in rows} >= {"far", "edge", "huge"}


@pytest.mark.parametrize("workers", [1, 2])
def test_inputs_from_another_camera_cost_one_line_each_and_are_not_used(lesson: Path, tmp_path: Path, workers: int):
    import cv2

    from client.classroom.ingest import ingest

    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((lesson / "frames").iterdir())[:6]:
        (frames / path.name).write_bytes(path.read_bytes())
    odd = sorted(frames.iterdir())[2]              # one frame of another size among the lesson's 640 x 480 ones
    cv2.imwrite(str(odd), cv2.resize(cv2.imread(str(odd)), (320, 240)))
    empty = tmp_path / "empty_small.png"           # the empty room from another camera
    cv2.imwrite(str(empty), cv2.resize(cv2.imread(str(lesson / "empty_room.png")), (320, 240)))
    seats = json.loads((lesson / "seat_map.json").read_text())["seats"]
    seats.append({"student_id": "beyond", "box": [700, 500, 780, 580]})
    (tmp_path / "seats.json").write_text(json.dumps({"seats": seats}))
    lines: list[str] = []
    report = ingest(frames, tmp_path / "out", seat_map=tmp_path / "seats.json", empty_frame=empty, size=48,
                    echo=lines.append, workers=workers)
    assert report.samples == 5 and report.unreadable == 1
    assert sum(odd.name in line and "320 x 240" in line and "skipped" in line for line in lines) == 1
    assert sum(str(empty) in line and "ignored" in line for line in lines) == 1
    assert sum("beyond" in line and "outside the 640 x 480 frame" in line for line in lines) == 1
    assert len(lines) == 3
    meta = json.loads((tmp_path / "out" / "lesson.json").read_text())
    assert meta["empty_room_frame"] is False      # so the report says involvement was not measured
    rows = list(csv.DictReader((tmp_path / "out" / "observations.csv").read_text().splitlines()))
    assert odd.name not in {r["frame"] for r in rows}


def test_an_empty_room_frame_of_another_room_is_one_line_and_not_used(lesson: Path, tmp_path: Path):
    import cv2

    from client.classroom.ingest import ingest
    from simulations import classroom_scenes as scenes

    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((lesson / "frames").iterdir())[:3]:
        (frames / path.name).write_bytes(path.read_bytes())
    other = tmp_path / "other_room.png"             # the same size, another room (camera moved, wrong file)
    cv2.imwrite(str(other), scenes.empty_frame(scenes.make_room(9, 10))[:, :, ::-1])
    for empty, used in ((lesson / "empty_room.png", True), (other, False)):
        lines: list[str] = []
        ingest(frames, tmp_path / f"out-{used}", seat_map=lesson / "seat_map.json", empty_frame=empty, size=48,
               echo=lines.append)
        assert json.loads((tmp_path / f"out-{used}" / "lesson.json").read_text())["empty_room_frame"] is used
        assert [line for line in lines if str(empty) in line] == ([] if used else lines)
        assert used or (len(lines) == 1 and "another room or camera position" in lines[0])


@pytest.mark.timeout(60)
def test_named_pipes_are_never_opened_and_a_decompression_bomb_never_decoded(lesson: Path, tmp_path: Path, monkeypatch):
    import os
    import struct
    import zlib

    import cv2

    from client.classroom import sources
    from client.classroom.ingest import IngestError, ingest, read_label_file
    from client.classroom.report import LessonError, load_lesson
    from privacy.policy import PolicyError, read_report_policy
    from shared_models.config import defaults

    # every input path a school names may be a named pipe: opening one blocks until someone writes to it
    for name in ("seats.json", "empty.png", "labels.csv", "policy.json", "lesson.mp4"):
        os.mkfifo(tmp_path / name)
    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((lesson / "frames").iterdir())[:2]:
        (frames / path.name).write_bytes(path.read_bytes())
    lines: list[str] = []
    report = ingest(frames, tmp_path / "out", seat_map=tmp_path / "seats.json", empty_frame=tmp_path / "empty.png",
                    size=48, echo=lines.append)
    assert report.samples == 2 and any("seats.json" in line and "named pipe" in line for line in lines)
    assert any("empty.png" in line for line in lines)
    with pytest.raises(IngestError, match="named pipe"):
        read_label_file(tmp_path / "labels.csv")
    with pytest.raises(PolicyError, match="named pipe"):
        read_report_policy(tmp_path / "policy.json", defaults())
    assert list(sources.read_samples(tmp_path / "lesson.mp4", warn=lines.append)) == []
    assert "lesson.mp4" in lines[-1] and "named pipe" in lines[-1]
    (tmp_path / "out" / "observations.csv").unlink()
    os.mkfifo(tmp_path / "out" / "observations.csv")
    with pytest.raises(LessonError, match="named pipe"):
        load_lesson(tmp_path / "out")

    # a few hundred bytes claiming 20,000 x 20,000 pixels: refused from its header, never decoded
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    bomb = frames / "frame_bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    decode, decoded = cv2.imdecode, []

    def counted(data, flags):  # type: ignore[no-untyped-def]
        decoded.append(data.size)
        return decode(data, flags)

    monkeypatch.setattr(cv2, "imdecode", counted)
    assert sources._read_image(bomb) is None and decoded == []
    assert sources._read_image(frames / "frame_00000.png").shape == (480, 640) and len(decoded) == 1


def test_a_sampling_rate_or_lesson_file_out_of_range_is_one_line(ingested: Path, tmp_path: Path, capsys):
    import shutil

    from client.classroom.report import LessonError, load_lesson

    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(next(iter(sorted((ingested.parent / "frames").iterdir()))), frames)
    for fps in ("inf", "1e308", "nan", "0"):       # inf and 1e308 were an OverflowError (an internal error)
        assert _run("classroom", "ingest", str(frames), "--out", str(tmp_path / "o"), "--fps", fps) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sampling rate" in err[0]
    # lesson.json and observations.csv are ingest's, but files a person may edit
    lesson = tmp_path / "lesson"
    shutil.copytree(ingested, lesson, ignore=shutil.ignore_patterns("images", "report"))
    meta = json.loads((ingested / "lesson.json").read_text())
    for key, value in (("fps", "x"), ("fps", 0), ("fps", None), ("fps", 1e999), ("fps", -1), ("steps", "abc"),
                       ("steps", 10 ** 11), ("steps", -3)):
        (lesson / "lesson.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(LessonError, match=key):
            load_lesson(lesson)
    (lesson / "lesson.json").write_text(json.dumps(meta))
    rows = (ingested / "observations.csv").read_text().splitlines()
    (lesson / "observations.csv").write_text("\n".join(",".join(row.split(",")[:5]) for row in rows) + "\n")
    with pytest.raises(LessonError, match="line 2"):
        load_lesson(lesson)


def test_names_with_slashes_or_line_breaks_cost_one_line_and_never_a_silent_loss(lesson: Path, tmp_path: Path):
    from client.classroom.ingest import ingest
    from client.classroom.report import load_lesson
    from client.classroom.tracks import SeatMapError, load_seat_map

    # a student id names crop files and CSV cells: 'a/b' made images/000000-a/b.png, never written (the
    # report then showed that student without expressions), a line break split the rows read back
    for bad in ("5/b-14", "x\ny", "x\u2028y", "a\\b"):
        (tmp_path / "seats.json").write_text(json.dumps({"seats": [{"student_id": bad, "box": [0, 0, 10, 10]}]}))
        with pytest.raises(SeatMapError, match="student_id"):
            load_seat_map(tmp_path / "seats.json")
    # frame names holding a line break (a forged warning line) or a character str.splitlines() splits at
    frames = tmp_path / "frames"
    frames.mkdir()
    first, second = sorted((lesson / "frames").iterdir())[:2]
    (frames / "frame_0\x1c0.png").write_bytes(first.read_bytes())
    (frames / "frame_1\u2028.png").write_bytes(second.read_bytes())
    (frames / "frame_2\nfedfer: forged.png").write_bytes(b"x")
    lines: list[str] = []
    report = ingest(frames, tmp_path / "out", seat_map=lesson / "seat_map.json", empty_frame=lesson / "empty_room.png",
                    size=48, echo=lines.append)
    assert report.samples == 2 and report.unreadable == 1
    assert all("\n" not in line for line in lines) and any("frame_2\\nfedfer: forged.png" in line for line in lines)
    folder = load_lesson(tmp_path / "out")      # was: "line 2: step or state out of range"
    assert folder.steps == 2 and sum(len(c) for c in folder.crops.values()) == report.faces


def test_an_unreadable_video_or_a_missing_lesson_is_one_line(tmp_path: Path, capsys):
    video = tmp_path / "lesson.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    # nothing readable is a failure (exit 2), so a script does not go on to train on an empty folder
    assert _run("classroom", "ingest", str(video), "--out", str(tmp_path / "o")) == 2
    captured = capsys.readouterr()
    assert f"{video}: unreadable video" in captured.out
    assert captured.err.count("\n") == 1 and f"{video}: nothing readable" in captured.err
    assert "nothing written" in captured.err and not (tmp_path / "o").exists()   # the same command may run again
    assert _run("classroom", "ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nope") in err[0]
    assert _run("classroom", "report", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "missing.pt")) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_an_interrupted_ingest_leaves_nothing_behind_and_the_same_command_runs_again(lesson: Path, tmp_path: Path,
                                                                                      monkeypatch):
    from client.classroom import ingest as ingest_module

    real = ingest_module.analyse_lesson

    def interrupted_after_20_samples(*args, **kwargs):   # Ctrl-C in the middle of the lesson
        for count, sample in enumerate(real(*args, **kwargs)):
            if count == 20:
                raise KeyboardInterrupt
            yield sample

    kept = tmp_path / "kept"          # an existing folder with someone else's file in it keeps that file
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    monkeypatch.setattr(ingest_module, "analyse_lesson", interrupted_after_20_samples)
    for out in (tmp_path / "new", kept):
        with pytest.raises(KeyboardInterrupt):
            ingest_module.ingest(lesson / "frames", out, seat_map=lesson / "seat_map.json", labels=lesson / "labels.csv",
                                 empty_frame=lesson / "empty_room.png", size=48, echo=lambda line: None)
    assert not (tmp_path / "new").exists() and sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    monkeypatch.setattr(ingest_module, "analyse_lesson", real)
    report = ingest_module.ingest(lesson / "frames", kept, seat_map=lesson / "seat_map.json", size=48,
                                  echo=lambda line: None)
    assert report.samples == 45 and len(list((kept / "images").iterdir())) == report.faces > 0


def test_a_report_with_nothing_readable_exits_2_in_one_line(checkpoint: Path, tmp_path: Path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(3):
        (frames / f"f{k}.png").write_bytes(b"x")
    video = tmp_path / "lesson.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    assert _run("classroom", "ingest", str(frames), "--out", str(tmp_path / "ingested")) == 2   # writes nothing
    capsys.readouterr()
    assert not (tmp_path / "ingested").exists()
    (tmp_path / "ingested").mkdir()              # a lesson folder of zero samples (an older ingest wrote these)
    (tmp_path / "ingested" / "lesson.json").write_text(json.dumps({"samples": 0, "steps": 0, "fps": 1.0}))
    (tmp_path / "ingested" / "observations.csv").write_text("step,time,frame,student_id,state,path,track\n")
    # the plots met zero windows: an internal error (AxisError) after timeline.csv was written
    for lesson in (frames, video, tmp_path / "ingested"):
        assert _run("classroom", "report", str(lesson), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no readable sample" in err[0] and not (tmp_path / "r").exists()


def test_a_video_file_is_read_at_the_requested_rate(lesson: Path, tmp_path: Path):
    import cv2

    from client.classroom.sources import read_samples

    video = tmp_path / "lesson.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 4.0, (640, 480))
    frame = cv2.imread(str(next(iter(sorted((lesson / "frames").iterdir())))))
    for _ in range(12):                      # 3 s at 4 frames/s
        writer.write(frame)
    writer.release()
    samples = list(read_samples(video, fps=1.0, warn=pytest.fail))
    assert [s.step for s in samples] == [0, 1, 2] and samples[0].gray.shape == (480, 640)


def test_ingest_refuses_a_folder_that_holds_a_lesson_and_stops_when_a_crop_cannot_be_written(lesson: Path, ingested: Path,
                                                                                            tmp_path: Path, monkeypatch):
    """A second lesson into the same folder would mix its crops with the first's labels.csv; a crop that could not
    be written (a full disk) would leave a student without faces, silently."""
    import cv2

    from client.classroom.ingest import IngestError, ingest

    before = sorted(p.name for p in ingested.iterdir())
    with pytest.raises(IngestError, match="already holds an ingested lesson"):
        ingest(lesson / "frames", ingested, seat_map=lesson / "seat_map.json", size=48, echo=lambda line: None)
    assert sorted(p.name for p in ingested.iterdir()) == before
    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kwargs: False)
    with pytest.raises(IngestError, match="could not write the face crop"):
        ingest(lesson / "frames", tmp_path / "new", seat_map=lesson / "seat_map.json", size=48, echo=lambda line: None)


@pytest.mark.parametrize("flags, words", [
    (["--seconds", "nan"], "--seconds must be a number > 0, got nan"),
    (["--seconds", "inf"], "--seconds must be a number > 0, got inf"),
    (["--seconds", "-5"], "--seconds must be a number > 0"),
    (["--fps", "nan"], "--fps must be a number > 0, got nan"),
    (["--fps", "0"], "--fps must be a number > 0"),
    (["--students", "0"], "--students must be in 1..40, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--seconds", "1e7"], "a synthetic lesson has at most 36,000"),   # ran until the memory ran out
])
def test_scene_refuses_what_it_cannot_make_in_one_line_before_writing(tmp_path, capsys, flags, words):
    """NaN or infinite seconds, a negative seed, no students: numpy's ValueError was an internal error (exit 70)."""
    from fedfer.cli import main as fedfer_main

    assert fedfer_main(["classroom", "scene", str(tmp_path / "lesson"), *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "internal" not in err, err
    assert not (tmp_path / "lesson").exists()


@pytest.mark.parametrize("box", ["[0, 0, " + "9" * 400 + ", 10]", "[0, 0, 1e999, 10]", "[true, 0, 10, 10]"])
def test_a_seat_box_number_too_large_for_a_float_is_a_seat_map_error(tmp_path, box):
    """A 400-digit integer in a box: math.isfinite raised OverflowError (an internal error in `classroom ingest`)."""
    from client.classroom.tracks import SeatMapError, load_seat_map

    (tmp_path / "seats.json").write_text('{"seats": [{"student_id": "a", "box": ' + box + '}]}')
    with pytest.raises(SeatMapError, match=r"box must be four numbers"):
        load_seat_map(tmp_path / "seats.json")


def test_a_label_file_cell_over_the_csv_field_limit_is_one_line_naming_the_file(tmp_path):
    """A 1 MB frame name: csv.Error 'field larger than field limit' was an internal error in `classroom ingest`."""
    from client.classroom.ingest import IngestError, read_label_file

    (tmp_path / "labels.csv").write_text("frame,student_id,label\n" + "x" * 1_000_000 + ",a,happy\n")
    with pytest.raises(IngestError, match=r"labels.csv line 2: not a CSV row"):
        read_label_file(tmp_path / "labels.csv")
    # the same after a benchmark reader raised csv's process-wide field limit (the suite's order made it pass)
    import csv

    before = csv.field_size_limit()
    try:
        csv.field_size_limit(10_000_000)
        with pytest.raises(IngestError, match=r"labels.csv line 2: not a CSV row"):
            read_label_file(tmp_path / "labels.csv")
    finally:
        csv.field_size_limit(before)
