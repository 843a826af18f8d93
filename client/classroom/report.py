"""`fedfer classroom report`: a trained model over an ingested lesson -> the teacher's report, locally.

Input: a folder `fedfer classroom ingest` wrote (observations.csv, images/, lesson.json). The model
(the federation's global checkpoint, loaded by the command) classifies every face; the seed-001
indicators (`client.classroom.indicators`) are computed per student and aggregated per 10-second
window for the class. Output: report.md, timeline.csv and plots/*.png in the output folder.

What the teacher sees follows the school's report policy (privacy/policy.py `ReportPolicy`): a
class figure only for windows with at least k students in the room (k-anonymity-style suppression
of small groups), and each student's own figures only when the policy allows them. The count is a
lower bound on the students there: with a seat map the seats where someone was seen (a face, a turned
or a bowed head; an 'unseen' seat, which is what every seat without a face is when no empty-room frame
was given, is no evidence of a student), without one the largest number of faces seen at once.
Given the school's record of its reports (`--state-dir`; client/classroom/report_record.py), a window an
earlier report of the same minutes would subtract to fewer than k students is withheld; every report
states that limit in its own Limits section. Nothing is sent anywhere: no network code is reachable from here.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from client.classroom import indicators as ind
from client.classroom.report_record import Withheld
from client.classroom.sources import MAX_FPS
from shared_models.labels import FER7

#: the most samples a lesson may hold (a day at more than 11 per second): lesson.json's count sizes every array
MAX_STEPS = 1_000_000
PRESENT_STATES = ("face", "turned", "down", "unseen")
#: states that show a student is in the seat: the k count uses only these ("unseen" seats may be empty)
SEEN_STATES = ("face", "turned", "down")
Classifier = Callable[[np.ndarray], np.ndarray]     # uint8 (N, S, S) grey crops -> FER7 indices (N,)


class LessonError(ValueError):
    """An ingested lesson folder that cannot be reported on (one line naming the file)."""


@dataclass
class Lesson:
    folder: Path
    fps: float
    steps: int
    seat_map: bool                      # units are roster students (else anonymous tracks)
    bowing_known: bool                  # an empty-room frame told absent, turned and bowed apart
    units: list[str]
    states: dict[str, list[str]]        # unit -> state per step ("" = no row)
    crops: dict[str, dict[int, str]]    # unit -> step -> crop path
    faces_per_step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    frame_digests: list[str] = field(default_factory=list)   # per step ("" unreadable); empty: not recorded


def load_lesson(folder: Path) -> Lesson:
    from shared_models.datasets.base import special_file

    folder = Path(folder)
    meta_path, obs_path = folder / "lesson.json", folder / "observations.csv"
    for path in (meta_path, obs_path):
        if why := special_file(path):
            raise LessonError(f"{path}: unreadable lesson file ({why})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        # csv's own line ends: str.splitlines() also splits at characters csv does not quote (\x1c, \u2028, ...)
        rows = list(csv.DictReader(io.StringIO(obs_path.read_text(encoding="utf-8"), newline="")))
    except FileNotFoundError as exc:
        raise LessonError(f"{exc.filename}: not found (is {folder} a folder `fedfer classroom ingest` wrote?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LessonError(f"{folder}: unreadable lesson ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(meta, dict) or "samples" not in meta or "fps" not in meta:
        raise LessonError(f"{meta_path}: missing 'samples' or 'fps'")
    steps, fps = meta.get("steps", meta["samples"]), meta["fps"]
    # written by ingest, but a file a person may have edited: a bad value is one line, not a traceback
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise LessonError(f"{meta_path}: 'steps' must be a whole number in 0..{MAX_STEPS}, got {steps!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_FPS:
        raise LessonError(f"{meta_path}: 'fps' must be a number in (0, {MAX_FPS:g}], got {fps!r}")
    seat_map = bool(meta.get("students"))
    digests = meta.get("frame_digests")
    # a lesson ingested before digests were recorded (or an edited list) has none: the report then says it
    # could not be checked against earlier reports of the same minutes
    if not (isinstance(digests, list) and len(digests) == steps and all(isinstance(d, str) for d in digests)):
        digests = []
    lesson = Lesson(folder, float(fps), steps, seat_map, bool(meta.get("empty_room_frame")), [], {}, {},
                    np.zeros(steps, np.int64), digests)
    for line, row in enumerate(rows, start=2):
        try:
            step = int(row["step"])
            unit = row["student_id"] if seat_map else row["track"]
            state = row["state"]
            path = row["path"]
        except (KeyError, TypeError, ValueError):
            raise LessonError(f"{obs_path} line {line}: needs step, student_id, state, path and track") from None
        if not 0 <= step < max(steps, 1) or state not in PRESENT_STATES + ("absent",):
            raise LessonError(f"{obs_path} line {line}: step or state out of range")
        if unit not in lesson.states:
            lesson.units.append(unit)
            lesson.states[unit] = [""] * steps
            lesson.crops[unit] = {}
        lesson.states[unit][step] = state
        if state == "face":
            lesson.crops[unit][step] = path
            lesson.faces_per_step[step] += 1
    return lesson


def classify_lesson(lesson: Lesson, classify: Classifier, batch: int = 256) -> dict[str, np.ndarray]:
    """unit -> FER7 index per step (NO_LABEL where there is no face); unreadable crops stay unlabelled."""
    import cv2

    from shared_models.datasets.base import not_regular_file

    labels = {u: np.full(lesson.steps, ind.NO_LABEL, np.int64) for u in lesson.units}
    jobs = [(u, t, p) for u in lesson.units for t, p in sorted(lesson.crops[u].items())]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        images, keep = [], []
        for u, t, rel in chunk:
            # a crop path that is not a file (a named pipe would block the read) stays unlabelled
            crop = None if not_regular_file(lesson.folder / rel) else cv2.imread(str(lesson.folder / rel),
                                                                                 cv2.IMREAD_GRAYSCALE)
            if crop is not None:
                images.append(crop)
                keep.append((u, t))
        if images:
            for (u, t), label in zip(keep, np.asarray(classify(np.stack(images))).tolist()):
                labels[u][t] = int(label)
    return labels


def series_of(lesson: Lesson, labels: dict[str, np.ndarray]) -> list[ind.StudentSeries]:
    out = []
    for unit in lesson.units:
        states = np.array(lesson.states[unit])
        detected = states == "face"
        present = np.isin(states, PRESENT_STATES) if lesson.seat_map else detected
        out.append(ind.StudentSeries(unit, detected, present, states == "down", labels[unit]))
    return out


@dataclass
class Window:
    start: float                 # seconds
    end: float
    in_room: int                 # students counted for k (see the module docstring)
    shown: bool                  # in_room >= k
    expressions_shown: bool = False   # shown, and at least k of the students had a face classified (mix, engagement)
    inattentive: float = math.nan     # share of the students in the room inattentive (focus)
    engagement: float = math.nan      # share of the class's detections happy or surprise
    passive: float = math.nan         # share of the students in the room with the head bowed > 50 % (involvement)
    difficulty: int = 0               # students whose 30-in-a-row distress run completed in the window
    mix: list[int] = field(default_factory=lambda: [0] * len(FER7))
    # whose data the figures are made of (never written out): the students in the seats (presence figures,
    # difficulty) and those whose faces were classified (mix, engagement); report_record.py compares them
    # with earlier reports of the same minutes
    present_units: frozenset[str] = frozenset()
    classified_units: frozenset[str] = frozenset()
    withheld: bool = False            # shown by k, but withheld: an earlier report of these minutes would subtract


def class_timeline(lesson: Lesson, series: list[ind.StudentSeries], k: int) -> list[Window]:
    """The class's indicators per focus window (10 s); windows with fewer than k students are suppressed."""
    size = ind.window_size(lesson.fps)
    triggers = {s.student: ind.difficulty_triggers(s.labels) for s in series}
    out = []
    for a, b in ind.windows(lesson.steps, size):
        here = [s for s in series if s.present[a:b].any()]
        # a lower bound on the students there, so that suppression errs on the side of hiding
        count = sum(1 for s in series if np.isin(lesson.states[s.student][a:b], SEEN_STATES).any()) \
            if lesson.seat_map else int(lesson.faces_per_step[a:b].max(initial=0))
        w = Window(a / lesson.fps, b / lesson.fps, count, count >= k)
        if not w.shown:
            out.append(w)
            continue
        # the expression mix and engagement describe only the students whose faces were classified in the
        # window, who may be far fewer than those in the room (heads bowed or turned): they need k of their own
        w.present_units = frozenset(s.student for s in here)
        w.classified_units = frozenset(s.student for s in series if (s.labels[a:b] != ind.NO_LABEL).any())
        classified = len(w.classified_units)
        w.expressions_shown = (classified if lesson.seat_map else min(classified, count)) >= k
        if w.expressions_shown:
            labels = np.concatenate([s.labels[a:b] for s in series])
            seen = labels[labels != ind.NO_LABEL]
            w.mix = np.bincount(seen, minlength=len(FER7))[:len(FER7)].tolist()
            w.engagement = ind.engagement(labels)
        if here:
            w.inattentive = float(np.mean([ind.inattentive(s.detected[a:b], b - a)[0] for s in here]))
            if lesson.bowing_known:
                w.passive = float(np.mean([ind.passive(s.bowed[a:b], s.present[a:b]) for s in here]))
        w.difficulty = sum(1 for s in series if any(a <= t < b for t in triggers[s.student]))
        out.append(w)
    return out


