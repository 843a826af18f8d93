"""`fedfer classroom ingest`: a lesson's frames -> a school folder of normalised faces, inside the school.

Output folder:

    images/<step>-<unit>.png   seed-004 normalised faces (grey, equalised, size x size)
    observations.csv           one row per sample and unit: step,time,frame,student_id,state,x,y,w,h,
                               eyes_found,angle,path   (state: face | turned | down | absent | unseen)
    lesson.json                what was read, the privacy unit, the crop framing, what was skipped
    labels.csv                 path,label,student_id: only when the school gave a label file (the
                               folder then trains like any school folder); without one the folder is
                               for the lesson report only

Privacy unit: with a seat map, `student_id` is the roster id of the seat (the same student across
lessons); without one every row carries one id for the whole folder (`FOLDER_UNIT`), so the unit is
never smaller than a student (docs/privacy.md, "Classroom cameras").
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from client.classroom import faces as facelib
from client.classroom.analyse import SampleResult, analyse_lesson
from client.classroom.tracks import IouTracker, Seat, SeatMapError, load_seat_map
from shared_models.labels import FER7

FOLDER_UNIT = "whole-folder"
OBSERVATION_HEADER = ("step", "time", "frame", "student_id", "state", "x", "y", "w", "h", "eyes_found", "angle", "path")
MAX_WARNINGS = 20


class IngestError(ValueError):
    """The lesson cannot be ingested at all (one line naming the file)."""


@dataclass
class IngestReport:
    samples: int = 0
    steps: int = 0              # sample indices run 0..steps-1 (unreadable frames keep their index)
    unreadable: int = 0
    without_faces: int = 0
    faces: int = 0
    unassigned: int = 0
    labelled: int = 0
    warnings: list[str] = field(default_factory=list)


class _Warner:
    """Prints the first MAX_WARNINGS problems in full and counts the rest."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo, self.count = echo, 0

    def __call__(self, line: str) -> None:
        self.count += 1
        if self.count <= MAX_WARNINGS:
            # one line per problem: a file name may hold a line break (and with it a forged line)
            self.echo("".join(c if c.isprintable() else repr(c)[1:-1] for c in line))
        elif self.count == MAX_WARNINGS + 1:
            self.echo("... further problems are counted in lesson.json")


MAX_LABEL_CELL = 4096   # a frame name, a student id or a label: far shorter in any real label file


