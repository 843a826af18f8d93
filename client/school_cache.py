"""Decoded schools kept in a node's memory, least recently used first out, within a byte budget.

A simulated node (a Ray actor) serves many schools over a run: decoding a school's PNGs every round
costs seconds, keeping every school it has served costs memory without bound (1,000 schools of 300
students at 64 px are 7 GB). This cache keeps the most recently used schools whose decoded arrays fit in
`data.school_cache_mb`; the school being handed out is always kept, even alone over the budget, so a
school larger than the budget still trains (it is decoded again next time).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable

from shared_models.datasets.school_folder import SchoolData


def school_bytes(data: SchoolData) -> int:
    """Memory the decoded school holds: its image and label arrays plus ~100 bytes per student id."""
    return int(data.images.nbytes + data.labels.nbytes + 100 * len(data.student_ids))


class SchoolCache:
    """{school folder: (version, SchoolData)} with LRU eviction beyond `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: OrderedDict[Path, tuple[Hashable, SchoolData, int]] = OrderedDict()
        self.held_bytes = 0
        self.loads = 0       # decodes done (misses); for tests and benchmarks
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Path) -> bool:
        return key in self._entries

    def get(self, key: Path, version: Hashable, load: Callable[[], SchoolData]) -> SchoolData:
        """The school at `key` decoded for `version` (its labels.csv stat): cached, or `load()`ed now."""
        cached = self._entries.get(key)
        if cached is not None and cached[0] == version:
            self._entries.move_to_end(key)
            return cached[1]
        if cached is not None:   # labels.csv changed: the old decode is stale
            self._drop(key)
        data = load()
        self.loads += 1
        size = school_bytes(data)
        self._entries[key] = (version, data, size)
        self.held_bytes += size
        self._evict(keep=key)
        return data

    def set_budget(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._evict(keep=next(reversed(self._entries), None))

    def _drop(self, key: Path) -> None:
        _, _, size = self._entries.pop(key)
        self.held_bytes -= size

    def _evict(self, keep: Path | None) -> None:
        while self.held_bytes > self.budget_bytes and len(self._entries) > (1 if keep in self._entries else 0):
            oldest = next(iter(self._entries))
            if oldest == keep:   # only the school in use is left over the budget
                break
            self._drop(oldest)
            self.evictions += 1
