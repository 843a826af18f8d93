"""Rebuild a school's lost ``ledger.jsonl`` from the coordinator's run copies (``fedfer deploy restore-ledger``).

The coordinator keeps a verified copy of every entry it received from the school, one file per run
(``<run.root>/<run id>/ledger/<school>.jsonl``), and an anchor (``<run.root>/anchors/<school>.json``) listing, run
by run in the order it first saw them, the hash of every entry it verified, with their ``count`` and last hash
(``head``). The entries are the school's own, signed by its key: the coordinator can withhold or reorder them but
cannot forge one. So the school rebuilds its chain by

1. taking the runs in the order the anchor lists them (the chain under the school's own key, current or retired);
2. reading each run's copy and appending its entries that continue the chain (a copy begins with the key
   transitions just before the run, which the previous copy may already hold: an entry already in the chain
   is skipped only if it is that very entry). An entry that does not continue the chain is a gap — an entry
   no copy holds — and the restore is refused: a chain with a hole cannot be verified, and the missing entry
   may be spending;
3. verifying the whole chain from genesis with the school's *own* keys (``signing_key.pub``, its retired keys
   in ``signing_key.retired/`` and approved recovery keys in ``signing_key.recovered/``), never keys the
   coordinator sends;
4. checking it holds every hash the anchor lists, in order, up to the anchor's head (so a copy cut short, or a
   run's copy withheld, is refused), reaches the last entry the school recorded signing (``signing_key.has-ledger``
   beside its key, when that survived: it bounds a withheld copy whatever the anchor says), and agrees with the
   school's accountant when that survived (an accountant that counted more means the newest entries are missing);
5. writing the ledger (all at once), the accountant if it was lost too (or the spending it lacks, when it is an
   older one put back with an old backup of the whole folder), and a record of the restore,
   ``ledger-restore.json``, which the audit reads beside the ledger and names.

What this trusts (docs/privacy.md, *A lost ledger*): the anchor's list of runs and its count. A coordinator
that withholds the newest copy is caught by the anchor (its head is not reached); one that also rewrites its
anchor consistently (runs, count and head together) is caught by the school's own record beside its key or its
surviving accountant, or by an auditor holding a later anchor or an earlier ledger. Rounds the school trained whose replies the coordinator
never stored are in no copy: if the accountant was lost too, their ε is lost with it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from privacy.accounting import DATASET_ID_FILE, SchoolAccountant, school_dataset_id
from privacy.anchors import ANCHOR_DIR, load_anchors
from privacy.ledger import (GENESIS_HASH, LEDGER_FILE, LedgerError, ServerLedgerCopy, _check_school_name,
                            epsilon_value, history_key, read_ledger_file, verify_entries)
from privacy.signing import (PUBLIC_KEY_FILE, SIGNING_KEY_FILE, SigningKeyError, load_or_create_signing_key, key_id, load_public_key,
                             recovery_public_keys, retired_public_keys)
from privacy.state_folder import (LEDGER_MARKER, ledger_is_missing, mark_ledger_started, record_ledger_head,
                                  recorded_ledger_head)
from shared_models.atomic_files import atomic_write_text

RESTORE_RECORD = "ledger-restore.json"   # beside ledger.jsonl: every restore, oldest first
_REBUILT = "the rebuilt chain"   # the verifier's name for it; its messages are then said at the copy and line


@dataclass(frozen=True)
class LedgerRestore:
    """What a restore rebuilt: the runs it read, in order, the entries and head of the chain, the lifetime ε."""

    ledger: Path
    runs: list[str]
    entries: int
    head: str
    epsilon: float
    delta: float
    accountant_rebuilt: bool


def _trusted_keys(state_dir: Path) -> tuple[list, list]:
    """The school's own public keys (current first, then retired) and its approved recovery keys."""
    public_file = state_dir / PUBLIC_KEY_FILE
    if (state_dir / SIGNING_KEY_FILE).is_file():
        try:   # the key is at hand: its loader writes signing_key.pub again if that is missing
            load_or_create_signing_key(state_dir)
        except SigningKeyError as exc:
            raise LedgerError(str(exc)) from None
    if not public_file.is_file():
        raise LedgerError(f"{public_file}: missing: the restore verifies the coordinator's copies with the school's "
                          f"own public key; copy it back from a backup (the coordinator's keys/NAME.pub is the "
                          f"coordinator's word, not the school's)")
    try:
        return [load_public_key(public_file)] + retired_public_keys(public_file), recovery_public_keys(public_file)
    except SigningKeyError as exc:
        raise LedgerError(str(exc)) from None