def student_rows(lesson: Lesson, series: list[ind.StudentSeries]) -> list[dict]:
    """Each student's own lesson figures (shown only when the school's policy allows per-student figures)."""
    size = ind.window_size(lesson.fps)
    rows = []
    for s in series:
        if not s.present.any():
            continue
        flags = ind.inattentive(s.detected, size)
        present_windows = [s.present[a:b].any() for a, b in ind.windows(lesson.steps, size)]
        inatt = float(np.mean(flags[np.array(present_windows)])) if any(present_windows) else math.nan
        bowed = ind.bowed_share(s.bowed, s.present) if lesson.bowing_known else math.nan
        rows.append({"student": s.student, "present_s": float(s.present.sum() / lesson.fps), "inattentive": inatt,
                     "engagement": ind.engagement(s.labels), "bowed": bowed,
                     "passive": bool(bowed == bowed and bowed > ind.PASSIVE_SHARE),
                     "difficulty_at": [t / lesson.fps for t in ind.difficulty_triggers(s.labels)]})
    return rows


def write_timeline_csv(path: Path, windows: list[Window]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["start_s", "end_s", "students", "shown", "inattentive_share", "engagement",
                         "passive_share", "difficulty_students", *FER7])
        for w in windows:
            values = [w.inattentive, w.engagement, w.passive] if w.shown else [math.nan] * 3
            writer.writerow([f"{w.start:.0f}", f"{w.end:.0f}", w.in_room if w.shown else "", int(w.shown),
                             *("" if v != v else f"{v:.3f}" for v in values), w.difficulty if w.shown else "",
                             *(w.mix if w.expressions_shown else [""] * len(FER7))])


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100.0 * value:.0f} %"


