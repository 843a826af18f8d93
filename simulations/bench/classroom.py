"""The classroom pipeline against the scene generator's ground truth (issue 17's targets).

    python -m simulations.bench.classroom [--rooms 6] [--frames 10] [--lesson-minutes 45] [--out benchmarks/classroom.json]

- detection: recall and precision on frontal faces (|yaw| < 0.3 rad, pitch < 0.2 rad) of >= 40 px, recall by
  yaw, pitch and face size; full-frame search and seat-map search;
- alignment: median |eye-line angle - true angle| over the matched faces whose eyes the cascade found;
- tracking: share of matched detections assigned to the right student with the seat map;
- throughput: detect + align + crop per 640x480 frame of 24 students, one thread (cv2.setNumThreads(1)),
  CPU time of this process and wall time;
- a 45-minute lesson at 1 frame/s: ingest and report time (the frames are `--unique` rendered frames
  repeated to 45 minutes: the time does not depend on which frame repeats);
- indicator agreement with the generator's truth on `--agreement-lessons` short lessons, without and with
  the head-posture step (`client.classroom.posture`), with confusion tables.

Run the timing alone on the machine (nothing else busy), as every speed figure here is measured.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from client.classroom import faces as facelib
from client.classroom import indicators as ind
from client.classroom.tracks import Seat, assign_to_seats
from shared_models.labels import FER7
from simulations import classroom_scenes as scenes
from simulations.bench.results import load_average, write_result

FRONTAL_YAW, FRONTAL_PITCH, MIN_FACE = 0.3, 0.2, 40.0


def match(faces: list[facelib.Face], truths: list[scenes.FaceTruth]) -> tuple[list[int | None], int]:
    """For each true face, the index of the detection holding its eyes' midpoint at a plausible size
    (0.5-2x the face width), each detection used once; and how many detections matched nothing."""
    used: set[int] = set()
    out: list[int | None] = []
    for truth in truths:
        mid = ((truth.left_eye[0] + truth.right_eye[0]) / 2, (truth.left_eye[1] + truth.right_eye[1]) / 2)
        best = None
        for k, f in enumerate(faces):
            x, y, w, h = f.box
            if k not in used and x <= mid[0] <= x + w and y <= mid[1] <= y + h and 0.5 < w / truth.face_px < 2.0:
                if best is None or math.dist(f.centre, mid) < math.dist(faces[best].centre, mid):
                    best = k
        if best is not None:
            used.add(best)
        out.append(best)
    return out, len(faces) - len(used)


def _rate(hits: list[bool]) -> dict[str, float | int]:
    return {"n": len(hits), "rate": round(float(np.mean(hits)), 4) if hits else None}


def _binned(rows: list[dict], key: str, edges: list[float], where) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        out[f"{lo:g}-{hi:g}"] = _rate([r["hit"] for r in rows if lo <= r[key] < hi and where(r)])
    return out


def _detection_rows(detect, room: scenes.Room, frames: list, seat_mode: bool) -> tuple[list[dict], int, int]:  # type: ignore[no-untyped-def]
    """Per true face: size, pose, hit, angle error, right student; and detections, unmatched detections.
    `detect(gray)` -> faces; it sees the frames in order (a tracking detector may reuse the previous one)."""
    import cv2

    seats = [Seat(s.student_id, s.box) for s in room.seats]
    rows, detections, unmatched = [], 0, 0
    for _, frame, truths in frames:
        gray = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        found = detect(gray)
        hits, extra = match(found, truths)
        assigned = assign_to_seats(found, seats)[0] if seat_mode else {}
        owner = {id(face): sid for sid, face in assigned.items()}
        detections += len(found)
        unmatched += extra
        for truth, k in zip(truths, hits):
            face = found[k] if k is not None else None
            rows.append({"size": truth.face_px, "yaw": abs(truth.yaw), "pitch": truth.pitch, "hit": face is not None,
                         "eyes": bool(face and face.eyes_found),
                         "angle_error": abs(face.angle - truth.angle) if face is not None and face.eyes_found else None,
                         "angle_error_any": abs(face.angle - truth.angle) if face is not None else None,
                         "right_student": None if face is None or not seat_mode else owner.get(id(face)) == truth.student_id})
    return rows, detections, unmatched


def _detector_for(mode: str, detector: facelib.FaceDetector, room: scenes.Room):  # type: ignore[no-untyped-def]
    """gray -> faces: `seat_map` searches every frame afresh (what the first sample of a chunk gets),
    `seat_map_tracked` reuses the previous frame as ingest does (`SeatSearch`), `full_frame` has no seat map,
    `full_frame_tracked` also searches where faces were in earlier frames (`FrameSearch`, as ingest does)."""
    from client.classroom.search import FrameSearch, SeatSearch

    boxes = [s.box for s in room.seats]
    if mode.startswith("full_frame"):
        return FrameSearch(detector, reuse=mode == "full_frame_tracked")
    search = SeatSearch(detector, boxes, reuse=mode == "seat_map_tracked")
    return lambda gray: [face for face in search(gray) if face is not None]


def _summary(rows: list[dict], detections: int, unmatched: int, seat_mode: bool) -> dict:
    errors = [r["angle_error"] for r in rows if _frontal(r) and r["angle_error"] is not None]
    any_errors = [r["angle_error_any"] for r in rows if _frontal(r) and r["angle_error_any"] is not None]
    out = {
        "frontal_recall": _rate([r["hit"] for r in rows if _frontal(r)]),
        "precision": round(1.0 - unmatched / max(1, detections), 4), "detections": detections,
        "recall_by_yaw_rad": _binned(rows, "yaw", [0, 0.15, 0.3, 0.55, 0.8, 1.2], lambda r: r["pitch"] < FRONTAL_PITCH),
        "recall_by_pitch_rad": _binned(rows, "pitch", [-0.3, 0.2, 0.45, 0.65, 1.0], lambda r: r["yaw"] < FRONTAL_YAW),
        "recall_by_face_px": _binned(rows, "size", [30, 40, 50, 60, 70, 90],
                                     lambda r: r["yaw"] < FRONTAL_YAW and r["pitch"] < FRONTAL_PITCH),
        "eyes_found_share": _rate([r["eyes"] for r in rows if _frontal(r) and r["hit"]]),
        "median_angle_error_deg_eyes_found": round(float(np.median(errors)), 2) if errors else None,
        "median_angle_error_deg_all_matched": round(float(np.median(any_errors)), 2) if any_errors else None,
    }
    if seat_mode:
        out["tracking_right_student"] = _rate([r["right_student"] for r in rows if r["hit"]])
    return out


def _frontal(r: dict) -> bool:
    return r["yaw"] < FRONTAL_YAW and r["pitch"] < FRONTAL_PITCH and r["size"] >= MIN_FACE


def accuracy(rooms: int, frames_per_room: int, lesson_rooms: int = 2, lesson_seconds: int = 40) -> dict:
    """Detection on `rooms` rooms, `frames_per_room` frames 12 s apart (seat map searched afresh each frame,
    and full frame); and on `lesson_rooms` runs of `lesson_seconds` consecutive samples at 1 frame/s with
    the seat search reusing the previous sample, as ingest does (`seat_map_tracked`)."""
    import cv2

    cv2.setNumThreads(1)
    detector = facelib.FaceDetector()
    out: dict = {}
    spaced, runs = [], []
    for r in range(rooms):
        room = scenes.make_room(100 + r, 20 + (r % 3) * 5)
        script = scenes.script_lesson(room, 120, 1.0, seed=r)
        steps = list(range(0, 120, max(1, 120 // frames_per_room)))[:frames_per_room]
        spaced.append((room, list(scenes.render_lesson(room, script, steps))))
    for r in range(lesson_rooms):
        room = scenes.make_room(200 + r, 24 + 6 * (r % 2))
        runs.append((room, list(scenes.render_lesson(room, scenes.script_lesson(room, lesson_seconds, 1.0, seed=r)))))
    for mode, rendered in (("seat_map", spaced), ("full_frame", spaced), ("seat_map_tracked", runs),
                           ("full_frame_tracked", spaced), ("full_frame_tracked_1fps", runs)):
        rows, detections, unmatched = [], 0, 0
        for room, frames in rendered:
            part, d, u = _detection_rows(_detector_for(mode.replace("_1fps", ""), detector, room), room, frames,
                                         mode.startswith("seat_map"))
            rows += part
            detections, unmatched = detections + d, unmatched + u
        out[mode] = _summary(rows, detections, unmatched, mode.startswith("seat_map"))
        out[mode]["faces"] = sum(len(t) for _, frames in rendered for _, _, t in frames)
        out[mode]["frames"] = sum(len(frames) for _, frames in rendered)
    return out


THROUGHPUT_MODES = ("seat_map_tracked", "seat_map", "full_frame")


def _spread(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [round(ordered[0], 1), round(float(np.median(ordered)), 1), round(ordered[-1], 1)]


def throughput(frames: int = 40, students: tuple[int, ...] = (24, 30), repeats: int = 3) -> dict:
    """CPU and wall time of detect + align + crop per 640x480 frame, one thread, `frames` consecutive
    samples at 1 frame/s: seat map as ingest searches it (`seat_map_tracked`: the previous sample reused;
    a repeat starts with no memory), seat map searched afresh every frame, and the whole frame. The modes
    alternate within each repeat so that a change in the machine's load hits them alike."""
    import cv2

    cv2.setNumThreads(1)
    detector = facelib.FaceDetector()
    rooms = []
    for n in students:
        room = scenes.make_room(7 + n, n)
        script = scenes.script_lesson(room, frames, 1.0, seed=1)
        rooms.append((room, [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for _, f, _ in scenes.render_lesson(room, script)]))
    out: dict = {"students": list(students), "frames_per_room": frames, "frame_size": [rooms[0][0].width, rooms[0][0].height],
                 "load_average_before": load_average()}
    cpu: dict[str, list[float]] = {m: [] for m in THROUGHPUT_MODES}
    wall: dict[str, list[float]] = {m: [] for m in THROUGHPUT_MODES}
    for _ in range(repeats):
        for mode in THROUGHPUT_MODES:
            wall0, cpu0, count = time.perf_counter(), time.process_time(), 0
            for room, grays in rooms:
                detect = _detector_for(mode, detector, room)
                for gray in grays:
                    for face in detect(gray):
                        facelib.align_crop(gray, face, 64)
                    count += 1
            cpu[mode].append(count / (time.process_time() - cpu0))
            wall[mode].append(count / (time.perf_counter() - wall0))
    for mode in THROUGHPUT_MODES:
        out[mode] = {"fps_cpu_min_median_max": _spread(cpu[mode]), "fps_wall_min_median_max": _spread(wall[mode])}
    out["load_average_after"] = load_average()
    return out