def _anchored_chain(runs_root: Path, school_id: str, trusted: list) -> dict[str, Any]:
    """The anchor's chain of this school under one of its own keys (current or retired)."""
    anchors_dir = runs_root / ANCHOR_DIR
    path = anchors_dir / f"{school_id}.json"
    if not os.path.lexists(path):   # anything else there (a directory, a device, a broken link) is read and refused
        raise LedgerError(f"{path}: no anchor of school {school_id}: the restore needs the coordinator's anchor to "
                          f"know which runs hold the school's entries, in which order, and how many there are")
    chains = load_anchors(anchors_dir, school_id)["chains"]
    ours = {key_id(k) for k in trusted}
    found = [c for kid, c in chains.items() if kid in ours or ours & set(c.get("retired", []))]
    if not found:
        raise LedgerError(f"{path}: no chain under the school's own keys ({', '.join(sorted(ours))}, from its "
                          f"signing_key.pub and signing_key.retired/); the anchor holds "
                          f"{'chains under ' + ', '.join(chains) if chains else 'no chain'}")
    return found[0]


def rebuild_chain(runs_root: Path, school_id: str, chain: dict[str, Any]) -> tuple[list[dict], list[str], list[str]]:
    """The school's entries from the run copies, in the anchor's run order, each continuing the one before it.
    Returns (entries, run ids read, where each entry came from: "<copy> line N"). Raises LedgerError at a missing
    copy or a gap."""
    entries: list[dict] = []
    origins: list[str] = []
    position: dict[str, int] = {}   # hash -> index in entries
    runs: list[str] = []
    for run in chain["runs"]:
        run_id = str(run["run_id"])
        copy = ServerLedgerCopy.path(runs_root / run_id, school_id)
        if not os.path.lexists(copy):   # anything else there (a directory, a pipe) is refused by the reader
            raise LedgerError(f"{copy}: missing: the anchor lists run {run_id} for school {school_id}; ask the "
                              f"coordinator for that run's copy (a restore without it would drop its spending)")
        runs.append(run_id)
        for line, entry in enumerate(read_ledger_file(copy, school_id=school_id), start=1):
            if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
                raise LedgerError(f"{copy} line {line}: not a ledger entry")
            if entry["hash"] in position:   # a key change the previous copy already ended with
                if entries[position[entry["hash"]]] != entry:
                    raise LedgerError(f"{copy} line {line}: entry {entry['hash'][:12]}… differs from the one an "
                                      f"earlier copy holds under the same hash")
                continue
            last = entries[-1]["hash"] if entries else GENESIS_HASH
            if entry.get("prev_hash") != last:
                raise LedgerError(f"{copy} line {line} (school {school_id}): a gap: the entry continues "
                                  f"{str(entry.get('prev_hash'))[:12]}…, which no earlier copy holds (the chain so far "
                                  f"ends at {last[:12]}…); the restore needs every entry, so ask the coordinator for "
                                  f"the copy holding it")
            position[entry["hash"]] = len(entries)
            entries.append(entry)
            origins.append(f"{copy} line {line}")
    return entries, runs, origins


def _check_against_anchor(entries: list[dict], chain: dict[str, Any], runs_root: Path, school_id: str) -> None:
    """Every hash the anchor lists is in the rebuilt chain, in the anchor's order, up to its head."""
    index = {e["hash"]: i for i, e in enumerate(entries)}
    previous, n = -1, 0
    for run in chain["runs"]:
        for hash_ in run["hashes"]:
            n += 1
            at = index.get(hash_)
            if at is None or at <= previous:
                copy = ServerLedgerCopy.path(runs_root / str(run["run_id"]), school_id)
                raise LedgerError(f"{copy}: lacks the anchor's entry {n} of {chain['count']} ({hash_[:12]}…, run "
                                  f"{run['run_id']}){'' if at is None else ' in the anchored order'}: the copy is cut "
                                  f"short or withheld; ask the coordinator for it (a restore without it would drop "
                                  f"spending)")
            previous = at


