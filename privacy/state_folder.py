"""Has this school trained before? What a school's state folder shows about its past, for a lost ledger.

A school's lifetime ε lives in its signed ``ledger.jsonl`` (privacy/ledger.py) and its accountant. If the
ledger is lost, deleted or emptied, a new ledger would start a chain at genesis and — when the accountant went
with it — the budget guard would count from ε 0: the school could spend its whole budget again. So a state
folder that shows the school trained before, beside a missing or empty ledger, refuses to train or to make a
new signing key until the ledger is restored (``fedfer deploy restore-ledger``, docs/deployment.md).

What counts as a sign of training (each written only after a ledger entry, or by a key change that needs one):

- ``accountant-*.json``: the accountant records a round only after its ledger entry is written;
- ``own-model.pt``: the weights of a round the school trained;
- ``signing_key.retired/`` or ``signing_key.recovered/``: a key rotation or recovery, which needs a ledger;
- ``signing_key.has-ledger`` (:data:`LEDGER_MARKER`): written beside the signing key before the first entry
  is appended, so it survives a state folder wiped "all but the keys". It also records how many entries the
  ledger had and the last one's hash, after every append (:func:`record_ledger_head`): a ledger.jsonl that lacks
  that entry is older than the last one this folder signed — an old backup put back, or a tail cut off — and is
  refused (:func:`check_ledger_reaches_head`); a restore from the coordinator's copies must reach it too.

What a state folder cannot show on its own: an old backup of the *whole* folder (ledger, accountant and marker from
the same earlier day) agrees with itself. The coordinator's anchor knows the newer entries, so each round's train
message carries what the anchor holds for this school's chain (:class:`AnchoredHead`: how many entries, the last
one's hash), and the school checks its ledger holds that entry before it trains (:func:`check_ledger_holds_anchor`).
The coordinator is not trusted with this: a head the ledger lacks only makes the school refuse (which a
coordinator can always make it do); the head is never written, signed or used to lower anything.

A key on its own is not a sign: `fedfer deploy school-key` makes it at enrolment, before any round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared_models.atomic_files import atomic_write_text
from shared_models.small_files import SmallFileError, read_small_file
from shared_models.wording import counted

LEDGER_FILE = "ledger.jsonl"                 # privacy/ledger.py LEDGER_FILE (that module imports this one)
LEDGER_MARKER = "signing_key.has-ledger"     # named like the key files so it is kept wherever they are
_MARKER_NOTE = ("this state folder's ledger.jsonl holds signed entries; if ledger.jsonl is missing, it was lost: "
                "restore it (docs/deployment.md, 'A lost ledger'); do not start a new one")


class LedgerLostError(ValueError):
    """The school's ledger is missing or empty, but its state folder shows it trained before."""


def ledger_is_missing(state_dir: Path) -> bool:
    """No ledger.jsonl, or one with nothing in it (a symlink to a missing target is *not* missing: the
    ledger reader refuses it by name)."""
    path = Path(state_dir) / LEDGER_FILE
    if path.is_symlink():
        return False
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def signs_of_training(state_dir: Path) -> list[str]:
    """The files in `state_dir` that show the school trained (or changed its ledger key) before, by name."""
    state_dir = Path(state_dir)
    signs = sorted(p.name for p in state_dir.glob("accountant-*.json"))
    for name in ("own-model.pt", LEDGER_MARKER):
        if (state_dir / name).exists():
            signs.append(name)
    for name in ("signing_key.retired", "signing_key.recovered"):
        folder = state_dir / name
        if folder.is_dir() and any(folder.iterdir()):
            signs.append(f"{name}/")
    return signs


def check_ledger_not_lost(state_dir: Path, school_id: str | None = None) -> None:
    """Raise LedgerLostError (one line, naming the file, the school and what to do) if the ledger is missing or
    empty while the state folder shows the school trained before; a new chain would restart its ε at 0."""
    state_dir = Path(state_dir)
    if not ledger_is_missing(state_dir):
        return
    signs = signs_of_training(state_dir)
    if not signs:
        return
    what = "missing" if not (state_dir / LEDGER_FILE).exists() else "empty"
    whose = f"school {school_id}'s state folder" if school_id else "the state folder"
    raise LedgerLostError(
        f"{state_dir / LEDGER_FILE}: {what}, but {whose} shows it trained before "
        f"({', '.join(signs)}): a new ledger would restart its lifetime ε at 0, so the school will not train; "
        f"restore ledger.jsonl from a backup, or rebuild it from the coordinator's run copies with "
        f"`fedfer deploy restore-ledger --state-dir {state_dir} --school {school_id or 'NAME'} --from DIR` "
        f"(docs/deployment.md, 'A lost ledger')")


