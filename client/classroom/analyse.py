"""One lesson's frames -> per sample: the faces (with their seed-004 crops) and the state of every seat.

Shared by `fedfer classroom ingest` (which writes the crops to disk) and `fedfer classroom report` on
raw frames (which classifies them in memory and writes only the report).

The lesson is cut into chunks of `CHUNK` consecutive samples. Within a chunk each sample reuses what the
previous one found (`client.classroom.search.SeatSearch`); a chunk starts with no memory, so chunks are
independent of each other and can be processed in any order, by any number of worker processes, with
the same result: `analyse_lesson` hands them to `workers` processes (frame folders; each worker decodes
its own frames) and yields the samples back in lesson order. With a seat map, the merged samples then go,
in lesson order, through `client.classroom.posture.PostureFilter` (a face found on a bowed or turned head
becomes that seat's state 'down' or 'turned'); it runs in this process on the ordered samples, so it
too gives the same result for any number of workers. Without a seat map the faces are linked
into tracks afterwards, in lesson order (`client.classroom.tracks.IouTracker`), by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from client.classroom import faces as facelib
from client.classroom.posture import PostureFilter
from client.classroom.search import FrameSearch, SeatSearch
from client.classroom.sources import (Sample, SourceError, _read_image, check_fps, frame_files, lesson_frame_size,
                                      read_samples)
from client.classroom.tracks import Seat, assign_to_seats

#: samples per chunk: long enough that restarting the seat memory at a chunk's start costs little
CHUNK = 60
#: mean absolute grey difference (0-255) between a seat and the empty room above which the seat is taken
OCCUPIED_DIFFERENCE = 16.0


@dataclass
class SampleResult:
    step: int
    time: float
    name: str
    faces: list[tuple[str | None, facelib.Face, np.ndarray]] = field(default_factory=list)   # (seat's student or None, face, crop)
    states: list[tuple[str, str]] = field(default_factory=list)    # (student, state) of seats without a face
    unassigned: int = 0
    warnings: list[str] = field(default_factory=list)              # an unreadable frame (the sample is then empty)
    readable: bool = True
    digest: str = ""             # of the decoded frame: tells which reports cover the same minutes (report_record.py)


def seat_state(gray: np.ndarray, empty: np.ndarray | None, seat: Seat, detector: facelib.FaceDetector) -> str:
    """For a seat without a frontal face: absent (looks like the empty room), turned (a profile face),
    down (someone there, no face: the head is bowed), or unseen (no empty-room frame to tell)."""
    import cv2

    if empty is None or empty.shape != gray.shape:
        return "unseen"
    # the box as it lies in the frame: a seat map drawn for another camera position or resolution may put
    # a seat partly or wholly outside it (the seat is then unseen, not an error that ends the lesson)
    height, width = gray.shape[:2]
    x0, y0, x1, y1 = (min(v, limit) for v, limit in zip(seat.box, (width, height, width, height)))
    # the middle of the seat box, where the head is: the edges hold the neighbours' shoulders
    dx, dy = int((x1 - x0) * 0.2), int((y1 - y0) * 0.2)
    if x1 - dx <= x0 + dx or y1 - dy <= y0 + dy:
        return "unseen"
    now = cv2.blur(gray[y0 + dy:y1 - dy, x0 + dx:x1 - dx], (5, 5)).astype(np.float32)
    ref = cv2.blur(empty[y0 + dy:y1 - dy, x0 + dx:x1 - dx], (5, 5)).astype(np.float32)
    # compare shapes, not brightness (the room's light drifts during a lesson); the blur removes sensor noise
    difference = float(np.abs((now - now.mean()) - (ref - ref.mean())).mean())
    if difference < OCCUPIED_DIFFERENCE:
        return "absent"
    return "turned" if detector.profile_in(gray, seat.box) else "down"


def background_difference(frame: np.ndarray, empty: np.ndarray, seats: list[Seat]) -> float | None:
    """How much the room outside the seats differs between a lesson frame and the empty-room frame: the
    mean absolute grey difference after removing each one's mean (the measure `seat_state` uses, where 16
    means "someone is there"), over the frame minus every seat's box widened to hold the student's
    shoulders and desk. None when less than 5 % of the frame is left to compare."""
    import cv2

    height, width = frame.shape[:2]
    background = np.ones((height, width), bool)
    for seat in seats:
        x0, y0, x1, y1 = seat.box
        w, h = x1 - x0, y1 - y0
        background[max(0, int(y0 - h / 2)):max(0, int(min(height, y1 + 2 * h))),
                   max(0, int(x0 - w / 2)):max(0, int(min(width, x1 + w / 2)))] = False
    if background.mean() < 0.05:
        return None
    now = cv2.blur(frame, (5, 5)).astype(np.float32)[background]
    ref = cv2.blur(empty, (5, 5)).astype(np.float32)[background]
    return float(np.abs((now - now.mean()) - (ref - ref.mean())).mean())


def frame_digest(gray: np.ndarray) -> str:
    """A short fingerprint of a decoded frame's pixels: the same frame gives the same digest whether it was
    read from a file, a copy of it or a lossless re-encoding (64 bits: ample for telling frames apart)."""
    import hashlib

    pixels = np.ascontiguousarray(gray)
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()[:16]


class ChunkAnalyser:
    """Samples of one chunk, in order: faces, crops and seat states. `reset()` starts a new chunk."""

    def __init__(self, seats: list[Seat] | None, empty: np.ndarray | None, size: int,
                 detector: facelib.FaceDetector | None = None, reuse: bool = True,
                 frame_size: tuple[int, int] | None = None) -> None:
        self.seats, self.empty, self.size, self.reuse = seats, empty, size, reuse
        self.frame_size = frame_size       # (width, height) of the lesson's frames; others are skipped
        self.detector = detector or facelib.FaceDetector()
        self.reset()

    def reset(self) -> None:
        boxes = [s.box for s in self.seats] if self.seats is not None else []
        self.search = SeatSearch(self.detector, boxes, reuse=self.reuse)
        self.frame_search = FrameSearch(self.detector, reuse=self.reuse)
        self._states: dict[str, str] = {}

    def __call__(self, sample: Sample) -> SampleResult:
        out = SampleResult(sample.step, sample.time, sample.name)
        gray = sample.gray
        height, width = gray.shape[:2]
        if self.frame_size is not None and (width, height) != tuple(self.frame_size):
            # another camera's frame: the seat boxes and the empty room would be read at the wrong places
            out.readable = False
            out.warnings.append(f"{sample.name}: {width} x {height} pixels, not the lesson's "
                                f"{self.frame_size[0]} x {self.frame_size[1]} (another camera?); skipped")
            return out
        out.digest = frame_digest(gray)
        if self.seats is None:
            for face in self.frame_search(gray):
                out.faces.append((None, face, facelib.align_crop(gray, face, self.size)))
            return out
        per_seat = self.search(gray)
        assigned, out.unassigned = assign_to_seats([f for f in per_seat if f is not None], self.seats)
        for k, seat in enumerate(self.seats):
            face = assigned.get(seat.student_id)
            if face is not None:
                out.faces.append((seat.student_id, face, facelib.align_crop(gray, face, self.size)))
                self._states[seat.student_id] = "face"
                continue
            previous = self._states.get(seat.student_id)
            # a seat that looks as it did when last searched keeps the state it had then
            state = previous if self.search.still[k] and previous not in (None, "face") else \
                seat_state(gray, self.empty, seat, self.detector)
            self._states[seat.student_id] = state
            out.states.append((seat.student_id, state))
        return out


_WORKER: dict = {}


def _init_worker(seats: list[Seat] | None, empty: np.ndarray | None, size: int, reuse: bool,
                 frame_size: tuple[int, int] | None) -> None:
    import cv2

    cv2.setNumThreads(1)     # one core per worker: the workers are the parallelism
    _WORKER["analyser"] = ChunkAnalyser(seats, empty, size, reuse=reuse, frame_size=frame_size)


def _file_chunk(job: tuple[list[tuple[int, str]], float]) -> list[SampleResult]:
    """Worker: decode and analyse one chunk of frame files [(step, path)]."""
    files, fps = job
    analyser: ChunkAnalyser = _WORKER["analyser"]
    analyser.reset()
    out = []
    for step, path in files:
        gray = _read_image(Path(path))
        if gray is None:
            out.append(SampleResult(step, step / fps, Path(path).name, readable=False,
                                    warnings=[f"{path}: unreadable frame, skipped"]))
            continue
        out.append(analyser(Sample(step, step / fps, Path(path).name, gray)))
    return out


def analyse_lesson(source: Path, *, seats: list[Seat] | None, empty: np.ndarray | None, size: int, fps: float = 1.0,
                   workers: int = 1, warn: Callable[[str], None] = print, reuse: bool = True,
                   detector: facelib.FaceDetector | None = None, posture: bool = True) -> Iterator[SampleResult]:
    """The lesson's samples in order (unreadable frames are warned about and left out). A frame folder
    with `workers` > 1 is analysed by that many processes, chunk by chunk; a video is decoded in order
    here (its frames come one after the other) and analysed in this process, chunk by chunk as well.
    `posture`: with a seat map, faces of bowed or turned heads become seat states (`PostureFilter`)."""
    judge = PostureFilter() if posture and seats is not None else (lambda sample: sample)
    for sample in _analysed(Path(source), seats, empty, size, fps, workers, warn, reuse, detector):
        yield judge(sample)


def _analysed(source: Path, seats: list[Seat] | None, empty: np.ndarray | None, size: int, fps: float, workers: int,
              warn: Callable[[str], None], reuse: bool, detector: facelib.FaceDetector | None) -> Iterator[SampleResult]:
    check_fps(fps)
    frame_size = lesson_frame_size(source)
    if source.is_dir() and workers > 1:
        files = frame_files(source)
        if not files:
            raise SourceError(f"{source}: no frames (expected .png, .jpg, .jpeg, .bmp files)")
        jobs = [([(step, str(p)) for step, p in enumerate(files[a:a + CHUNK], start=a)], fps)
                for a in range(0, len(files), CHUNK)]
        yield from _parallel(jobs, (seats, empty, size, reuse, frame_size), workers, warn)
        return
    analyser, chunk = ChunkAnalyser(seats, empty, size, detector, reuse, frame_size), 0
    for sample in read_samples(source, fps, warn):
        if sample.step // CHUNK != chunk:      # the same chunk boundaries as the workers use
            chunk = sample.step // CHUNK
            analyser.reset()
        result = analyser(sample)
        for line in result.warnings:
            warn(line)
        if result.readable:
            yield result


def _parallel(jobs: list, init_args: tuple, workers: int, warn: Callable[[str], None]) -> Iterator[SampleResult]:
    import multiprocessing

    # spawn, not fork: the caller may hold torch's or OpenCV's thread pools, which a fork would copy half-made
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=init_args) as pool:
        for chunk in pool.imap(_file_chunk, jobs):
            for result in chunk:
                for line in result.warnings:
                    warn(line)
                if result.readable:
                    yield result