def indicator_agreement(lesson_dir: Path, ingested: Path) -> dict:
    """The seed-001 indicators from an ingested lesson's states vs from the generator's truth
    (`agreement_of_states`)."""
    from client.classroom.report import load_lesson

    lesson = load_lesson(ingested)
    return agreement_of_states(np.load(lesson_dir / "truth" / "script.npz"), lesson.states, lesson.steps, lesson.fps)


def _truth_states(truth) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Per student and step, what the generator drew: present; visible (present, turned to the camera:
    |yaw| <= TURN_YAW and pitch <= BOW_PITCH — what an ideal detector of faces turned to the camera
    detects); bowed (present, pitch > BOW_PITCH); turned (present, |yaw| > TURN_YAW)."""
    present = truth["present"]
    return {"present": present, "visible": present & (np.abs(truth["yaw"]) <= scenes.TURN_YAW) & (truth["pitch"] <= scenes.BOW_PITCH),
            "bowed": present & (truth["pitch"] > scenes.BOW_PITCH), "turned": present & (np.abs(truth["yaw"]) > scenes.TURN_YAW)}


def _confusion(pairs: list[tuple[bool, bool]], name: str) -> dict[str, int]:
    """Counts of (truth, pipeline) for a yes/no indicator `name`."""
    out = {}
    for truth in (True, False):
        for found in (True, False):
            key = f"truth {'' if truth else 'not '}{name} / pipeline {'' if found else 'not '}{name}"
            out[key] = sum(1 for pair in pairs if pair == (truth, found))
    return out


def _sample_states(t: dict[str, np.ndarray], i: int, states: np.ndarray, table: dict) -> None:
    """Adds student i's samples to the table truth state -> pipeline state -> count."""
    for step, state in enumerate(states.tolist()):
        truth = "absent" if not t["present"][i, step] else "turned" if t["turned"][i, step] else \
            "bowed" if t["bowed"][i, step] else "visible"
        row = table.setdefault(truth, {})
        row[state or "none"] = row.get(state or "none", 0) + 1