def _moments(windows: list[Window]) -> list[str]:
    moments = [w for w in windows if w.shown and w.difficulty]
    if not moments:
        return ["No difficulty moment: no student showed anger or distress in 30 detections in a row."]
    return [f"- {w.start / 60:.1f}-{w.end / 60:.1f} min: {w.difficulty} student(s) completed 30 distress detections "
            f"in a row" for w in moments]


def _summary(lesson: Lesson, windows: list[Window], k: int) -> list[str]:
    shown = [w for w in windows if w.shown]
    mix = np.sum([w.mix for w in shown], axis=0) if shown else np.zeros(len(FER7))
    total = max(1, int(mix.sum()))
    withheld = sum(w.withheld for w in windows)
    lines = [f"- windows of {ind.FOCUS_WINDOW_SECONDS:.0f} s: {len(windows)}, shown {len(shown)}, "
             f"suppressed (fewer than {k} students) {len(windows) - len(shown) - withheld}"
             + (f", withheld {withheld} (an earlier report of the same minutes would subtract; see Limits)"
                if withheld else "")
             + f"; expressions suppressed in {sum(not w.expressions_shown for w in shown)} of the shown "
               f"(fewer than {k} students' faces, or withheld)"]
    if shown:
        lines += [f"- focus: on average {_pct(float(np.nanmean([w.inattentive for w in shown])))} of the students "
                  "in the room were inattentive in a window (face seen in less than half of it)",
                  f"- engagement: {_pct(float(mix[[FER7.index(c) for c in ind.ENGAGED_CLASSES]].sum() / total))} of "
                  "the detected faces were happy or surprised",
                  "- involvement: " + (f"on average {_pct(float(np.nanmean([w.passive for w in shown])))} of the "
                                       "students had the head bowed more than half of a window"
                                       if lesson.bowing_known else "not measured (no empty-room frame at ingest, so "
                                       "bowed heads cannot be told from empty seats)"),
                  "- expressions: " + ", ".join(f"{name} {100 * mix[j] / total:.0f} %" for j, name in enumerate(FER7))]
    return lines