def _check_against_own_record(entries: list[dict], state_dir: Path, school_id: str) -> None:
    """The school's own record of its last entry (beside its key) must be in the rebuilt chain: it bounds what the
    coordinator withholds, whatever its anchor says."""
    recorded = recorded_ledger_head(state_dir)
    if recorded is None:
        return
    count, head = recorded
    if len(entries) >= count and entries[count - 1]["hash"] == head:
        return
    raise LedgerError(f"{state_dir / LEDGER_MARKER}: school {school_id} signed {count} entries (the last {head[:12]}…), "
                      f"but the coordinator's copies rebuild {len(entries)} without that one: its newest entries are "
                      f"withheld or were never stored; ask the coordinator for them (restoring now would under-count "
                      f"the school's ε)")


def _check_accountant(state_dir: Path, school_id: str, entries: list[dict]) -> tuple[str, dict | None]:
    """The dataset id the accountant keeps, and the spending to record in it so that it counts what the rebuilt
    ledger holds (None: the accountant is there and agrees, nothing to write). A lost accountant gets the whole
    history. One that counted *less* (an old backup of the whole state folder, put back with the ledger moved
    aside) gets the difference: raising it to the verified chain never lowers the school's ε. One that counted
    *more* is refused: the newest entries are missing from the copies."""
    last = entries[-1]
    id_file = state_dir / DATASET_ID_FILE
    fingerprint = school_dataset_id(state_dir, school_id) if id_file.exists() else last["dataset_fingerprint"]
    mine = [e for e in entries if e["dataset_fingerprint"] == fingerprint]
    if not mine:
        raise LedgerError(f"{id_file}: dataset id {fingerprint[:16]} is in no entry the coordinator holds for school "
                          f"{school_id} (its entries are for {last['dataset_fingerprint'][:16]})")
    final = mine[-1]
    after = history_key(final["history_before"] + (
        [[final["noise_multiplier"], final["sample_rate"], final["steps"]]] if final["event"] == "round" else []))
    acct = SchoolAccountant(state_dir, school_id, fingerprint)
    if not acct.path.exists():
        return fingerprint, after
    counted = history_key(acct.history)
    if counted == after:
        return fingerprint, None
    if any(counted.get(k, 0) > n for k, n in after.items()) or set(counted) - set(after):
        raise LedgerError(f"{acct.path}: the school's accountant counted more spending than the coordinator's copies "
                          f"hold ({sorted(counted.items())} against {sorted(after.items())}): the newest entries are "
                          f"missing (a copy withheld, or replies the coordinator never stored); restoring would "
                          f"under-count the school's ε, so nothing was written")
    return fingerprint, {k: n - counted.get(k, 0) for k, n in after.items() if n > counted.get(k, 0)}