def agreement_of_states(truth, states: dict[str, list[str]], steps: int, fps: float) -> dict:  # type: ignore[no-untyped-def]
    """The seed-001 indicators from the pipeline's per-sample seat states vs the same definitions
    (`client.classroom.indicators`) applied to the generator's truth, per student and 10-s window
    (focus, involvement, engagement) or per student over the lesson (difficulty, and involvement as the
    seed states it: over the session). Expressions are the true ones at the samples where the pipeline
    found the face (an oracle classifier), so what is compared is detection, head posture, tracking and
    bookkeeping, not a model. With the confusion tables and the truth x pipeline table of sample states."""
    t, size = _truth_states(truth), ind.window_size(fps)
    focus, involvement, lesson_passive, triggered, gaps, table = [], [], [], [], [], {}  # type: ignore[var-annotated]
    for i, sid in enumerate(truth["students"].tolist()):
        state = np.array(states[sid])
        detected, down = state == "face", state == "down"
        present_p = np.isin(state, ("face", "turned", "down"))
        labels_p = np.where(detected, truth["label"][i], ind.NO_LABEL)
        labels_t = np.where(t["visible"][i], truth["label"][i], ind.NO_LABEL)
        _sample_states(t, i, state, table)
        for a, b in ind.windows(steps, size):
            if not t["present"][i, a:b].any():
                continue
            focus.append((bool(ind.inattentive(t["visible"][i, a:b], b - a)[0]), bool(ind.inattentive(detected[a:b], b - a)[0])))
            involvement.append((ind.passive(t["bowed"][i, a:b], t["present"][i, a:b]), ind.passive(down[a:b], present_p[a:b])))
            e_p, e_t = ind.engagement(labels_p[a:b]), ind.engagement(labels_t[a:b])
            if e_p == e_p and e_t == e_t:
                gaps.append(abs(e_p - e_t))
        if t["present"][i].any():
            lesson_passive.append((ind.passive(t["bowed"][i], t["present"][i]), ind.passive(down, present_p)))
        triggered.append((bool(ind.difficulty_triggers(labels_t)), bool(ind.difficulty_triggers(labels_p))))
    agree = lambda pairs: round(float(np.mean([a == b for a, b in pairs])), 4)  # noqa: E731
    return {"student_windows": len(focus), "focus_agreement": agree(focus), "involvement_agreement": agree(involvement),
            "involvement_student_agreement": agree(lesson_passive), "difficulty_student_agreement": agree(triggered),
            "students_with_difficulty_truth": sum(a for a, _ in triggered),
            "engagement_mean_abs_gap": round(float(np.mean(gaps)), 4) if gaps else None,
            "confusion": {"focus_windows": _confusion(focus, "inattentive"),
                          "involvement_windows": _confusion(involvement, "passive"),
                          "difficulty_students": _confusion(triggered, "triggered")},
            "sample_states_truth_x_pipeline": table}