def _limits(lesson: Lesson, record: Path | None, withheld: Withheld, k: int) -> list[str]:
    """The report's own statement of what its privacy rules do not cover (docs/privacy.md "Classroom cameras")."""
    lines = ["## Limits", "",
             f"These figures are not differentially private. A window is shown only over at least {k} students, so "
             "this report alone does not describe fewer children, but two reports of the same minutes whose students "
             "differ (a seat left out of the seat map, a child's face blurred in the frames) can be subtracted to "
             "give the figures of the children in one and not in the other."]
    if record is None:
        lines.append("This report was not checked against earlier reports of the same lesson, nor recorded for later "
                     "ones: it was made without `--state-dir`.")
    elif not withheld.checked:
        lines.append("This report was not checked against earlier reports: its lesson folder has no frame digests "
                     "(ingested by an older fedfer); ingest the lesson again.")
    else:
        lines.append(f"Checked against the reports made before with the record {record.name} in the school's state "
                     f"folder: {withheld.windows} window(s) withheld and {withheld.expressions} window(s)' expressions "
                     f"withheld, because their students differed from an earlier report's of the same minutes by fewer "
                     f"than {k} or singled a child out with earlier reports. Not checked: reports made without "
                     "`--state-dir`, frames altered in their pixels, combinations of three or more windows that "
                     "only overlap (a lesson cut at another second), the same lesson from a lossy video and from "
                     "its frames, and a child seen differently rather than left out (e.g. a seat box moved).")
    return lines


