"""The server's anchor of each school's ledger across runs: ``<run.root>/anchors/<school>.json``.

A hash chain shows edits, but not a deleted tail or a chain started afresh: a school whose state
directory was wiped (its key kept) signs a new chain from genesis with an empty history, and on its own
that chain is valid. The server therefore keeps, outside any single run, what it has verified of each
school's chain, per signing key (a new key is a new identity: re-enrolment, or a simulated school):

    {"school": S, "chains": {<key id>: {"public_key": PEM, "head": last verified hash, "count": entries,
        "histories": {dataset: [[σ, q, steps], …] after the head},
        "runs": [{"run_id": R, "hashes": [...], "histories_after": {...}}, …in the order first seen],
        "retired": [<key id>, …]}}}

A key transition or key recovery (privacy/ledger.py) does not start a new identity: the chain anchored under
the old key moves to the new key's id and lists the old one in ``retired`` (found by either key). A recovery
must continue the last entry anchored before it: one from an earlier anchored entry is a *truncated tail*
(:func:`check_continues` at the server, :func:`recovery_problems` in the audit).

Before a school's first entry of a new run is stored, :func:`check_continues` compares it with the
anchor; after entries are stored, :func:`update_anchor` moves the anchor (written crash-safely, under a
lock). ``fedfer privacy audit`` reads the same files (:func:`audit_against_anchor`) to report truncated
tails and restarted chains.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared_models.atomic_files import atomic_write_text, locked
from shared_models.small_files import SmallFileError, read_small_file
from privacy.ledger import (GENESIS_HASH, KEY_CHANGES, KEY_RECOVERY, LedgerError, _check_school_name,
                            chain_start_key, copy_run_id, history_key)
from privacy.signing import key_id, load_public_key, public_key_pem

ANCHOR_DIR = "anchors"
#: Largest anchor file read: 64 hex digits per entry a school ever sent, so a few megabytes after thousands
#: of rounds; the bound keeps a damaged or planted file (a symlink to /dev/zero) from filling memory.
MAX_ANCHOR_BYTES = 256 * 1024 * 1024


def anchors_dir_of_run(run_dir: Path) -> Path:
    """Anchors live beside the runs: ``<run.root>/anchors`` for ``<run.root>/<run id>``."""
    return Path(run_dir).resolve().parent / ANCHOR_DIR


def anchor_path(anchors_dir: Path, school_id: str) -> Path:
    _check_school_name(school_id)
    return Path(anchors_dir) / f"{school_id}.json"


def load_anchors(anchors_dir: Path, school_id: str) -> dict[str, Any]:
    path = anchor_path(anchors_dir, school_id)
    if not os.path.lexists(path):   # lexists: a dangling symlink is a damaged anchor, not a new school
        return {"school": school_id, "chains": {}}
    try:
        data = json.loads(read_small_file(path, MAX_ANCHOR_BYTES).decode("utf-8"))
    except SmallFileError as exc:
        raise LedgerError(f"{path}: anchor of school {school_id} unreadable ({exc.why})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: anchor of school {school_id} unreadable ({exc})") from None
    except RecursionError:
        raise LedgerError(f"{path}: anchor of school {school_id} unreadable (JSON nested too deeply)") from None
    if not isinstance(data, dict) or data.get("school") != school_id or not isinstance(data.get("chains"), dict):
        raise LedgerError(f"{path}: not an anchor of school {school_id}")
    for kid, chain in data["chains"].items():
        _check_chain(path, school_id, str(kid), chain)
    return data


def _check_chain(path: Path, school_id: str, kid: str, chain: Any) -> None:
    """An anchor is the server's own record and is not signed, but it must agree with itself: its `count`
    is the number of hashes its runs list, its `head` the last of the newest run's. An edited count or
    head (e.g. count 0, which would let a restarted chain pass) is reported as a damaged anchor."""
    where = f"{path}: anchor of school {school_id} (key {kid})"
    runs = chain.get("runs") if isinstance(chain, dict) else None
    if (not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("run_id"), str)
                                              and isinstance(r.get("hashes"), list) and r["hashes"]
                                              and all(isinstance(h, str) for h in r["hashes"]) for r in runs)):
        raise LedgerError(f"{where}: malformed (each chain needs runs, each with a run_id and its hashes)")
    count, head = chain.get("count"), chain.get("head")
    anchored = sum(len(r["hashes"]) for r in runs)
    if isinstance(count, bool) or not isinstance(count, int) or count != anchored:
        raise LedgerError(f"{where}: count {count!r}, but its runs list {anchored} "
                          f"{'entry' if anchored == 1 else 'entries'}: the anchor was edited or damaged")
    last = runs[-1]["hashes"][-1] if runs else ""
    if head != last:
        raise LedgerError(f"{where}: head {str(head)[:12]}… is not the last anchored entry {last[:12]}…: the "
                          f"anchor was edited or damaged")


def load_chain(anchors_dir: Path, school_id: str, public_key: Ed25519PublicKey) -> dict[str, Any] | None:
    """The anchored chain of this school under this key, or the one it handed over to a later key (None:
    never anchored)."""
    chains = load_anchors(anchors_dir, school_id)["chains"]
    kid = key_id(public_key)
    return chains.get(kid) or next((c for c in chains.values() if kid in c.get("retired", [])), None)


def _chain_key(chains: Mapping[str, Any], public_key: Ed25519PublicKey) -> str:
    """The id under which the chain of `public_key` (current or retired) is anchored; its own id if none."""
    kid = key_id(public_key)
    return kid if kid in chains else next((k for k, c in chains.items() if kid in c.get("retired", [])), kid)


def _dominates(history: Sequence, anchored: Sequence) -> bool:
    """Every (σ, q) the anchor knows has at least as many steps in `history`."""
    have = history_key(history)
    return all(have.get(k, 0) >= n for k, n in history_key(anchored).items())


@dataclass
class AnchorCheck:
    problem: str = ""      # non-empty: reject (restarted, truncated, history reset)
    kind: str = ""         # restarted-chain | truncated-tail | history-reset | gap
    note: str = ""         # accepted, but worth an event (entries the server never saw)


def check_continues(chain: Mapping[str, Any] | None, entry: Mapping[str, Any]) -> AnchorCheck:
    """Does `entry` (a school's first entry of a run) continue what the server anchored?"""
    if not chain or int(chain.get("count", 0)) == 0:
        return AnchorCheck()
    head, count = str(chain["head"]), int(chain["count"])
    prev = str(entry.get("prev_hash", ""))
    fp = str(entry.get("dataset_fingerprint", ""))
    anchored_history = chain.get("histories", {}).get(fp)
    before = entry.get("history_before", [])
    if prev == GENESIS_HASH:
        return AnchorCheck(f"ledger restarted at genesis, but the server anchored {count} earlier entries of this "
                           f"school (head {head[:12]}…): its state was wiped or replaced", "restarted-chain")
    seen = [h for run in chain.get("runs", []) for h in run.get("hashes", [])]
    if prev == head:
        if anchored_history is not None and history_key(before) != history_key(anchored_history):
            return AnchorCheck(f"history_before {before} does not continue the anchored history {anchored_history}",
                               "history-reset")
        return AnchorCheck()
    if prev in seen:
        position = seen.index(prev) + 1
        return AnchorCheck(f"ledger continues from anchored entry {position} of {count}: the {count - position} "
                           f"later entries the server verified are missing from the school's ledger", "truncated-tail")
    if anchored_history is not None and not _dominates(before, anchored_history):
        return AnchorCheck(f"history_before {before} has less spending than the anchored history {anchored_history}",
                           "history-reset")
    return AnchorCheck(note=f"continues from an entry the server never received (anchored head {head[:12]}…, "
                            f"prev_hash {prev[:12]}…); its spending includes the anchored history", kind="gap")


def unanchored_transition(anchors_dir: Path, school_id: str, old_key: Ed25519PublicKey) -> AnchorCheck:
    """A school's entries hand the chain over from `old_key`, which the server never anchored, though it
    anchored the school under other keys: a chain made up around the anchored one, not its continuation."""
    chains = load_anchors(anchors_dir, school_id)["chains"]
    if not chains:
        return AnchorCheck()
    return AnchorCheck(f"key transition from key {key_id(old_key)}, which the server never anchored; it anchored "
                       f"this school under key {', '.join(chains)}", "unanchored-transition")


def _history_after(entry: Mapping[str, Any]) -> list[list]:
    after = dict(history_key(entry["history_before"]))
    if entry["event"] == "round":
        for k, n in history_key([(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])]).items():
            after[k] = after.get(k, 0) + n
    return [[s, q, n] for (s, q), n in after.items()]