def _registry_classifier():  # type: ignore[no-untyped-def]
    """A FER7 classifier with the default model's architecture (hafnet/dp, untrained weights: the time of a
    forward pass does not depend on the weights)."""
    import torch

    from shared_models.config import defaults
    from shared_models.evaluation import logits_of
    from shared_models.models import registry
    from shared_models.transforms import eval_transform

    cfg = defaults()
    model = registry.build(str(cfg["model.name"]), num_classes=len(FER7), preset=str(cfg["model.preset"])).eval()
    size = registry.presets(str(cfg["model.name"]))[str(cfg["model.preset"])].input_size
    transform = eval_transform(size)

    def classify(crops: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            batch = torch.from_numpy(crops).unsqueeze(1).expand(-1, 3, -1, -1)
            return logits_of(model(transform(batch))).argmax(dim=1).numpy()

    return classify, f"{cfg['model.name']}/{cfg['model.preset']}", int(size)


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process, of its finished child processes: the workers)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def lesson_time(minutes: float, unique: int, workdir: Path, workers: int = 2, repeats: int = 2) -> dict:
    """A `minutes` lesson at 1 frame/s from its raw PNG frames to the teacher's report, as
    `fedfer classroom report FRAMES --seat-map ... --empty-frame ...` runs it: timed from the start of the
    analysis (worker processes started, every frame decoded, faces detected, aligned and cropped, seat
    states, every crop classified in memory) to report.md, timeline.csv and the plots written. The model
    is built before the clock starts (a checkpoint load, under a second)."""
    import torch

    from client.classroom.lesson import lesson_from_source
    from client.classroom.report import series_of, write_report
    from client.classroom.sources import _read_image
    from client.classroom.tracks import load_seat_map

    torch.set_num_threads(1)
    room = scenes.make_room(21, 24)
    script = scenes.script_lesson(room, unique, 1.0, seed=2)
    source = scenes.write_lesson(workdir / "unique", room, script)
    frames = workdir / "lesson"
    frames.mkdir()
    total = int(minutes * 60)
    for t in range(total):
        (frames / f"frame_{t:05d}.png").hardlink_to(source / "frames" / f"frame_{t % unique:05d}.png")
    classify, described, size = _registry_classifier()
    seats, empty = load_seat_map(source / "seat_map.json"), _read_image(source / "empty_room.png")
    runs = []
    for r in range(repeats):
        load = load_average()
        wall0, (main0, workers0) = time.perf_counter(), _cpu_seconds()
        lesson, labels = lesson_from_source(frames, seats=seats, empty=empty, size=size, classify=classify,
                                            workers=workers, warn=lambda line: None)
        analysed = time.perf_counter() - wall0
        write_report(workdir / f"report-{r}", lesson, series_of(lesson, labels), 5, False, described)
        wall, (main1, workers1) = time.perf_counter() - wall0, _cpu_seconds()
        runs.append({"wall_s": round(wall, 1), "analysis_and_classification_wall_s": round(analysed, 1),
                     "cpu_s_main_process": round(main1 - main0, 1), "cpu_s_workers": round(workers1 - workers0, 1),
                     # what the wall time would be with the 2 cores to itself: all the CPU work spread over them
                     "wall_s_if_alone_estimate": round((main1 - main0 + workers1 - workers0) / 2.0, 1),
                     "load_average_before": load, "load_average_after": load_average(),
                     "faces": int(lesson.faces_per_step.sum())})
    walls = [run["wall_s"] for run in runs]
    return {"minutes": minutes, "frames": total, "unique_frames": unique, "students": len(room.seats), "model": described,
            "workers": workers, "crop_size": size, "runs": runs, "wall_s_min_median_max": _spread(walls),
            "timed": "raw PNG frames -> report: worker start, decoding, detect+align+crop, seat states, classification "
                     "(main process, batches of 256), indicators, report.md + timeline.csv + 2 plots"}