def read_label_file(path: Path) -> dict[tuple[str, str], int]:
    """{(frame, student_id): FER7 index} from a CSV with columns frame,student_id,label (frame: the frame's
    file name, or its sample number). Unknown labels are an error naming the line."""
    from shared_models.datasets.base import special_file

    if why := special_file(path):
        raise IngestError(f"{path}: cannot read the label file ({why})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"{path}: cannot read the label file ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    try:
        missing = [c for c in ("frame", "student_id", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise IngestError(f"{path}: missing column(s) {', '.join(missing)} (expected frame,student_id,label)")
        out: dict[tuple[str, str], int] = {}
        for line, row in enumerate(reader, start=2):
            # csv's own field limit is process-wide (a benchmark reader raises it), so the bound is kept here
            if any(isinstance(v, str) and len(v) > MAX_LABEL_CELL for v in row.values()):
                raise IngestError(f"{path} line {line}: not a CSV row of a label file (a cell longer than "
                                  f"{MAX_LABEL_CELL:,} characters)")
            label = (row.get("label") or "").strip().lower()
            if label not in FER7:
                raise IngestError(f"{path} line {line}: unknown label {row.get('label')!r} (expected one of {', '.join(FER7)})")
            out[((row.get("frame") or "").strip(), (row.get("student_id") or "").strip())] = FER7.index(label)
    except csv.Error as exc:   # a cell over csv's field limit (a megabyte frame name was an internal error)
        raise IngestError(f"{path} line {reader.line_num + 1}: not a CSV row ({exc})") from None   # the line it failed in
    return out


class _Output:
    """The folder being written: crops, observations.csv and (with a label file) labels.csv."""

    def __init__(self, out_dir: Path, labels: dict[tuple[str, str], int] | None) -> None:
        self.out_dir = out_dir
        # a second lesson into the same folder would overwrite some crops and keep others, beside a labels.csv
        # of the first: a school folder that trains on faces with another lesson's labels
        # (a refused or failed ingest that wrote no crop leaves nothing that counts: the same command may retry)
        crops = (out_dir / "images").is_dir() and any((out_dir / "images").iterdir())
        if (out_dir / "lesson.json").exists() or crops:
            raise IngestError(f"{out_dir}: already holds an ingested lesson ({'lesson.json' if not crops else 'images/'}); "
                              "ingest into a new folder, or delete this one first")
        # what this run creates, so that an interrupted or failed run can take it away again (`discard`):
        # crops left behind would make the folder refuse the re-run ("already holds an ingested lesson")
        self.created_dirs = [d for d in (out_dir, out_dir / "images") if not d.exists()]
        self.crops_written: list[Path] = []
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        self._obs_file = open(out_dir / "observations.csv", "w", newline="", encoding="utf-8")
        self.observations = csv.writer(self._obs_file)
        self.observations.writerow(OBSERVATION_HEADER + ("track",))
        self.labels = labels
        self.label_rows: list[tuple[str, str, str]] = []

    def face(self, sample: SampleResult, unit: str, track: str, face: facelib.Face, crop: np.ndarray) -> None:
        import cv2

        rel = f"images/{sample.step:06d}-{track}.png"
        self.crops_written.append(self.out_dir / rel)
        if not cv2.imwrite(str(self.out_dir / rel), crop, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise IngestError(f"{self.out_dir / rel}: could not write the face crop (disk full or not writable?)")
        x, y, w, h = face.box
        self.observations.writerow((sample.step, f"{sample.time:.3f}", sample.name, unit, "face", x, y, w, h,
                                    int(face.eyes_found), f"{face.angle:.2f}", rel, track))
        if self.labels is not None:
            label = self.labels.get((sample.name, unit), self.labels.get((str(sample.step), unit)))
            if label is not None:
                self.label_rows.append((rel, FER7[label], unit))

    def state(self, sample: SampleResult, unit: str, state: str) -> None:
        self.observations.writerow((sample.step, f"{sample.time:.3f}", sample.name, unit, state, "", "", "", "", "", "", "",
                                    unit))

    def discard(self) -> None:
        """Remove everything this run wrote (the run did not finish): crops, observations.csv, labels.csv,
        and the folders it created when they are left empty. A folder that held other files keeps them."""
        self._obs_file.close()
        for path in [*self.crops_written, self.out_dir / "observations.csv", self.out_dir / "labels.csv"]:
            path.unlink(missing_ok=True)
        for folder in reversed(self.created_dirs):
            try:
                folder.rmdir()
            except OSError:   # not empty: something else is in it
                pass

    def close(self) -> None:
        self._obs_file.close()
        if self.labels is not None:
            with open(self.out_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(("path", "label", "student_id"))
                writer.writerows(self.label_rows)


def _inputs(seat_map: Path | None, labels: Path | None, empty_frame: Path | None, warn: Callable[[str], None],
            source: Path | None = None) -> tuple[list[Seat] | None, dict[tuple[str, str], int] | None, np.ndarray | None]:
    """The optional inputs; a corrupt one is reported in one line and the lesson goes on without it. With
    `source`, the seat map and the empty-room frame are checked against the size of the lesson's frames."""
    from client.classroom.analyse import OCCUPIED_DIFFERENCE, background_difference
    from client.classroom.sources import _read_image, lesson_frame_size, middle_frame

    seats = None
    if seat_map is not None:
        try:
            seats = load_seat_map(seat_map)
        except SeatMapError as exc:
            warn(f"{exc}; ingesting without it (one privacy unit for the whole folder)")
    label_map = None
    if labels is not None:
        if seats is None:
            warn(f"{labels}: labels need a seat map (they name students); ignored, the folder is for analytics only")
        else:
            label_map = read_label_file(labels)
    empty = None
    if empty_frame is not None:
        empty = _read_image(empty_frame)
        if empty is None:
            warn(f"{empty_frame}: unreadable empty-room frame; absent and bowed students are not told apart")
    frame_size = lesson_frame_size(source) if source is not None else None
    if frame_size is not None:
        width, height = frame_size
        if empty is not None and empty.shape[:2] != (height, width):
            # every seat would silently stay 'unseen' while the report claimed to measure involvement
            warn(f"{empty_frame}: the empty-room frame is {empty.shape[1]} x {empty.shape[0]} pixels, the lesson's "
                 f"frames {width} x {height} (another camera?); ignored, absent and bowed students are not told apart")
            empty = None
        frame = middle_frame(source) if empty is not None and seats else None
        if frame is not None and frame.shape[:2] == (height, width):
            difference = background_difference(frame, empty, seats)
            if difference is not None and difference >= OCCUPIED_DIFFERENCE:
                # the room around the seats differs as much as an occupied seat does from an empty one: another
                # room or camera position, against which every seat would be judged wrongly absent or bowed
                warn(f"{empty_frame}: does not look like this lesson's room outside the seats (difference "
                     f"{difference:.0f} grey levels, {OCCUPIED_DIFFERENCE:.0f} means someone is there; another room or "
                     f"camera position?); ignored, absent and bowed students are not told apart. Take a new empty-room "
                     f"frame with the camera where it is now")
                empty = None
        for seat in seats or []:
            x0, y0, x1, y1 = seat.box
            if x0 >= width or y0 >= height:
                warn(f"{seat_map}: seat {seat.student_id}'s box {list(seat.box)} lies outside the {width} x {height} "
                     f"frame (a seat map for another camera?); that seat stays unseen")
    return seats, label_map, empty


def ingest(source: Path, out_dir: Path, *, seat_map: Path | None = None, labels: Path | None = None,
           empty_frame: Path | None = None, size: int = 64, fps: float = 1.0, echo: Callable[[str], None] = print,
           detector: facelib.FaceDetector | None = None, workers: int = 1, posture: bool = True) -> IngestReport:
    """Detect, align, crop and track every face of the lesson at `source` into `out_dir` (`workers`
    processes for a frame folder; the output does not depend on how many). `posture`: with a seat map,
    faces of bowed or turned heads are recorded as the states 'down' / 'turned' (`client.classroom.posture`)."""
    from client.classroom.sources import check_fps

    check_fps(fps)   # before anything is written: a refused command leaves no half-made folder behind
    warn = _Warner(echo)
    seats, label_map, empty = _inputs(seat_map, labels, empty_frame, warn, Path(source))
    report = IngestReport()
    digests: dict[int, str] = {}
    out = _Output(Path(out_dir), label_map)
    tracker = IouTracker()

    def unreadable(line: str) -> None:
        report.unreadable += 1
        warn(line)

    try:   # an interruption (Ctrl-C) or a failure leaves no half-written folder: the same command may run again
        for sample in analyse_lesson(Path(source), seats=seats, empty=empty, size=size, fps=fps, workers=workers,
                                     warn=unreadable, detector=detector, posture=posture):
            report.samples += 1
            report.steps = sample.step + 1
            digests[sample.step] = sample.digest
            report.unassigned += sample.unassigned
            if seats is not None:
                for unit, face, crop in sample.faces:
                    out.face(sample, str(unit), str(unit), face, crop)
                for unit, state in sample.states:
                    out.state(sample, unit, state)
            else:
                crops = {id(face): crop for _, face, crop in sample.faces}
                for track, face in tracker.update(sample.step, [face for _, face, _ in sample.faces]).items():
                    out.face(sample, FOLDER_UNIT, track, face, crops[id(face)])
            report.faces += len(sample.faces)
            if not sample.faces:
                report.without_faces += 1
                warn(f"{sample.name}: no faces found")
        if report.samples == 0:   # e.g. one video this OpenCV build cannot decode: a failure, not an empty lesson
            # (a folder left behind would refuse the same command once the input is fixed)
            raise IngestError(f"{source}: nothing readable ({report.unreadable} unreadable input(s)); nothing written, "
                              "no school folder to train on")
        out.close()
        report.labelled = len(out.label_rows)
        _write_lesson_json(Path(out_dir), Path(source), report, seats, label_map is not None, empty is not None, size,
                           fps, [digests.get(step, "") for step in range(report.steps)])
    except BaseException:
        out.discard()
        raise
    return report


def _write_lesson_json(out_dir: Path, source: Path, report: IngestReport, seats: list[Seat] | None, labelled: bool,
                       empty: bool, size: int, fps: float, digests: list[str]) -> None:
    from shared_models.atomic_files import atomic_write_text

    doc = {
        "source": source.name, "fps": fps, "samples": report.samples, "steps": report.steps,
        "unreadable": report.unreadable,
        "without_faces": report.without_faces, "faces": report.faces, "unassigned_faces": report.unassigned,
        "labelled_faces": report.labelled,
        "privacy_unit": "student (seat map: one roster id per seat)" if seats is not None else
                        f"the whole folder ({FOLDER_UNIT}): no seat map, so no face is tied to a student",
        "students": [s.student_id for s in seats] if seats is not None else [],
        "empty_room_frame": empty,
        "crop": {"size": size, "framing": "seed 004: eyes levelled; 2d x 2d around the eyes (d = eye distance), "
                                          "0.5 d above the eye line; grey, histogram-equalised"},
        "use": "training and lesson report" if labelled else "lesson report only (no labels.csv)",
        # per sample, a digest of the frame's pixels ("" unreadable): lets `fedfer classroom report --state-dir`
        # recognise two reports of the same minutes (docs/classroom.md, "Two reports of the same lesson")
        "frame_digests": digests,
    }
    atomic_write_text(out_dir / "lesson.json", json.dumps(doc, indent=1) + "\n")