def update_anchor(anchors_dir: Path, school_id: str, public_key: Ed25519PublicKey | Sequence[Ed25519PublicKey],
                  run_entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Set the anchor of this school's chain to the verified entries of one run (all of them as stored in
    the run copy: idempotent, so a crash between the copy and the anchor heals on the next reply).
    `public_key`: the run's trusted keys of the school (pinned first, then retired), as the copy verified."""
    if not run_entries:
        raise ValueError("no entries to anchor")
    path = anchor_path(anchors_dir, school_id)
    with locked(path):
        data = load_anchors(anchors_dir, school_id)
        start = chain_start_key(run_entries, public_key)   # a copy that begins with a key transition: the old key
        chain = data["chains"].pop(_chain_key(data["chains"], start), None) or {
            "public_key": public_key_pem(start), "head": "", "count": 0, "histories": {}, "runs": []}
        for e in run_entries:   # the chain follows the school's key transitions (verified by the caller)
            if e["event"] in KEY_CHANGES and e["new_key_id"] != key_id_of_pem(chain["public_key"]):
                chain["retired"] = chain.get("retired", []) + [key_id_of_pem(chain["public_key"])]
                chain["public_key"] = e["new_public_key"]
        data["chains"][key_id_of_pem(chain["public_key"])] = chain
        run_id = copy_run_id(run_entries)
        runs = chain["runs"]
        record = next((r for r in runs if r["run_id"] == run_id), None)
        if record is None:
            record = {"run_id": run_id, "hashes": [], "histories_after": {}}
            runs.append(record)
        known = set(record["hashes"])
        record["hashes"] += [str(e["hash"]) for e in run_entries if e["hash"] not in known]
        histories = dict(chain["histories"])
        for e in run_entries:
            histories[str(e["dataset_fingerprint"])] = _history_after(e)
        record["histories_after"] = histories
        if runs[-1] is record:   # the newest run moves the head; re-anchoring an older run does not
            chain["head"] = record["hashes"][-1]
            chain["histories"] = histories
        chain["count"] = sum(len(r["hashes"]) for r in runs)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return chain


