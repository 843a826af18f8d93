"""The generator service of on-demand synthetic schools (`data.generate=on-demand`).

Runs inside the `fedfer simulate` process for the length of a federation: a thread watches
`<root>/.requests/` (shared_models/datasets/on_demand.py) and builds each requested school with
:func:`simulations.synth.ensure_school` in a small process pool, so only the schools the server samples
are ever drawn. A school's bytes depend only on the seed, its index and the per-school sizes, so a school
built on demand is byte-for-byte the school an upfront build writes; `ensure_school` builds into a
temporary folder renamed into place under a lock, so two requests for one school build it once.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from shared_models.datasets.on_demand import POLL_S, answer_request, pending_requests
from simulations import synth


def _build(root: str, params: synth.SynthParams, index: int) -> float:
    started = time.perf_counter()
    synth.ensure_school(root, params, index)
    return time.perf_counter() - started


class SchoolService:
    """Builds requested schools until stopped; `built` records (school id, seconds) of each one built."""

    def __init__(self, root: str | Path, params: synth.SynthParams, workers: int = 2) -> None:
        self.root = Path(root)
        self.params = params
        self.workers = max(1, int(workers))
        self.built: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._running: dict[str, Future] = {}

    def __enter__(self) -> "SchoolService":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        # spawn, not fork: a forked worker would carry the caller's torch and Flower pages (~0.5 GB of resident
        # memory each, shared but counted in every process's RSS); the generator needs numpy and PIL only
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        self._thread = threading.Thread(target=self._serve, name="fedfer-school-service", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; schools being built are finished (their folders appear whole), queued ones dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> str:
        """`generated 12 school(s) on demand: 7,200 images in 25.3 s of generation (3.51 ms per image)`"""
        images = sum(synth.school_image_count(self.params, int(school.rsplit("-", 1)[1])) for school, _ in self.built)
        seconds = sum(s for _, s in self.built)
        return (f"generated {len(self.built)} school(s) on demand: {images:,} images in {seconds:.1f} s of generation"
                f" ({1000 * seconds / max(images, 1):.2f} ms per image)")

    def _index(self, school: str) -> int | None:
        try:
            index = int(school.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return None
        return index if 0 <= index < self.params.schools and synth.school_id(index) == school else None

    def _serve(self) -> None:
        assert self._pool is not None
        while not self._stop.is_set():
            for school in pending_requests(self.root):
                if school in self._running:
                    continue
                index = self._index(school)
                if index is None:
                    answer_request(self.root, school, failure=f"no school {school!r} in this federation")
                    continue
                self._running[school] = self._pool.submit(_build, str(self.root), self.params, index)
            self._collect()
            self._stop.wait(POLL_S)
        self._collect()

    def _collect(self) -> None:
        for school, future in list(self._running.items()):
            if not future.done():
                continue
            del self._running[school]
            try:
                self.built.append((school, future.result()))
                answer_request(self.root, school)
            except Exception as exc:   # the waiting node reports it as its school's no-data reason
                answer_request(self.root, school, failure=f"{exc.__class__.__name__}: {exc}")
