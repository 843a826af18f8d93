"""Where a lesson's frames come from: a folder of still frames or a video file.

- a folder: `*.png`, `*.jpg`, `*.jpeg`, `*.bmp` (any case), in name order; the frames are taken to be
  one sample each at the rate the caller states (`fps`, default one frame per second);
- a video file: whatever the FFmpeg build inside opencv-python-headless decodes (MP4/H.264, AVI/MJPEG,
  MKV, MOV, WebM/VP8-VP9, ...); frames are sampled at `fps` by their timestamps.

An unreadable frame or video is reported in one line naming the file and skipped; the rest of the
lesson is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_FRAME_PIXELS = 4096 * 4096
#: the highest sampling rate taken (samples per second): far above any camera's, and a finite bound keeps
#: every time and window size the indicators compute from it finite (`--fps inf` was an OverflowError)
MAX_FPS = 1000.0
#: the largest frame file read: an uncompressed 32-bit BMP of MAX_FRAME_PIXELS and its header
MAX_FRAME_BYTES = 4 * MAX_FRAME_PIXELS + (1 << 20)


class SourceError(ValueError):
    """The lesson cannot be read at all (one line naming the path)."""


def check_fps(fps: float) -> None:
    """SourceError unless 0 < fps <= MAX_FPS (NaN and infinity included)."""
    if not 0 < fps <= MAX_FPS:
        raise SourceError(f"sampling rate must be > 0 and at most {MAX_FPS:g} frames per second, got {fps}")


@dataclass(frozen=True)
class Sample:
    step: int                 # sample index in the lesson
    time: float               # seconds from the start
    name: str                 # frame file name, or "<video>@<seconds>"
    gray: np.ndarray          # uint8 (H, W)


def frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_image(path: Path) -> np.ndarray | None:
    """The frame as uint8 grey, or None when it cannot or should not be read. Checked before anything is
    decoded: a named pipe would block the read, and a small file whose header claims gigapixels (a
    decompression bomb) would take gigabytes and seconds to decode before its size could be refused."""
    import os

    import cv2
    from PIL import Image, UnidentifiedImageError

    from shared_models.datasets.base import ImageRefused, open_checked_image

    try:
        if os.stat(path).st_size > MAX_FRAME_BYTES:
            return None
        with open_checked_image(path) as header:
            width, height = header.size
    except (ImageRefused, UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        return None
    if width * height > MAX_FRAME_PIXELS:
        return None
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    gray = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if gray is None or gray.size > MAX_FRAME_PIXELS:
        return None
    return gray


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding it; None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    from shared_models.datasets.base import ImageRefused, open_checked_image

    try:
        with open_checked_image(path) as header:
            return tuple(header.size)   # type: ignore[return-value]
    except (ImageRefused, UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        return None


def lesson_frame_size(source: Path) -> tuple[int, int] | None:
    """The lesson's frame size (width, height): the size most of a folder's frames have (read from their
    headers; a fixed camera gives every frame one size), or a video's; None when nothing is readable.
    A frame of another size, an empty-room frame or a seat map made for another camera does not fit it."""
    from collections import Counter

    source = Path(source)
    if source.is_dir():
        sizes = Counter(size for size in map(_header_size, frame_files(source)) if size is not None)
        return sizes.most_common(1)[0][0] if sizes else None
    import cv2

    from shared_models.datasets.base import not_regular_file

    if not source.exists() or not_regular_file(source) is not None:
        return None
    capture = cv2.VideoCapture(str(source))
    try:
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()
    return (width, height) if width > 0 and height > 0 else None


def middle_frame(source: Path) -> np.ndarray | None:
    """One frame of the lesson, grey: a folder's middle frame (the first readable one from there on), or a
    video's first frame; None when none can be read."""
    source = Path(source)
    if source.is_dir():
        files = frame_files(source)
        for path in files[len(files) // 2:] + files[:len(files) // 2]:
            gray = _read_image(path)
            if gray is not None:
                return gray
        return None
    samples = _video_samples(source, 1.0, lambda line: None) if source.is_file() else iter(())
    first = next(samples, None)
    samples.close() if hasattr(samples, "close") else None
    return first.gray if first is not None else None


def read_samples(source: str | Path, fps: float = 1.0, warn: Callable[[str], None] = print) -> Iterator[Sample]:
    """The lesson's samples in order. `warn` receives one line per frame or video that cannot be read."""
    source = Path(source)
    check_fps(fps)
    if source.is_dir():
        files = frame_files(source)
        if not files:
            raise SourceError(f"{source}: no frames (expected {', '.join(IMAGE_SUFFIXES)} files)")
        for step, path in enumerate(files):
            gray = _read_image(path)
            if gray is None:
                warn(f"{path}: unreadable frame, skipped")
                continue
            yield Sample(step, step / fps, path.name, gray)
        return
    if not source.exists():
        raise SourceError(f"{source}: no such file or folder")
    yield from _video_samples(source, fps, warn)


def _video_samples(path: Path, fps: float, warn: Callable[[str], None]) -> Iterator[Sample]:
    import cv2

    from shared_models.datasets.base import not_regular_file

    why = not_regular_file(path)
    if why is not None:            # a named pipe would block the decoder until someone writes to it
        warn(f"{path}: unreadable video ({why}), skipped")
        return
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        warn(f"{path}: unreadable video (not a format this OpenCV build decodes), skipped")
        return
    try:
        width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
        if width * height > MAX_FRAME_PIXELS:
            warn(f"{path}: video frames of {width:.0f}x{height:.0f} pixels, more than {MAX_FRAME_PIXELS:,}; skipped")
            return
        native = capture.get(cv2.CAP_PROP_FPS) or 0.0
        period = 1.0 / fps
        next_time, index, step = 0.0, 0, 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            t = index / native if native > 0 else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            index += 1
            if t + 1e-6 < next_time:
                continue
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
            yield Sample(step, step * period, f"{path.name}@{step * period:.1f}s", gray)
            step += 1
            next_time = step * period
        if step == 0:
            warn(f"{path}: unreadable video (no frame decoded), skipped")
    finally:
        capture.release()