def key_id_of_pem(pem: str) -> str:
    return key_id(load_public_key(pem.encode("ascii")))


def audit_against_anchor(chain: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], *, copy_of_run: bool,
                         where: str) -> list[str]:
    """Problems of verified `entries` (a run copy, or a school's whole ledger) against the server's anchor.

    Run copy: every entry the server anchored for that run must be in it (a truncated tail otherwise),
    and its first entry must continue the runs anchored before it (not restart at genesis, not lose
    spending). School ledger: every anchored entry must be in it, in order."""
    problems: list[str] = recovery_problems(chain, entries, where)
    hashes = [str(e["hash"]) for e in entries]
    runs = list(chain.get("runs", []))
    if copy_of_run:
        run_id = copy_run_id(entries)
        index = next((i for i, r in enumerate(runs) if r["run_id"] == run_id), None)
        if index is None:
            return problems
        anchored = runs[index]["hashes"]
        problem = _first_missing(anchored, hashes, f"of run {run_id!r}", "copy")
        if problem:
            problems.append(f"{where} {problem}")
        earlier = [h for r in runs[:index] for h in r["hashes"]]
        if earlier and entries:
            first = entries[0]
            prior = runs[index - 1]
            if first["prev_hash"] == GENESIS_HASH:
                problems.append(f"{where} line 1: restarted chain: prev_hash is genesis, but the server anchored "
                                f"{len(earlier)} earlier entries of this school")
            else:
                anchored_history = prior.get("histories_after", {}).get(first["dataset_fingerprint"])
                if anchored_history is not None and not _dominates(first["history_before"], anchored_history):
                    problems.append(f"{where} line 1: history reset: history_before {first['history_before']} has less "
                                    f"spending than the anchor after run {prior['run_id']!r} ({anchored_history})")
        return problems
    anchored = [h for r in runs for h in r["hashes"]]
    positions = [hashes.index(h) if h in hashes else -1 for h in anchored]
    missing = positions.count(-1)
    if missing == len(anchored) and anchored:
        if entries and runs and entries[0]["run_id"] == runs[0]["run_id"] and entries[0].get("run_seq") == 0:
            # the same first run, other entries: not a wiped state starting afresh, a rewrite from line 1
            problems.append(f"{where} line 1: replaced entry: none of the {len(anchored)} entries the server "
                            f"anchored is in it, though it starts with the same run {runs[0]['run_id']!r}: "
                            f"rewritten and re-signed from its first entry")
            return problems
        kind = "restarted chain" if entries and entries[0]["prev_hash"] == GENESIS_HASH else "replaced ledger"
        problems.append(f"{where} line 1: {kind}: none of the {len(anchored)} entries the server anchored is in it")
    elif missing:
        first = positions.index(-1)
        found = [p for p in positions[:first] if p >= 0]
        line = (max(found) + 2) if found else 1   # the line after the last anchored entry still in the ledger
        run_id, seq = next((r["run_id"], r["hashes"].index(anchored[first])) for r in runs
                           if anchored[first] in r["hashes"])
        there = entries[line - 1] if line <= len(entries) else None
        if there is not None and there["run_id"] == run_id and there.get("run_seq", seq) == seq:
            kind = (f"replaced entry: the entry the server anchored here (run {run_id!r}, {anchored[first][:12]}…) is "
                    f"not in the ledger, which has another one ({hashes[line - 1][:12]}…): rewritten and re-signed")
        elif there is not None:
            kind = (f"truncated tail: the ledger goes on with run {there['run_id']!r} where the server anchored "
                    f"more entries of run {run_id!r}")
        else:
            kind = f"truncated tail: the ledger ends at line {len(hashes)}"
        problems.append(f"{where} line {line}: {kind}; {_of(missing, len(anchored))} missing")
    elif positions != sorted(positions):
        problems.append(f"{where}: anchored entries appear out of order")
    return problems