def write_report(out_dir: Path, lesson: Lesson, series: list[ind.StudentSeries], k: int, per_student: bool,
                 model: str, policy_applied: str = "", record: Path | None = None) -> Path:
    """report.md + timeline.csv + plots/ in `out_dir`; returns the report's path. `policy_applied`: the line
    saying which school policy (or the defaults) gave k and the per-student switch. `record`: the school's
    record of the reports it gave (client/classroom/report_record.py): windows an earlier report of the
    same minutes would subtract to fewer than k students are withheld, and this report is added to it."""
    from client.classroom.report_record import read_record, record_line, withhold_differencing
    from shared_models.atomic_files import append_line, locked

    if lesson.steps == 0:     # nothing was readable (every frame unreadable, a video that does not decode)
        raise LessonError(f"{lesson.folder}: no readable sample; no report written")
    windows = class_timeline(lesson, series, k)
    withheld = Withheld()
    if record is not None:
        # recorded before the report is written: a report that then fails to be written is still counted
        # as given, which errs on the side of withholding the next one
        try:
            with locked(record):
                try:
                    released = read_record(record)
                except (UnicodeDecodeError, ValueError) as exc:
                    raise LessonError(f"{record}: unreadable report record ({' '.join(str(exc).split())[:120]})") from None
                withheld = withhold_differencing(windows, lesson.frame_digests, lesson.fps, lesson.seat_map, k, released)
                if line := record_line(windows, lesson.frame_digests, lesson.fps, lesson.seat_map):
                    append_line(record, line)
        except OSError as exc:   # a state folder that is read-only here, or a disk that is full
            raise LessonError(f"{record}: cannot read or add to the report record ({' '.join(str(exc).split())[:120]}); "
                              "no report written") from None
    # written into a staging folder beside `out_dir` and moved in when complete: an interrupted or failed
    # run leaves the previous report as it was, never a report.md beside another run's timeline.csv
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _write_report_files(staging, lesson, series, windows, k, per_student, model, policy_applied, record, withheld)
        out_dir.mkdir(exist_ok=True)
        (out_dir / "report.md").unlink(missing_ok=True)   # first out, last in: report.md only over a whole set
        shutil.rmtree(out_dir / "plots", ignore_errors=True)
        os.replace(staging / "timeline.csv", out_dir / "timeline.csv")
        os.replace(staging / "plots", out_dir / "plots")
        os.replace(staging / "report.md", out_dir / "report.md")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / "report.md"


def _write_report_files(out_dir: Path, lesson: Lesson, series: list[ind.StudentSeries], windows: list[Window], k: int,
                        per_student: bool, model: str, policy_applied: str, record: Path | None,
                        withheld: Withheld) -> None:
    from client.classroom import plots

    write_timeline_csv(out_dir / "timeline.csv", windows)
    plots.expression_mix(windows, out_dir / "plots" / "expressions.png", k)
    plots.indicators(windows, out_dir / "plots" / "indicators.png", k)
    unit = "students (seat map)" if lesson.seat_map else "anonymous face tracks (no seat map)"
    lines = [f"# Lesson report: {lesson.folder.name}", "",
             f"{lesson.steps} samples at {lesson.fps:g} per second ({lesson.steps / lesson.fps / 60:.1f} min); "
             f"model {model}; computed on this machine, nothing was sent anywhere.", "",
             f"Privacy: class figures only for windows with at least {k} students in the room; per-student figures "
             f"{'shown (the school policy allows them)' if per_student else 'not shown (school policy)'}; "
             f"units: {unit}.", *([f"{policy_applied[:1].upper()}{policy_applied[1:]}."] if policy_applied else []),
             "", "## The class", "", *_summary(lesson, windows, k), "",
             "![expressions](plots/expressions.png)", "", "![indicators](plots/indicators.png)", "",
             "## Difficulty moments", "", *_moments(windows), "",
             "Per-window figures: timeline.csv. Indicator definitions: seed 001 (docs/classroom.md).", "",
             *_limits(lesson, record, withheld, k)]
    if per_student:
        lines += ["", "## Students", "", "| student | in room (s) | inattentive windows | engagement | head bowed | "
                  "passive | difficulty at (s) |", "|---|---|---|---|---|---|---|"]
        for r in student_rows(lesson, series):
            lines.append(f"| {r['student']} | {r['present_s']:.0f} | {_pct(r['inattentive'])} | {_pct(r['engagement'])} | "
                         f"{_pct(r['bowed'])} | {'yes' if r['passive'] else 'no'} | "
                         f"{', '.join(f'{t:.0f}' for t in r['difficulty_at']) or '-'} |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