AGREEMENT_INDICATORS = ("focus_agreement", "involvement_agreement", "involvement_student_agreement",
                        "difficulty_student_agreement", "engagement_mean_abs_gap")


def _states_of(samples: list, students: list[str], steps: int) -> dict[str, list[str]]:
    """student -> state per step, as ingest writes them to observations.csv ("face" where a face was kept)."""
    states = {sid: [""] * steps for sid in students}
    for sample in samples:
        for sid, _, _ in sample.faces:
            states[sid][sample.step] = "face"
        for sid, state in sample.states:
            states[sid][sample.step] = state
    return states


def _one_lesson(k: int, seconds: float, workdir: Path) -> dict:
    """Lesson k (room 31 + k, 24 students, script seed 3 + k) analysed once as ingest analyses it; the
    indicators without the head-posture step and with it (`client.classroom.posture`) vs the truth."""
    from client.classroom.analyse import analyse_lesson
    from client.classroom.posture import PostureFilter
    from client.classroom.sources import _read_image
    from client.classroom.tracks import load_seat_map

    room = scenes.make_room(31 + k, 24)
    folder = scenes.write_lesson(workdir / f"agreement-{k}", room, scenes.script_lesson(room, seconds, 1.0, seed=3 + k))
    seats = load_seat_map(folder / "seat_map.json")
    cpu0 = time.process_time()
    samples = list(analyse_lesson(folder / "frames", seats=seats, empty=_read_image(folder / "empty_room.png"), size=48,
                                  warn=lambda line: None, posture=False))
    cpu1 = time.process_time()
    truth, students = np.load(folder / "truth" / "script.npz"), [s.student_id for s in seats]
    steps = samples[-1].step + 1
    before = agreement_of_states(truth, _states_of(samples, students, steps), steps, 1.0)
    judge = PostureFilter()
    cpu2 = time.process_time()
    judged = [judge(s) for s in samples]
    cpu3 = time.process_time()
    after = agreement_of_states(truth, _states_of(judged, students, steps), steps, 1.0)
    shutil.rmtree(folder, ignore_errors=True)
    return {"room_seed": room.seed, "script_seed": 3 + k, "students": len(seats), "seconds": seconds,
            # the posture step's cost next to the analysis it follows (decoding, detection, crops, seat states)
            "cpu_s_analysis": round(cpu1 - cpu0, 2), "cpu_s_posture": round(cpu3 - cpu2, 4),
            "without_posture": before, "with_posture": after}