def recovery_problems(chain: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], where: str) -> list[str]:
    """A key recovery continues the old chain's last entry. Where the server anchored an entry right after the
    one a recovery continues, and it is not that recovery (later entries of the old chain, or another recovery
    from the same entry), the recovery truncated the history the server verified: its ε would be too low."""
    anchored = [h for r in chain.get("runs", []) for h in r["hashes"]]
    position = {h: i for i, h in enumerate(anchored)}
    problems = []
    for line, e in enumerate(entries, start=1):
        if e.get("event") != KEY_RECOVERY or e.get("prev_hash") not in position:
            continue
        after = position[e["prev_hash"]] + 1
        if after < len(anchored) and anchored[after] != e["hash"]:
            problems.append(f"{where} line {line}: key recovery at line {line} continues anchored entry {after} of "
                            f"{len(anchored)}, but the server anchored a later entry after it "
                            f"({anchored[after][:12]}…): the recovery truncated the old chain, and would drop the ε "
                            f"those entries spent")
    return problems


def _first_missing(anchored: Sequence[str], hashes: Sequence[str], what: str, copy: str) -> str:
    """Where a run copy first differs from the entries the server anchored for that run (they are the same
    lines, in order): "line N: ..." naming a replaced entry (the copy has another entry at line N) or a
    truncated tail (the copy ends before it); "" when every anchored entry is there."""
    missing = [i for i, h in enumerate(anchored) if h not in hashes]
    if not missing:
        return ""
    i = missing[0]
    if i < len(hashes):
        # the server anchors exactly the entries it stores in the run copy, so one of its two records changed
        return (f"line {i + 1}: replaced entry: the entry the server anchored at line {i + 1} {what} "
                f"({anchored[i][:12]}…) is not in the {copy}, which has another entry there, signed by the school "
                f"({hashes[i][:12]}…): the copy or the anchor was edited; {_of(len(missing), len(anchored))} missing")
    return (f"line {len(hashes) + 1}: truncated tail: the server anchored {len(anchored)} entries {what}, the "
            f"{copy} holds {len(hashes)} ({len(missing)} missing)")


def _of(missing: int, anchored: int) -> str:
    return f"{missing} of the {anchored} anchored entries {'is' if missing == 1 else 'are'}"