def mark_ledger_started(state_dir: Path) -> None:
    """Write :data:`LEDGER_MARKER` (once): from now on a missing ledger.jsonl here is a lost one."""
    if not (Path(state_dir) / LEDGER_MARKER).exists():
        record_ledger_head(state_dir, 0, "")


def record_ledger_head(state_dir: Path, entries: int, head: str) -> None:
    """Record in :data:`LEDGER_MARKER` that the ledger holds `entries` entries, the last with hash `head`.
    Written after each append: a crash in between leaves it one entry behind, which still passes."""
    atomic_write_text(Path(state_dir) / LEDGER_MARKER,
                      json.dumps({"note": _MARKER_NOTE, "entries": int(entries), "head": head}) + "\n")


def recorded_ledger_head(state_dir: Path) -> tuple[int, str] | None:
    """(entries, head hash) the marker records, or None when it records none (no marker, an unreadable one, or
    one written before any entry)."""
    try:
        data = json.loads(read_small_file(Path(state_dir) / LEDGER_MARKER, 64 * 1024).decode("utf-8"))
        entries, head = data["entries"], data["head"]
    except (OSError, SmallFileError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1 or not isinstance(head, str):
        return None
    return entries, head


@dataclass(frozen=True)
class AnchoredHead:
    """What the coordinator's anchor holds of this school's chain (privacy/anchors.py): `entries` entries it
    verified, the last with hash `head`. The coordinator's word, checked against the school's own ledger."""

    entries: int
    head: str


class LedgerBehindAnchorError(LedgerLostError):
    """The school's ledger lacks an entry the coordinator's anchor verified: the state folder is older than the
    school's spending (an old backup of the whole folder), or the coordinator's head is wrong."""


def check_ledger_holds_anchor(hashes: list[str], anchored: AnchoredHead, where: str, school_id: str,
                              state_dir: Path) -> None:
    """Raise LedgerBehindAnchorError (one line, naming the ledger, the school and what to do) if `hashes` (the
    school's ledger, in order) lack the coordinator's anchored head at or after position `anchored.entries`.

    Why "at or after", not "at": the anchor holds the entries the coordinator received, in the ledger's order, so
    the head is at least that far in; an entry whose reply never reached it (a lost reply) is in the ledger and not
    in the anchor, which moves the head one line later. A ledger shorter than `entries`, or without the head, lacks
    spending the coordinator verified."""
    if len(hashes) >= anchored.entries and anchored.head in hashes[anchored.entries - 1:]:
        return
    raise LedgerBehindAnchorError(
        f"{where}: holds {counted(len(hashes), 'entry', 'entries')}, and not the entry the coordinator's anchor verified "
        f"for school {school_id} (entry {anchored.entries}, {anchored.head[:12]}…): this state folder is older than the "
        f"school's spending (an old backup of the whole folder?), so the school will not train; move {LEDGER_FILE} aside "
        f"and rebuild it (the accountant is brought up to it) with `fedfer deploy restore-ledger --state-dir {state_dir} --school "
        f"{school_id} --from DIR` (docs/deployment.md, 'A lost ledger')")


def check_ledger_reaches_head(state_dir: Path, hashes: list[str], where: str) -> None:
    """Raise LedgerLostError if `hashes` (a ledger's entry hashes, in order) lack the entry the marker records as
    the last one this folder signed: that ledger is older than what the school spent."""
    recorded = recorded_ledger_head(state_dir)
    if recorded is None:
        return
    entries, head = recorded
    if len(hashes) >= entries and hashes[entries - 1] == head:
        return
    raise LedgerLostError(
        f"{where}: holds {counted(len(hashes), 'entry', 'entries')}, and not the entry this state folder recorded as its "
        f"last signed (entry {entries}, {head[:12]}…, in {LEDGER_MARKER}): the ledger is older than the school's "
        f"spending (an old backup put back, or its tail cut off) or was rewritten after it was signed; put the newest "
        f"ledger back, or move this one aside and rebuild it with `fedfer deploy restore-ledger` (docs/deployment.md, "
        f"'A lost ledger')")