def agreement(seconds: float, workdir: Path, lessons: int = 4) -> dict:
    """`lessons` synthetic lessons: per lesson the agreement without and with the head-posture step, and
    per indicator the mean and the min/max over the lessons."""
    per = [_one_lesson(k, seconds, workdir) for k in range(lessons)]
    summary = {}
    for mode in ("without_posture", "with_posture"):
        summary[mode] = {key: {"mean": round(float(np.mean([p[mode][key] for p in per])), 4),
                               "min": min(p[mode][key] for p in per), "max": max(p[mode][key] for p in per)}
                         for key in AGREEMENT_INDICATORS}
    return {"seconds": seconds, "lessons": lessons, "summary": summary, "per_lesson": per}


def _detector_config() -> dict:
    from client.classroom import analyse, search

    return {**facelib.DetectorSettings().__dict__, "seat_side": facelib.SEAT_SIDE,
            "seat_face_range": [facelib.SEAT_MIN_FACE, facelib.SEAT_MAX_FACE], "seat_width_range": list(facelib.SEAT_WIDTH_RANGE),
            "track_margin": facelib.TRACK_MARGIN, "track_sizes": list(facelib.TRACK_SIZES), "track_face_px": facelib.TRACK_FACE_PX,
            "second_pass_roll_deg": facelib.SECOND_PASS_ROLL, "still_difference": search.STILL_DIFFERENCE,
            "recheck_every": search.RECHECK_EVERY, "second_pass_every": search.SECOND_PASS_EVERY, "chunk": analyse.CHUNK}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=6, help="rooms for the accuracy part")
    parser.add_argument("--frames", type=int, default=10, help="frames per room for the accuracy part")
    parser.add_argument("--lesson-minutes", type=float, default=45.0)
    parser.add_argument("--unique", type=int, default=240, help="rendered frames the long lesson cycles through")
    parser.add_argument("--agreement-seconds", type=float, default=240.0)
    parser.add_argument("--agreement-lessons", type=int, default=4,
                        help="synthetic lessons (room 31 + k, script seed 3 + k) for the agreement part")
    parser.add_argument("--parts", default="accuracy,throughput,lesson,agreement")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the lesson part")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the throughput part (lesson: 2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/classroom.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    parts = set(args.parts.split(","))
    record: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "detector": _detector_config(),
                    "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                                "note": "shared machine (other jobs running); CPU time is the steadier figure"}}
    work = Path(tempfile.mkdtemp(prefix="fedfer-classroom-bench-"))
    try:
        if "accuracy" in parts:
            record["accuracy"] = accuracy(args.rooms, args.frames)
            print("accuracy", {m: (v["frontal_recall"], v["precision"]) for m, v in record["accuracy"].items()}, flush=True)
        if "throughput" in parts:
            record["throughput"] = throughput(repeats=args.repeats)
            print("throughput", record["throughput"], flush=True)
        if "agreement" in parts:
            record["agreement"] = agreement(args.agreement_seconds, work, args.agreement_lessons)
            print("agreement", record["agreement"]["summary"], flush=True)
        if "lesson" in parts:
            record["lesson"] = lesson_time(args.lesson_minutes, args.unique, work, args.workers, min(args.repeats, 2))
            print("lesson", record["lesson"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_result(args.out, record, module="simulations.bench.classroom", argv=argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