def restore_ledger(state_dir: Path, runs_root: Path, school_id: str) -> LedgerRestore:
    """Rebuild ``<state_dir>/ledger.jsonl`` of `school_id` from the run copies under `runs_root` (the coordinator's
    run.root, or a folder holding ``anchors/<school>.json`` and ``<run id>/ledger/<school>.jsonl``). Every check
    comes first; nothing is written unless all pass. Raises LedgerError (one line) otherwise."""
    state_dir, runs_root = Path(state_dir), Path(runs_root)
    _check_school_name(school_id)
    ledger_path = state_dir / LEDGER_FILE
    if not state_dir.is_dir():
        raise LedgerError(f"{state_dir}: not a directory (--state-dir is the school's state folder)")
    if os.path.lexists(ledger_path) and not ledger_path.is_file():
        raise LedgerError(f"{ledger_path}: not a regular file (a directory, a named pipe or a broken link): move it "
                          f"aside, then restore")
    if not ledger_is_missing(state_dir):
        raise LedgerError(f"{ledger_path}: there, with entries: nothing to restore (move it aside first if it is "
                          f"damaged or an old backup; it is never overwritten)")
    if not runs_root.is_dir():
        raise LedgerError(f"{runs_root}: not a directory (--from is the folder of the coordinator's runs: "
                          f"anchors/ and <run id>/ledger/)")
    trusted, recovery_keys = _trusted_keys(state_dir)
    chain = _anchored_chain(runs_root, school_id, trusted)
    entries, runs, origins = rebuild_chain(runs_root, school_id, chain)
    if not entries:
        raise LedgerError(f"{runs_root}: the anchored runs hold no entries of school {school_id}")
    try:
        keys = verify_entries(entries, trusted, source=_REBUILT, start="genesis", recovery_keys=recovery_keys)
    except LedgerError as exc:   # said at the copy and line the entry came from
        found = re.match(rf"{_REBUILT}(?: line (\d+))?(?: \(school [^)]*\))?: ", str(exc))
        where = origins[int(found.group(1)) - 1] if found and found.group(1) else str(runs_root)
        raise LedgerError(f"school {school_id}'s run copies do not verify with the school's own keys "
                          f"(signing_key.pub, signing_key.retired/): {where}: "
                          f"{str(exc)[found.end():] if found else str(exc)}") from None
    _check_against_anchor(entries, chain, runs_root, school_id)
    _check_against_own_record(entries, state_dir, school_id)
    if keys.keys[-1] != key_id(trusted[0]):   # the school handed its ledger to its current key after these entries
        raise LedgerError(f"{runs_root}: school {school_id}'s rebuilt chain ends under key {keys.keys[-1]}, not under "
                          f"the school's key {key_id(trusted[0])} (signing_key.pub): its newest entries are missing; "
                          f"ask the coordinator for the newest run's copy")
    fingerprint, rebuilt_history = _check_accountant(state_dir, school_id, entries)

    # every check passed. The accountant before the ledger: killed in between, the next restore finds an
    # accountant that agrees with the copies and writes the ledger; the other way round it would find a ledger
    # beside no accountant, which the round refuses. The record before the ledger too: once the ledger is there a
    # re-run has nothing to restore, so a record written after it would be lost to a kill in between (and the
    # audit would never say the ledger was rebuilt); a re-run replaces the record of the same chain.
    last = entries[-1]
    mark_ledger_started(state_dir)
    if rebuilt_history is not None:
        if not (state_dir / DATASET_ID_FILE).is_file():
            atomic_write_text(state_dir / DATASET_ID_FILE, fingerprint + "\n")
        acct = SchoolAccountant(state_dir, school_id, fingerprint)
        for (sigma, q), steps in rebuilt_history.items():
            acct.record(sigma, q, steps, privacy_unit=last["privacy_unit"], delta=last["delta"])
    restore = LedgerRestore(ledger_path, runs, len(entries), last["hash"], epsilon_value(last["epsilon"]),
                            float(last["delta"]), rebuilt_history is not None)
    _record_restore(state_dir, school_id, restore, chain)
    atomic_write_text(ledger_path, "".join(json.dumps(e, ensure_ascii=False, allow_nan=False,
                                                      separators=(", ", ": ")) + "\n" for e in entries))
    record_ledger_head(state_dir, len(entries), last["hash"])
    return restore


def _record_restore(state_dir: Path, school_id: str, restore: LedgerRestore, chain: dict[str, Any]) -> None:
    path = state_dir / RESTORE_RECORD
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    except (OSError, ValueError):
        earlier = []   # a damaged record never blocks a restore; this one is written whole
    earlier = earlier if isinstance(earlier, list) else []
    record = {"school": school_id, "restored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "runs": restore.runs, "entries": restore.entries, "head": restore.head,
              "anchor_count": chain["count"], "anchor_head": chain["head"], "epsilon": restore.epsilon,
              "accountant_rebuilt": restore.accountant_rebuilt}
    if earlier and isinstance(earlier[-1], dict) and earlier[-1].get("head") == restore.head and \
            earlier[-1].get("entries") == restore.entries:
        # a restore of this chain killed before its ledger was written, run again: one restore, one record (an
        # accountant it rebuilt then is kept, so this run may say it was not rebuilt; the first record says so)
        record["accountant_rebuilt"] = bool(earlier[-1].get("accountant_rebuilt")) or restore.accountant_rebuilt
        earlier = earlier[:-1]
    atomic_write_text(path, json.dumps(earlier + [record], indent=1) + "\n")


def restore_notes(ledger_path: Path) -> list[str]:
    """The audit's notes for a school's own ledger rebuilt from run copies: one per restore recorded beside it."""
    path = Path(ledger_path).parent / RESTORE_RECORD
    if Path(ledger_path).name != LEDGER_FILE or not path.is_file():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        return [f"{ledger_path} was rebuilt from the coordinator's run copies on {r['restored_at']} (runs "
                f"{', '.join(r['runs'])}; {r['entries']} entries up to {str(r['head'])[:12]}…, the anchor's "
                f"{r['anchor_count']}; ε {float(r['epsilon']):.3f} carried on): rounds whose replies the coordinator "
                f"never stored are in no copy" for r in records]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{path}: unreadable record of a ledger restore: this ledger was rebuilt from run copies at some point"]
