"""The school's record of the lesson reports it has given, so that two reports cannot be subtracted.

k-anonymity (`report-min-students`) keeps one report from describing fewer than k students, but two
reports of the same minutes whose students differ by one -- the lesson reported again after a parent
withdrew consent and the child's seat left the seat map, or with one child's face blurred out of the
frames -- subtract to that child's own figures, whatever k is. Every class figure of a window is a sum
over the students it covers (a share times the count the report shows), so the difference of two
reports is the sum over the students in one and not in the other.

`fedfer classroom report --state-dir DIR` keeps `DIR/classroom-reports.jsonl`: per report one line with,
for every window it showed, a key of the window's frames (their pixel digests, `frame_digest`: the same
minutes of the same lesson, however the frames were copied or re-ingested) and the students its figures
cover (those in the seats; and those whose faces were classified, for the expression mix and
engagement). A window of a new report is withheld when, against what this school already released for
the same key,

- its students differ from one earlier report's by fewer than k (but not zero: the same students
  again add nothing to subtract), or
- its students, together with the earlier reports', single out one student: that student's own row is
  a combination of the reports' rows (three reports A, B, C with A = B + C + one child give the child
  as A - B - C, though every pair differs by k or more), or
- the earlier report of these minutes counted anonymous face tracks (no seat map) and this one
  students, or the other way round: the two cannot be compared, and a seat map that leaves one seat
  out against the whole frame is the first case again;
- a window of an earlier report cut elsewhere (another start second, another --fps) shares frames
  with it and their students differ by fewer than k (but not zero): the two windows' values are not
  the same sums, but over mostly the same frames their difference is nearly that child's.

Only the expression mix and engagement are withheld when only the classified students conflict. What
this does not cover (docs/privacy.md "Classroom cameras"): reports made without `--state-dir` (nothing
is recorded or checked), frames altered in pixels (another key), differences in how a child was seen
rather than whether (the same students with one child's seat box moved), combinations of three or more
windows that only overlap, and the same lesson from a lossy video and from its frames (other pixels,
other keys). The figures are not differentially private.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RECORD_FILE = "classroom-reports.jsonl"


@dataclass(frozen=True)
class Released:
    """What one earlier report showed for one window."""

    kind: str                                   # "seat" (roster students) or "track" (anonymous face tracks)
    present: frozenset[str] | None              # students its presence figures covered (seat map only)
    classified: frozenset[str] | None           # students its expression figures covered, None if not shown
    key: str = ""                               # window_key of its frames


@dataclass
class Withheld:
    windows: int = 0            # windows withheld whole
    expressions: int = 0        # windows whose expression mix and engagement were withheld
    checked: bool = False       # the lesson had frame digests and a record was given


def window_key(digests: list[str], fps: float, start: int, end: int) -> str | None:
    """The key of the window [start, end) of samples: None when its frames have no digest."""
    part = digests[start:end]
    if len(part) != end - start or not all(part):
        return None
    return hashlib.sha256(f"{fps:g}|{','.join(part)}".encode()).hexdigest()[:16]


@dataclass
class Record:
    """What earlier reports released: by window key, and by frame (a window sharing frames with an
    earlier one cut elsewhere -- another start second, another --fps -- is compared with it too)."""

    by_key: dict[str, list[Released]]
    by_frame: dict[str, list[Released]]

    def get(self, key: str | None, default: list[Released]) -> list[Released]:
        return self.by_key.get(key, default) if key else default


def read_record(path: Path) -> Record:
    """What earlier reports released. A line that is not a record (a write cut short by a crash, before
    that report was written) is skipped."""
    out = Record({}, {})
    if not path.exists():
        return out
    from shared_models.datasets.base import special_file

    if why := special_file(path):
        raise ValueError(why)
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            kind, units = entry["kind"], entry["units"]
            for key, present, classified, *frames in entry["windows"]:
                released = Released(kind, _units_of(present, units), _units_of(classified, units), key)
                out.by_key.setdefault(key, []).append(released)
                for digest in (frames[0] if frames else []):
                    out.by_frame.setdefault(digest, []).append(released)
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _units_of(bits: str, units: list[str]) -> frozenset[str] | None:
    if not bits:
        return None
    mask = int(bits, 16)
    return frozenset(unit for index, unit in enumerate(units) if mask >> index & 1)


def _bits_of(chosen: frozenset[str], units: list[str]) -> str:
    return format(sum(1 << index for index, unit in enumerate(units) if unit in chosen), "x")


def singles_out(new: frozenset[str], earlier: list[frozenset[str]], k: int) -> bool:
    """Whether releasing a sum over `new` after sums over `earlier` (the same students' values) lets a
    reader derive the sum over fewer than k students (one pair's difference) or one student's own value
    (any combination of the sums); the same set again derives nothing new."""
    if not new or new in earlier:
        return False
    if any(0 < len(new ^ old) < k for old in earlier):
        return True
    units = sorted(new.union(*earlier))
    index = {unit: i for i, unit in enumerate(units)}

    def rows(sets: list[frozenset[str]]) -> np.ndarray:
        matrix = np.zeros((len(sets), len(units)))
        for r, chosen in enumerate(sets):
            matrix[r, [index[u] for u in chosen]] = 1.0
        return matrix

    before, after = rows(earlier), rows([*earlier, new])
    rank_before, rank_after = np.linalg.matrix_rank(before) if earlier else 0, np.linalg.matrix_rank(after)
    for unit in units:
        single = np.zeros((1, len(units)))
        single[0, index[unit]] = 1.0
        # derivable now (the row is in the span) and not before this report (else it is not this report's doing)
        now = np.linalg.matrix_rank(np.vstack([after, single])) == rank_after
        if now and not (earlier and np.linalg.matrix_rank(np.vstack([before, single])) == rank_before):
            return True
    return False


def withhold_differencing(windows: list, digests: list[str], fps: float, seat_map: bool, k: int,
                          released: Record) -> Withheld:
    """Withhold the shown windows an earlier report of the same minutes would subtract to fewer than k
    students (see the module docstring). Changes `windows` in place."""
    from client.classroom import indicators as ind

    bounds = ind.windows(len(digests), ind.window_size(fps))
    kind = "seat" if seat_map else "track"
    result = Withheld(checked=bool(digests))
    for number, window in enumerate(windows):
        if not window.shown:
            continue
        key = window_key(digests, fps, *bounds[number]) if number < len(bounds) else None
        earlier = released.get(key, [])
        # windows of earlier reports that share frames with this one but were cut elsewhere: their values are
        # not this window's, but a student set one apart over mostly the same frames is nearly that child
        overlapping = {id(old): old for d in (digests[slice(*bounds[number])] if key else [])
                       for old in released.by_frame.get(d, []) if old.key != key}.values()
        if not earlier and not overlapping:
            continue
        if any(old.kind != kind for old in [*earlier, *overlapping]) or (seat_map and (singles_out(
                window.present_units, [old.present for old in earlier if old.present is not None], k) or any(
                old.present is not None and 0 < len(window.present_units ^ old.present) < k for old in overlapping))):
            _withhold_expressions(window)
            window.shown, window.withheld = False, True
            window.inattentive = window.passive = float("nan")
            window.difficulty = 0
            result.windows += 1
            continue
        if seat_map and window.expressions_shown and (singles_out(
                window.classified_units, [old.classified for old in earlier if old.classified is not None], k) or any(
                old.classified is not None and 0 < len(window.classified_units ^ old.classified) < k
                for old in overlapping)):
            _withhold_expressions(window)
            result.expressions += 1
    return result


def _withhold_expressions(window) -> None:  # type: ignore[no-untyped-def]
    """Blank a window's expression figures (nothing downstream may print a withheld figure)."""
    window.expressions_shown, window.engagement = False, float("nan")
    window.mix = [0] * len(window.mix)


def record_line(windows: list, digests: list[str], fps: float, seat_map: bool) -> str | None:
    """The record of what this report shows (None: nothing shown, or no digests to key it by)."""
    from client.classroom import indicators as ind

    bounds = ind.windows(len(digests), ind.window_size(fps))
    shown = [(n, w) for n, w in enumerate(windows) if w.shown]
    keys = {n: window_key(digests, fps, *bounds[n]) for n, _ in shown if n < len(bounds)}
    shown = [(n, w) for n, w in shown if keys.get(n)]
    if not shown:
        return None
    units = sorted(set().union(*(w.present_units | w.classified_units for _, w in shown))) if seat_map else []
    rows = [[keys[n], _bits_of(w.present_units, units) if seat_map else "",
             _bits_of(w.classified_units, units) if seat_map and w.expressions_shown else "",
             digests[slice(*bounds[n])]] for n, w in shown]
    return json.dumps({"kind": "seat" if seat_map else "track", "units": units, "windows": rows},
                      separators=(",", ":"))
