"""Reading a clip: a folder of frame images (the usual pre-extracted form) or a video file.

A clip becomes a uint8 array (T, H, W) or (T, H, W, 3) of ``num_frames`` frames sampled evenly
over its length (frames repeat when the clip is shorter, so every sample has the same T and
batches stack). ``num_frames=0`` keeps every frame.

Video files need PyAV (``pip install av``), which fedfer does not depend on: without it, opening
a benchmark whose clips are videos fails at once with a one-line message saying so — extract
frames into a folder per clip instead (the form DFEW's ``Clip/jpg_256`` and Emotion-FAN's AFEW
faces already have).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from shared_models.datasets.base import (
    Benchmark, BenchmarkError, Collected, UnreadableImageError, is_image_file, natural_key, not_regular_file,
    read_image,
)

VIDEO_SUFFIXES = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".wmv", ".flv", ".m4v", ".mpg", ".mpeg")
DEFAULT_NUM_FRAMES = 16  # the 16-frame clips of seed paper 003 (R(2+1)D)


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def frame_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: natural_key(p.name))


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread evenly over 0..total-1 (all of them when num_frames is 0)."""
    if num_frames <= 0:
        return np.arange(total)
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def clip_location(folder_or_file: Path) -> Path | None:
    """What to read for a clip: the folder itself if it holds frames, else the video file inside it
    (DAiSEE keeps ``<ClipID>/<ClipID>.avi``), or the file itself if it is a video; None if empty."""
    if folder_or_file.is_dir():
        if any(is_image_file(p) for p in folder_or_file.iterdir()):
            return folder_or_file
        videos = sorted(p for p in folder_or_file.iterdir() if is_video_file(p))
        return videos[0] if videos else None
    if folder_or_file.is_file() and is_video_file(folder_or_file):
        return folder_or_file
    return None


def require_video_support(paths: Sequence[str | Path]) -> None:
    """Fail fast (one line) when any clip is a video file and PyAV is not installed."""
    video = next((Path(p) for p in paths if is_video_file(Path(p))), None)
    if video is not None and importlib.util.find_spec("av") is None:
        raise BenchmarkError(
            f"{video}: decoding video needs PyAV (pip install av); or extract each clip's frames into a folder"
        )


def _uniform(frames: list[np.ndarray], where: str) -> np.ndarray:
    if any(f.ndim == 3 for f in frames):  # mixed gray and colour frames: make all colour
        frames = [np.repeat(f[:, :, None], 3, axis=2) if f.ndim == 2 else f for f in frames]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise UnreadableImageError(f"{where}: frames differ in size {sorted(shapes)}")
    return np.stack(frames)


def read_frame_folder(folder: Path, num_frames: int) -> np.ndarray:
    files = frame_files(folder)
    if not files:
        raise UnreadableImageError(f"{folder}: no frame images")
    return _uniform([read_image(files[i]) for i in sample_indices(len(files), num_frames)], str(folder))


def read_video(path: Path, num_frames: int) -> np.ndarray:
    """Decode with PyAV, keeping only the sampled frames in memory."""
    try:
        import av
    except ImportError:
        raise BenchmarkError(f"{path}: decoding video needs PyAV (pip install av)") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total = int(stream.frames or 0)
            if total > 0:
                wanted = sample_indices(total, num_frames)
                picks: dict[int, np.ndarray] = {}
                needed = set(wanted.tolist())
                for i, frame in enumerate(container.decode(stream)):
                    if i in needed:
                        picks[i] = frame.to_ndarray(format="rgb24")
                    if i >= wanted.max():
                        break
                if not picks:
                    raise UnreadableImageError(f"{path}: no decodable frames")
                last = max(picks)  # the header may over-count frames: reuse the last one decoded
                frames = [picks.get(int(i), picks[last]) for i in wanted]
            else:
                every = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
                if not every:
                    raise UnreadableImageError(f"{path}: no decodable frames")
                frames = [every[i] for i in sample_indices(len(every), num_frames)]
    except UnreadableImageError:
        raise
    except Exception as exc:  # PyAV raises its own error family (av.error.*), all of them mean unreadable
        raise UnreadableImageError(f"{path}: unreadable video ({exc.__class__.__name__}: {exc})") from None
    return _uniform(frames, str(path))


def read_clip(path: Path, num_frames: int = DEFAULT_NUM_FRAMES) -> np.ndarray:
    path = Path(path)
    if path.is_dir():
        return read_frame_folder(path, num_frames)
    if is_video_file(path):
        why = not_regular_file(path)  # PyAV would block on a named pipe
        if why is not None:
            raise UnreadableImageError(f"{path}: {why}")
        return read_video(path, num_frames)
    raise UnreadableImageError(f"{path}: neither a frame folder nor a video file")


CLIP_LANDMARKS = "landmarks.npy"   # optional, inside a frame folder: float (frames in the folder, 68, 2) pixels


def read_clip_landmarks(path: Path, num_frames: int = DEFAULT_NUM_FRAMES) -> tuple[np.ndarray, int] | None:
    """The landmarks of the frames `read_clip` picks from frame folder `path` and the frames' width, if the
    folder holds ``landmarks.npy`` with one (68, 2) row per frame image; else None (videos never have them)."""
    path = Path(path)
    sidecar = path / CLIP_LANDMARKS
    if not path.is_dir() or not sidecar.is_file():
        return None
    files = frame_files(path)
    try:
        marks = np.load(sidecar, allow_pickle=False)
        with Image.open(files[0]) as first:
            width = int(first.size[0])
    except (OSError, ValueError, IndexError):
        return None
    if marks.shape != (len(files), 68, 2) or not np.issubdtype(marks.dtype, np.floating):
        return None
    return marks[sample_indices(len(files), num_frames)].astype(np.float32), width


@dataclass
class ClipFiles:
    """One clip (frame folder or video file) per sample, decoded on access."""

    paths: Sequence[str]
    num_frames: int = DEFAULT_NUM_FRAMES

    def load(self, index: int) -> np.ndarray:
        return read_clip(Path(self.paths[index]), self.num_frames)

    def describe(self, index: int) -> str:
        return str(self.paths[index])


def build_clips(
    collected: Collected, *, name: str, labels: Sequence[str], split: str, path: Path,
    num_frames: int = DEFAULT_NUM_FRAMES, notes: Sequence[str] = (),
) -> Benchmark:
    """The clip Benchmark of what a reader collected (paths already resolved by clip_location)."""
    require_video_support(collected.paths)
    return Benchmark(
        name=name, labels=labels, split=split, path=path, kind="clip",
        targets=collected.targets, source=ClipFiles(list(collected.paths), num_frames),
        metadata=collected.metadata, skipped=collected.skipped, dropped=collected.dropped,
        notes=tuple(notes) + (f"{num_frames or 'all'} frames per clip, evenly spaced",),
    )
