"""The privacy ledger, the privacy model's audit trail: one signed, hash-chained JSON line per school per round.

Entry fields (schema 1):

======================  =====================================================================
``schema``              1
``event``               ``"round"`` (the school trained and released an update) or
                        ``"refused"`` (it declined; ``reason`` = ``"budget-exhausted"`` or
                        ``"policy-violation"`` with the extra field ``setting`` naming the run-config
                        key that asked for less privacy than the school's policy; ``steps`` is 0 and
                        ``planned_steps`` holds what it would have trained, 0 if nothing was planned)
                        or ``"key-transition"`` (the school changed its signing key; see below)
                        or ``"key-recovery"`` (the school lost its signing key; see below)
``school_id``           the school (the ledger owner)
``dataset_fingerprint`` the random id of the school's accountant history (one per state directory,
                        privacy/accounting.py:school_dataset_id); never a hash of the data
``run_id``, ``round``   the federation run and round
``run_seq``             index of this entry among the school's entries of this run (0, 1, …): lets an
                        auditor of the server's per-run copy see that nothing before it is missing
``privacy_unit``        ``student`` | ``image`` | ``school`` (client-level DP at the server: the
                        federation's own entry, one per round, the unit being a whole school)
``sample_rate``         Poisson rate q of privacy units per step
``noise_multiplier``    σ
``max_grad_norm``       clipping norm C (per unit)
``steps``               DP steps trained in this round
``delta``               δ the ε figures are for
``accountant``          the budget accountant (``prv``)
``history_before``      the school's accountant history for this fingerprint *before* this entry,
                        compressed to [[σ, q, steps], …] with equal (σ, q) merged; the auditor
                        recomputes ε = accountant(history_before + this round) and checks that
                        consecutive entries' histories follow from each other
``epsilon``             ε after this round (PRV), as the school computed it — never trusted by audit
``epsilon_rdp``         ε after this round by RDP (reported beside)
``budget``              the school's lifetime ε budget (null = none)
``key_id``              short id of the signing public key (diagnostics only)
``timestamp``           UTC ISO-8601
``prev_hash``           ``hash`` of the school's previous entry; ``"0"*64`` for its first entry ever
``hash``                sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of every field
                        except ``hash`` and ``signature``
``signature``           Ed25519 signature of the school over the ASCII hex ``hash``, base64
======================  =====================================================================

A key transition (``fedfer deploy school-key --new-ledger-key``) is an entry of the same chain, signed
by the key in force (the old one), with ``old_public_key`` and ``new_public_key`` (PEM) and
``new_key_id``; it spends nothing (``steps`` 0) and repeats the last entry's dataset, terms, history and ε,
so the lifetime figures run on unchanged. Its ``run_id`` is ``key-transition-<new key id>`` (a run of
one entry): the school sends it with the entries of the run that follows it, and that run's copy on the
server starts with it. Every later entry is signed by the new key; one signed by the old key after the
transition is refused (a retired key, perhaps compromised, cannot extend the chain). Trust flows forward
only: the key in force at the chain's first entry must be one of the verifier's trusted keys (the current
key, or a retired one kept beside it as ``<name>.retired/<key id>.pub``: privacy/signing.py), never a key
the entries name, and each transition signed by the key in force authorizes the next one.

A key recovery (``fedfer deploy school-key --recover-ledger-key``) is the hand-over for a key that is
*lost*, which cannot sign a transition. It is signed by the **new** key, has the transition's fields plus
``old_key_id`` (the lost key, the key in force before it), continues the old chain's last entry (``prev_hash``)
and repeats its dataset, terms, history and ε (``steps`` 0); its ``run_id`` is ``key-recovery-<new key id>``.
Because the old key did not sign it, the new key is trusted only when the verifier holds it as an approved
recovery key (``<name>.recovered/<key id>.pub`` beside its trusted key file: privacy/signing.py), never
because the entry names it. A recovery whose chain goes on past the entry it continues (a later entry of the
old chain, or another recovery from the same entry) or whose ε is lower than that entry's is refused; the
server's anchors catch a recovery from an entry that is not the last one the server verified
(privacy/anchors.py).

Non-finite ε is written as the string ``"inf"`` (JSON has no infinity). Extra scalar fields are
allowed and covered by the hash and the signature.

The school's authoritative copy is ``<state_dir>/ledger.jsonl`` (all runs, chained from genesis);
the server keeps ``<run_dir>/ledger/<school>.jsonl`` for each run (:class:`ServerLedgerCopy`),
chained from wherever the school's history was when the run began.

What a hash chain cannot show on its own: a deleted *last* line (the copy is just shorter), or a chain
started afresh from genesis by a school whose state was wiped. The auditor catches the first by
comparing the school's copy with the server's (``fedfer privacy audit`` given both); the server's
anchors across runs (privacy/anchors.py, ``<run.root>/anchors/<school>.json``) catch both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared_models.atomic_files import append_line_atomic, locked
from privacy.state_folder import (LedgerLostError, check_ledger_not_lost, check_ledger_reaches_head,
                                  mark_ledger_started, record_ledger_head)
from privacy.signing import (PUBLIC_KEY_FILE, key_id, load_public_key, public_key_pem, recovery_public_keys,
                             retire_public_key, retired_public_keys, sign_hash, verify_hash_signature,
                             write_public_key)

SCHEMA = 1
GENESIS_HASH = "0" * 64
LEDGER_FILE = "ledger.jsonl"
KEY_TRANSITION = "key-transition"
KEY_RECOVERY = "key-recovery"
KEY_CHANGES = (KEY_TRANSITION, KEY_RECOVERY)   # entries that hand the chain to a new key; they spend nothing
EVENTS = ("round", "refused", KEY_TRANSITION, KEY_RECOVERY)
REFUSAL_REASONS = ("budget-exhausted", "policy-violation")
PRIVACY_UNITS = ("student", "image", "school")

#: Longest ledger line read. An entry carries its dataset's compressed history (≈ 50 bytes per
#: distinct (σ, q)), so this admits MAX_HISTORY_ENTRIES distinct pairs with room to spare.
MAX_LINE_BYTES = 1024 * 1024
#: Most distinct (σ, q) pairs a history_before may list (a school changes σ or q once per run at most).
MAX_HISTORY_ENTRIES = 10_000
#: Integers in a ledger are counts (rounds, steps); anything longer than this is not one.
MAX_INT_DIGITS = 18
_MAX_INT = 10**MAX_INT_DIGITS

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# field -> kind; kinds: str, int, num (int or float, finite), eps (num or "inf"), budget (num or null),
# history (list of [σ, q, steps]), hex (64 lowercase hex)
_COMMON_FIELDS: dict[str, str] = {
    "schema": "int", "event": "str", "school_id": "str", "dataset_fingerprint": "str", "run_id": "str",
    "round": "int", "run_seq": "int", "privacy_unit": "str", "sample_rate": "num", "noise_multiplier": "num",
    "max_grad_norm": "num", "steps": "int", "delta": "num", "accountant": "str",
    "history_before": "history", "epsilon": "eps", "epsilon_rdp": "eps", "budget": "budget",
    "key_id": "str", "timestamp": "str", "prev_hash": "hex", "hash": "hex", "signature": "str",
}
_REFUSAL_FIELDS: dict[str, str] = {"reason": "str", "planned_steps": "int"}
_TRANSITION_FIELDS: dict[str, str] = {"old_public_key": "str", "new_public_key": "str", "new_key_id": "str"}
_RECOVERY_FIELDS: dict[str, str] = {**_TRANSITION_FIELDS, "old_key_id": "str"}
# Set by the ledger, never by the caller of append().
_LEDGER_SET = ("schema", "run_seq", "key_id", "prev_hash", "hash", "signature")


class LedgerError(ValueError):
    """A ledger problem, phrased ``<source> line N (school X): <what is wrong>``."""


class LedgerBehindError(LedgerError):
    """The school's ledger lacks entries its state folder signed: an old backup put back, or its tail cut off."""


def _where(source: str, line: int | None, school: str | None) -> str:
    parts = source
    if line is not None:
        parts += f" line {line}"
    if school:
        parts += f" (school {school})"
    return parts


def canonical_json(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of every field except ``hash`` and ``signature``."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _is_num(value: Any) -> bool:
    """A finite int or float (an int too large for a float, e.g. 4,000 digits, is not)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) < _MAX_INT
    return isinstance(value, float) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_INT


def epsilon_value(value: Any) -> float:
    """A stored ε (number or "inf") as a float."""
    return math.inf if value == "inf" else float(value)


def _encode_eps(value: float) -> float | str:
    value = float(value)
    if math.isnan(value):
        raise LedgerError("epsilon is NaN")
    return "inf" if math.isinf(value) else value


def history_key(history: Iterable[Sequence]) -> dict[tuple[float, float], int]:
    """Compressed history as {(σ, q): steps} — the form in which two histories are compared."""
    from privacy.accounting import compress_history

    return {(s, q): n for s, q, n in compress_history(history)}


def compress_history_list(history: Iterable[Sequence]) -> list[list]:
    """The history as an entry writes it: [[σ, q, steps], …], equal (σ, q) merged, first-appearance order."""
    from privacy.accounting import compress_history

    return [[s, q, n] for s, q, n in compress_history(history)]


def _is_history(value: Any) -> bool:
    """A list of at most MAX_HISTORY_ENTRIES [σ, q, steps] (finite numbers, integer steps).

    Written with map/zip so the per-element work runs in C: every entry repeats its dataset's whole
    history, so an audit checks O(entries²) elements (2 million for 2,000 distinct (σ, q))."""
    if not isinstance(value, list) or len(value) > MAX_HISTORY_ENTRIES:
        return False
    if not value:
        return True
    if set(map(type, value)) != {list} or set(map(len, value)) != {3}:
        return False
    sigmas, rates, steps = zip(*value)
    numbers = sigmas + rates
    if not (set(map(type, numbers)) <= {int, float} and set(map(type, steps)) == {int}):
        return False
    try:
        return all(map(math.isfinite, numbers)) and max(map(abs, steps)) < _MAX_INT
    except OverflowError:  # an int too large for a float
        return False


def check_entry_fields(entry: Any, where: str) -> None:
    """Schema and type checks of one entry (not hash, signature or chain)."""
    if not isinstance(entry, dict):
        raise LedgerError(f"{where}: not a JSON object")
    event = entry.get("event")
    if event not in EVENTS:
        raise LedgerError(f"{where}: field 'event' is {event!r}, expected one of {EVENTS}")
    spec = dict(_COMMON_FIELDS)
    if event == "refused":
        spec.update(_REFUSAL_FIELDS)
    elif event == KEY_TRANSITION:
        spec.update(_TRANSITION_FIELDS)
    elif event == KEY_RECOVERY:
        spec.update(_RECOVERY_FIELDS)
    for name, kind in spec.items():
        if name not in entry:
            raise LedgerError(f"{where}: field '{name}' missing")
        value = entry[name]
        ok = {
            "str": lambda v: isinstance(v, str) and v != "",
            "int": _is_count,
            "num": _is_num,
            "eps": lambda v: v == "inf" or (_is_num(v) and v >= 0),
            "budget": lambda v: v is None or (_is_num(v) and v >= 0),
            "hex": lambda v: isinstance(v, str) and bool(_HEX64.match(v)),
            "history": _is_history,
        }[kind](value)
        if not ok:
            shown = repr(value)
            if len(shown) > 120:  # a history of thousands of pairs must not become a megabyte message
                shown = shown[:100] + f"… ({len(value) if isinstance(value, (list, str)) else len(shown)} items)"
            raise LedgerError(f"{where}: field '{name}' has a bad value {shown}")
    for name, value in entry.items():
        if name not in spec:
            if not _FIELD_NAME.match(name):
                raise LedgerError(f"{where}: unexpected field name {name!r}")
            if not (value is None or isinstance(value, (str, bool)) or _is_num(value)):
                raise LedgerError(f"{where}: extra field '{name}' must be a scalar, got {value!r}")
    if entry["schema"] != SCHEMA:
        raise LedgerError(f"{where}: schema {entry['schema']} is not supported (this fedfer reads {SCHEMA})")
    if entry["privacy_unit"] not in PRIVACY_UNITS:
        raise LedgerError(f"{where}: privacy_unit {entry['privacy_unit']!r} not one of {PRIVACY_UNITS}")
    if not (0 <= entry["sample_rate"] <= 1):
        raise LedgerError(f"{where}: sample_rate {entry['sample_rate']} outside [0, 1]")
    if not (0 < entry["delta"] < 1):
        raise LedgerError(f"{where}: delta {entry['delta']} outside (0, 1)")
    if entry["noise_multiplier"] < 0 or entry["max_grad_norm"] < 0:
        raise LedgerError(f"{where}: negative noise_multiplier or max_grad_norm")
    if event == "refused":
        if entry["reason"] not in REFUSAL_REASONS:
            raise LedgerError(f"{where}: refusal reason {entry['reason']!r} not one of {REFUSAL_REASONS}")
        if entry["steps"] != 0:
            raise LedgerError(f"{where}: a refused round must have steps 0, has {entry['steps']}")
    if event in KEY_CHANGES and entry["steps"] != 0:
        raise LedgerError(f"{where}: a {event.replace('-', ' ')} spends nothing, but has steps {entry['steps']}")


@dataclass
class _ChainState:
    """What the next entry of a chain must agree with."""

    last_hash: str | None                           # None: any prev_hash accepted (first entry of a copy)
    run_counts: dict[str, int]                      # run_id -> entries seen
    histories: dict[str, dict[tuple[float, float], int]]  # fingerprint -> history after entries seen
    trust_first_history: bool                       # partial copies: a fingerprint's first history_before is taken as signed
    # fingerprint -> the same history as the next entry writes it ([[σ, q, steps], …], first-appearance
    # order) and (σ, q) -> its index there: an unchanged history then compares as one C-level list ==
    written: dict[str, tuple[list[list], dict[tuple[float, float], int]]] = field(default_factory=dict)
    key: Ed25519PublicKey | None = None             # the key in force (None: the key the caller checks with)
    keys: list[str] = field(default_factory=list)  # ids of the keys in force so far, oldest first
    retired: dict[str, str] = field(default_factory=dict)  # retired key id -> the transition/recovery that retired it
    recovery_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)  # approved recovery keys by id
    seen: dict[str, int] = field(default_factory=dict)     # hash -> line of each entry checked so far
    last: dict | None = None                        # the entry checked last (what a recovery must repeat)
    first_line: int = 1                             # line number of the first entry checked


@dataclass
class KeyChain:
    """The signing keys a verified chain went through: ``keys`` oldest first, the last one in force."""

    keys: list[str]
    current: Ed25519PublicKey
    transitions: list[tuple[int, dict]]   # (line, entry) of each key transition and key recovery, in order

    def describe(self) -> list[str]:
        """One line per key change, as an officer reads it: where, when, old → new key id (and for a recovery,
        the ε it carries on)."""
        return [f"line {line}, {e['timestamp']}: ledger key {e['key_id']} → {e['new_key_id']}"
                if e["event"] == KEY_TRANSITION else
                f"line {line}, {e['timestamp']}: ledger key {e['old_key_id']} (lost) → {e['new_key_id']} by key "
                f"recovery, ε carried {epsilon_value(e['epsilon']):.3f}"
                for line, e in self.transitions]


Trusted = Ed25519PublicKey | str | Path | Sequence[Ed25519PublicKey]


def trusted_keys(trusted: Trusted) -> list[Ed25519PublicKey]:
    """The verifier's trusted keys of one school, current first (then retired keys from a trusted source)."""
    if isinstance(trusted, (list, tuple)):
        return [load_public_key(k) for k in trusted]
    return [load_public_key(trusted)]


def chain_start_key(entries: Sequence[Any], trusted: Trusted, where: str = "") -> Ed25519PublicKey:
    """The key in force at the first of `entries`: the trusted key (current or retired) its ``key_id`` names.
    Never a key the entries carry (a transition's ``old_public_key``): trust flows forward only, from a key
    the verifier already holds, through transitions each signed by the key in force. Raises LedgerError
    when the first entry of a chain with key transitions names no trusted key (without transitions, the
    current key: the first entry's signature check then says which key signed it)."""
    keys = trusted_keys(trusted)
    first = entries[0] if entries and isinstance(entries[0], dict) else {}
    # a chain (a run copy) that begins with a key recovery begins under the lost key the recovery replaces
    named = first.get("old_key_id") if first.get("event") == KEY_RECOVERY else first.get("key_id")
    start = next((k for k in keys if key_id(k) == named), None)
    rotated = any(isinstance(e, dict) and e.get("event") in KEY_CHANGES for e in entries)
    if start is None and isinstance(named, str) and rotated:
        raise LedgerError(f"{where or 'ledger'}: the chain starts under key {named}, which is not a trusted key "
                          f"({', '.join(key_id(k) for k in keys)}): if the school rotated its ledger key from "
                          f"{named}, add that retired key (`fedfer deploy rotate NAME --ledger-key` keeps it in "
                          f"keys/<school>.retired/); else another key made this chain")
    return start or keys[0]


def check_trusted_key(keys: Sequence[str], trusted: Sequence[Ed25519PublicKey], where: str,
                      recovery_keys: Sequence[Ed25519PublicKey] = ()) -> None:
    """A chain that reaches a key the verifier does not know must pass through the current trusted key
    (`trusted[0]`: a keyring not yet updated after a rotation). One that leaves a retired key for an unknown
    key without it forks the school's chain with a retired key. (An approved recovery key is known.)"""
    known = {key_id(k) for k in [*trusted, *recovery_keys]}
    if all(k in known for k in keys) or key_id(trusted[0]) in keys:
        return
    raise LedgerError(f"{where}: the chain goes {' → '.join(keys)} and never through the current key "
                      f"{key_id(trusted[0])}: a retired key handed the ledger to a key the school never rotated to")


def _check_one(entry: Any, public_key: Ed25519PublicKey, state: _ChainState, where_of) -> None:
    school = entry.get("school_id") if isinstance(entry, dict) else None
    where = where_of(school)
    check_entry_fields(entry, where)
    if entry_hash(entry) != entry["hash"]:
        raise LedgerError(f"{where}: hash does not match the entry's content (edited after signing)")
    key = state.key if state.key is not None else public_key
    if not state.keys:
        state.keys.append(key_id(key))
    recovery = entry["event"] == KEY_RECOVERY
    signer = _recovery_signer(entry, state, where) if recovery else key
    if not verify_hash_signature(signer, entry["hash"], entry["signature"]):
        raise LedgerError(f"{where}: {_signature_problem(entry, key, state)}")
    if recovery:
        _check_recovery_position(entry, state, where)
    if state.last_hash is not None and entry["prev_hash"] != state.last_hash:
        expected = "the genesis hash" if state.last_hash == GENESIS_HASH else f"the previous entry's hash {state.last_hash[:12]}…"
        raise LedgerError(f"{where}: prev_hash {entry['prev_hash'][:12]}… does not match {expected} "
                          f"(a line was deleted, inserted or reordered)")
    if recovery and state.last is not None:
        _check_recovery_carries(entry, state.last, where)
    run_id = entry["run_id"]
    expected_seq = state.run_counts.get(run_id, 0)
    if entry["run_seq"] != expected_seq:
        raise LedgerError(f"{where}: run_seq {entry['run_seq']} but {expected_seq} entries of run {run_id!r} precede it "
                          f"(entries of this run are missing or duplicated)")
    fp = entry["dataset_fingerprint"]
    written = state.written.get(fp)
    if written is not None and entry["history_before"] == written[0]:
        before = state.histories[fp]  # what the chain predicts, element for element
    else:
        before = history_key(entry["history_before"])
        written = None
    if fp in state.histories:
        if before != state.histories[fp]:
            raise LedgerError(f"{where}: history_before does not follow from the earlier entries for dataset {fp[:16]}")
    elif not state.trust_first_history and before:
        raise LedgerError(f"{where}: first entry for dataset {fp[:16]} claims earlier spending {entry['history_before']} "
                          f"that no earlier entry records (was the school's ledger.jsonl lost or replaced? restore it)")
    after = dict(before)
    if written is None:
        listed = [list(h) for h in compress_history_list(entry["history_before"])]
        written = (listed, {(float(h[0]), float(h[1])): i for i, h in enumerate(listed)})
    listed, index = written
    if entry["event"] == "round":
        step = history_key([(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])])
        listed, index = list(listed), dict(index)  # shallow: the inner lists are replaced, never changed
        for k, n in step.items():
            after[k] = after.get(k, 0) + n
            if k in index:
                listed[index[k]] = [k[0], k[1], after[k]]
            else:
                index[k] = len(listed)
                listed.append([k[0], k[1], n])
    state.written[fp] = (listed, index)
    state.histories[fp] = after
    state.run_counts[run_id] = expected_seq + 1
    state.last_hash = entry["hash"]
    state.seen[entry["hash"]] = state.first_line + len(state.seen)
    state.last = entry
    if entry["event"] in KEY_CHANGES:
        _follow_transition(entry, key, state, where, new=signer if recovery else None)


def _recovery_signer(entry: dict, state: _ChainState, where: str) -> Ed25519PublicKey:
    """The key a key recovery must be signed by: its new key, which the verifier must hold as an approved
    recovery key (never the key the entry carries: anyone can write a public key into an entry)."""
    approved = state.recovery_keys.get(entry["key_id"])
    if approved is None or entry["new_key_id"] != entry["key_id"]:
        held = ", ".join(state.recovery_keys) or "none"
        raise LedgerError(f"{where}: key recovery by key {entry['key_id']}, which the verifier never approved as a "
                          f"recovery key of the school (approved: {held}): an admin approves it with `fedfer deploy "
                          f"rotate NAME --ledger-key NEW.pub --recovered`")
    return approved


def _check_recovery_position(entry: dict, state: _ChainState, where: str) -> None:
    """A key recovery continues the old chain's LAST entry: one from an earlier entry of a chain that goes on
    past it (later entries, or another recovery from the same entry) would drop the ε those entries spent.
    (A run copy that starts with a recovery holds nothing before it: the server's anchor checks it.)"""
    prev = entry["prev_hash"]
    if prev != state.last_hash and prev in state.seen:
        line, last = state.seen[prev], state.first_line + len(state.seen) - 1
        dropped = last - line
        raise LedgerError(f"{where}: key recovery continues line {line}, but the chain goes on past it to line {last}: "
                          f"it would drop {dropped} later {'entry' if dropped == 1 else 'entries'} (a recovery "
                          f"continues the old chain's last entry; two recoveries from one entry fork the chain)")
    if state.last is None and state.last_hash == GENESIS_HASH:
        raise LedgerError(f"{where}: key recovery at the start of a chain: there is no chain for it to continue")


def _check_recovery_carries(entry: dict, last: dict, where: str) -> None:
    """A key recovery repeats the terms and ε of the entry it continues (`last`): never a lower ε."""
    for name in ("dataset_fingerprint", "privacy_unit", "delta", "accountant"):
        if entry[name] != last[name]:
            raise LedgerError(f"{where}: key recovery changes {name} from {last[name]!r} to {entry[name]!r}: it "
                              f"repeats the entry it continues")
    for name in ("epsilon", "epsilon_rdp"):
        carried, before = epsilon_value(entry[name]), epsilon_value(last[name])
        if carried < before:
            label = "ε" if name == "epsilon" else "ε (RDP)"
            raise LedgerError(f"{where}: key recovery carries {label} {carried:.6g}, lower than the {label} "
                              f"{before:.6g} of the entry it continues: a recovery spends nothing and repeats the "
                              f"ε so far")


def _signature_problem(entry: dict, key: Ed25519PublicKey, state: _ChainState) -> str:
    """Why an entry's signature fails with the key in force, in the officer's terms."""
    named = entry["key_id"]
    if named in state.retired and named != key_id(key):
        return (f"signed with key {named}, retired by {state.retired[named]}; the key in "
                f"force is {key_id(key)}: a retired (perhaps compromised) key cannot extend the chain")
    if entry["event"] == KEY_RECOVERY:
        return f"key recovery signature does not verify with its approved recovery key {named}"
    if entry["event"] == KEY_TRANSITION:
        return (f"key transition to {entry['new_key_id']} is not signed by the key in force {key_id(key)} (entry "
                f"names key {named}): only the holder of the current key can hand the chain to a new one")
    # key_id is only a name, but when it differs the officer's question is which key, not which byte
    why = "" if named == key_id(key) else \
        ": signed with another key (a rotated-out key, or the key it is checked against was swapped)"
    return f"signature does not verify with the school's public key {key_id(key)} (entry names key {named}){why}"


def _follow_transition(entry: dict, key: Ed25519PublicKey, state: _ChainState, where: str,
                       new: Ed25519PublicKey | None = None) -> None:
    """A key transition signed by the key in force, or a key recovery signed by an approved recovery key `new`:
    from the next entry on, the new key is in force and the old one is retired."""
    what = entry["event"].replace("-", " ")
    try:
        old = load_public_key(entry["old_public_key"].encode("ascii", "replace"))
        named = load_public_key(entry["new_public_key"].encode("ascii", "replace"))
    except ValueError as exc:
        raise LedgerError(f"{where}: {what}: {exc}") from None
    if entry["event"] == KEY_RECOVERY:
        if entry["old_key_id"] != key_id(old) or key_id(old) != key_id(key):
            raise LedgerError(f"{where}: key recovery names lost key {entry['old_key_id']}, but the key in force is "
                              f"{key_id(key)}: a recovery replaces only the key in force (the chain's last key)")
        if new is None or public_key_pem(named) != public_key_pem(new):
            raise LedgerError(f"{where}: key recovery names new key {key_id(named)}, but is signed by another key")
    elif key_id(old) != key_id(key):
        raise LedgerError(f"{where}: key transition names old key {key_id(old)}, but the key in force is {key_id(key)}")
    new = new or named
    if entry["new_key_id"] != key_id(new):
        raise LedgerError(f"{where}: {what} names key id {entry['new_key_id']}, its new key is {key_id(new)}")
    if key_id(new) in state.keys:
        raise LedgerError(f"{where}: {what} back to key {key_id(new)}, which this chain already used: "
                          f"a retired key is never in force again")
    state.retired[key_id(key)] = f"the {what} at {where}"
    state.key = new
    state.keys.append(key_id(new))


def verify_entries(entries: Sequence[Any], public_key: Trusted, *, source: str,
                   school_id: str | None = None, start: str = "genesis", first_line: int = 1,
                   recovery_keys: Sequence[Ed25519PublicKey] = ()) -> KeyChain:
    """Check a chain of entries: fields, hashes, signatures (each with the key in force at its line,
    following key transitions), prev_hash links, run_seq and history_before continuity. `public_key`: the
    school's trusted keys (one key, or the current one first and then its retired ones): the first entry
    must be signed by one of them (:func:`chain_start_key`). `recovery_keys`: the keys the verifier holds as
    approved recovery keys (a key recovery is accepted only when signed by one). Returns the chain's keys.
    Raises ``LedgerError("<source> line N (school X): …")`` at the first problem.

    ``start="genesis"``: the school's own ledger — the first entry links to ``"0"*64``.
    ``start="run"``: a per-run copy — the first entry may link to earlier history the copy does not
    hold, but must be entry 0 of its run (``run_seq`` 0), and every entry must be of that one run.
    """
    if start not in ("genesis", "run"):
        raise ValueError(f"start must be 'genesis' or 'run', got {start!r}")
    trusted = trusted_keys(public_key)
    public_key = trusted[0]
    start_key = chain_start_key(entries, trusted, _where(source, first_line, school_id))
    state = _ChainState(last_hash=GENESIS_HASH if start == "genesis" else None, run_counts={}, histories={},
                        trust_first_history=start == "run", key=start_key, first_line=first_line,
                        recovery_keys={key_id(k): k for k in recovery_keys})
    expected_school = school_id
    run_of_copy = None
    transitions: list[tuple[int, dict]] = []
    for i, entry in enumerate(entries):
        line = first_line + i
        # before the signature: another school's entry would fail it too, but the officer must read whose it is
        named = entry.get("school_id") if isinstance(entry, dict) else None
        if expected_school is not None and isinstance(named, str) and named != expected_school:
            raise LedgerError(f"{_where(source, line, expected_school)}: entry belongs to school {named!r}")
        _check_one(entry, public_key, state, lambda s, line=line: _where(source, line, s or expected_school))
        if expected_school is None:
            expected_school = entry["school_id"]
        if entry["event"] in KEY_CHANGES:
            transitions.append((line, entry))
        elif start == "run":   # a run copy holds the key transitions the school sent with the run
            run_of_copy = run_of_copy or entry["run_id"]
            if entry["run_id"] != run_of_copy:
                raise LedgerError(f"{_where(source, line, expected_school)}: entry of run {entry['run_id']!r} in the "
                                  f"copy of run {run_of_copy!r}")
    check_trusted_key(state.keys, trusted, _where(source, None, expected_school), recovery_keys)
    return KeyChain(list(state.keys) or [key_id(start_key)], state.key or start_key, transitions)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_ledger_line(raw: bytes, where: str) -> Any:
    """One ledger line as JSON, strictly: UTF-8, at most MAX_LINE_BYTES, no NaN/Infinity literals;
    nesting too deep for the parser and integers too long for Python are refused here."""
    if len(raw) > MAX_LINE_BYTES:
        raise LedgerError(f"{where}: line longer than {MAX_LINE_BYTES:,} bytes")
    try:
        # no parse_int/parse_float hooks: a Python call per number would make an audit of long histories
        # (millions of numbers) several times slower. Python refuses integers over 4,300 digits itself;
        # longer-than-MAX_INT_DIGITS ones and floats that overflowed to inf are refused by the field checks.
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise LedgerError(f"{where}: not UTF-8 text") from None
    except RecursionError:
        raise LedgerError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and the hooks' refusals
        raise LedgerError(f"{where}: not valid JSON ({str(exc)[:200]})") from None


def read_ledger_file(path: Path, *, school_id: str | None = None) -> list[dict]:
    """Parse a ledger file strictly: every line one JSON object, no blank or torn lines; a file that
    is not a regular file (a named pipe would block) or a line over MAX_LINE_BYTES is refused."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise LedgerError(f"{path}: not a regular file")
        handle = open(path, "rb")
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read ({exc.strerror})") from exc
    entries = []
    with handle:
        n = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 2)
            if not raw:
                break
            n += 1
            where = _where(str(path), n, school_id)
            if not raw.endswith(b"\n"):
                if len(raw) > MAX_LINE_BYTES:
                    raise LedgerError(f"{where}: line longer than {MAX_LINE_BYTES:,} bytes")
                raise LedgerError(f"{where}: torn last line (no newline)")
            entries.append(parse_ledger_line(raw[:-1], where))
    return entries


def _line(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


#: What a key transition or recovery repeats from the entry before it: the lifetime figures run on unchanged.
_CARRIED_TERMS = ("dataset_fingerprint", "privacy_unit", "sample_rate", "noise_multiplier", "max_grad_norm",
                  "delta", "accountant", "epsilon", "epsilon_rdp", "budget")


class SchoolLedger:
    """The school's authoritative ledger, ``<state_dir>/ledger.jsonl``, chained from genesis.

    Opening verifies the whole file with the school's own key: a school never appends to a ledger
    it cannot vouch for.
    """

    def __init__(self, state_dir: Path, school_id: str, signing_key: Ed25519PrivateKey, *,
                 recovering: Ed25519PublicKey | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.school_id = str(school_id)
        self.signing_key = signing_key
        self.public_key = signing_key.public_key()
        self.path = self.state_dir / LEDGER_FILE
        self._recovering = recovering   # the lost key the ledger may still end under (:meth:`recover` only)
        self._entries = self._read()

    def _trusted(self) -> list[Ed25519PublicKey]:
        """Its own key, then the public keys it retired (``signing_key.retired/``, kept by :meth:`rotate_key`
        and by a key recovery)."""
        return [self.public_key] + retired_public_keys(self.state_dir / PUBLIC_KEY_FILE)

    def _recovery_keys(self) -> list[Ed25519PublicKey]:
        """The keys this school recovered its ledger to (``signing_key.recovered/``, kept by a key recovery)."""
        return recovery_public_keys(self.state_dir / PUBLIC_KEY_FILE)

    def _read(self) -> list[dict]:
        # lexists, not exists: a symlink to a missing or looping target (a ledger on a volume that is not
        # mounted) is refused by read_ledger_file, never taken for a new school and overwritten with a fresh chain
        try:   # a missing or empty ledger beside signs of earlier rounds was lost: never start it again at genesis
            check_ledger_not_lost(self.state_dir, self.school_id)
        except LedgerLostError as exc:
            raise LedgerError(str(exc)) from None
        if not os.path.lexists(self.path):
            return []
        entries = read_ledger_file(self.path, school_id=self.school_id)
        try:   # a ledger older than the last entry this folder signed: an old backup, or a tail cut off
            check_ledger_reaches_head(self.state_dir, [e.get("hash") if isinstance(e, dict) else None for e in entries],
                                      str(self.path))
        except LedgerLostError as exc:
            raise LedgerBehindError(str(exc)) from None
        keys = verify_entries(entries, self._trusted(), source=str(self.path), school_id=self.school_id,
                              start="genesis", recovery_keys=self._recovery_keys())
        if self._recovering is not None and keys.keys[-1] == key_id(self._recovering):
            return entries   # the lost key's chain, about to be recovered
        if keys.keys[-1] != key_id(self.public_key):   # never sign with a retired key: the audit refuses it
            line, transition = keys.transitions[-1]
            raise LedgerError(f"{self.path} line {line} (school {self.school_id}): the ledger's key is {keys.keys[-1]} "
                              f"since its key transition of {transition['timestamp']}, but "
                              f"{self.state_dir / 'signing_key.pem'} is the retired key {key_id(self.public_key)}: "
                              f"run `fedfer deploy school-key --state-dir {self.state_dir} --new-ledger-key` again to "
                              f"finish the rotation")
        return entries

    @property
    def entries(self) -> list[dict]:
        return [dict(e) for e in self._entries]

    def entries_for_run(self, run_id: str) -> list[dict]:
        """The run's entries, with the key transitions just before any of them: the server's copy of the
        run needs them to follow the chain from the key it anchored to the key signing the run."""
        return run_entries(self._entries, run_id)

    @property
    def last_hash(self) -> str:
        return self._entries[-1]["hash"] if self._entries else GENESIS_HASH

    def last_entry_for(self, fingerprint: str) -> dict | None:
        for entry in reversed(self._entries):
            if entry["dataset_fingerprint"] == fingerprint:
                return dict(entry)
        return None

    def append(self, **fields: Any) -> dict:
        """Complete, sign and durably append one entry; returns it as written.

        The caller gives the round's fields (see the module docstring); ``schema``, ``run_seq``,
        ``key_id``, ``prev_hash``, ``hash`` and ``signature`` are set here, ``event`` defaults to
        ``"round"`` and ``timestamp`` to now.
        """
        for name in _LEDGER_SET:
            if name in fields:
                raise LedgerError(f"{self.path}: field '{name}' is set by the ledger, not by the caller")
        if fields.get("school_id", self.school_id) != self.school_id:
            raise LedgerError(f"{self.path}: entry for school {fields['school_id']!r} in the ledger of {self.school_id!r}")
        with locked(self.path):
            self._entries = self._read()  # another process of this school may have appended
            entry: dict[str, Any] = {"schema": SCHEMA, "event": fields.pop("event", "round"),
                                     "school_id": self.school_id}
            entry.update(fields)
            for name in ("epsilon", "epsilon_rdp"):
                if name in entry and entry[name] is not None and not isinstance(entry[name], str):
                    entry[name] = _encode_eps(entry[name])
            for name in ("sample_rate", "noise_multiplier", "max_grad_norm", "delta"):
                if _is_num(entry.get(name)):
                    entry[name] = float(entry[name])
            if "history_before" in entry:
                entry["history_before"] = compress_history_list(entry["history_before"])
            entry.setdefault("timestamp", datetime.now(timezone.utc).isoformat(timespec="seconds"))
            entry["run_seq"] = sum(1 for e in self._entries if e["run_id"] == entry.get("run_id"))
            entry["key_id"] = key_id(self.public_key)
            entry["prev_hash"] = self.last_hash
            entry["hash"] = "0" * 64  # placeholder so the field checks run before hashing
            entry["signature"] = "-"
            where = f"{self.path} line {len(self._entries) + 1} (school {self.school_id})"
            check_entry_fields(entry, where)
            entry["hash"] = entry_hash(entry)
            entry["signature"] = sign_hash(self.signing_key, entry["hash"])
            # the same checks an auditor runs, so nothing unverifiable is ever written
            _check_one(entry, self.public_key, self._chain_state(), lambda s: where)
            if not self._entries:   # the first entry: from now on a missing ledger here is a lost one
                mark_ledger_started(self.state_dir)
            append_line_atomic(self.path, _line(entry))
            self._entries.append(entry)
            record_ledger_head(self.state_dir, len(self._entries), entry["hash"])   # an older ledger is refused
        return dict(entry)

    def rotate_key(self, new_key: Ed25519PrivateKey) -> dict:
        """Append the key transition to `new_key`, signed by the current key, and sign with `new_key` from
        now on. It repeats the last entry's dataset, terms, history and ε and spends nothing, so the
        lifetime figures continue across the keys. Returns the transition entry."""
        if not self._entries:
            raise LedgerError(f"{self.path}: no entries: nothing is signed with the current key, so there is no "
                              f"chain to hand over")
        retire_public_key(self.state_dir / PUBLIC_KEY_FILE, self.public_key)   # verifies the chain's start from now on
        entry = self._append_key_change(KEY_TRANSITION, new_key, old_public_key=public_key_pem(self.public_key))
        self.signing_key, self.public_key = new_key, new_key.public_key()
        return entry

    @classmethod
    def recover(cls, state_dir: Path, school_id: str, lost_key: Ed25519PublicKey,
                new_key: Ed25519PrivateKey) -> dict:
        """Append the key recovery from the lost key (the key the ledger ends under) to `new_key`, signed by
        `new_key`, which must already be kept as retired and approved beside ``signing_key.pub``
        (``signing_key.retired/``, ``signing_key.recovered/``): the ledger verifies with them from now on. It
        repeats the last entry's dataset, terms, history and ε and spends nothing. Returns the entry."""
        ledger = cls(state_dir, school_id, new_key, recovering=lost_key)
        if not ledger._entries:
            raise LedgerError(f"{ledger.path}: no entries: nothing was signed with the lost key, so there is no "
                              f"chain to recover")
        return ledger._append_key_change(KEY_RECOVERY, new_key, old_public_key=public_key_pem(lost_key),
                                         old_key_id=key_id(lost_key))

    def _append_key_change(self, event: str, new_key: Ed25519PrivateKey, **old_key: str) -> dict:
        """Append a key transition or recovery to `new_key`: it repeats the last entry's dataset, terms, history
        and ε and spends nothing, so the lifetime figures continue across the keys."""
        last = self._entries[-1]
        history = self._chain_state().written[last["dataset_fingerprint"]][0]
        new_id = key_id(new_key)
        return self.append(event=event, run_id=f"{event}-{new_id}", round=0, steps=0, history_before=history,
                           new_public_key=public_key_pem(new_key), new_key_id=new_id, **old_key,
                           **{name: last[name] for name in _CARRIED_TERMS})

    def _chain_state(self) -> _ChainState:
        state = _ChainState(last_hash=GENESIS_HASH, run_counts={}, histories={}, trust_first_history=False,
                            key=chain_start_key(self._entries, self._trusted(), str(self.path)),
                            recovery_keys={key_id(k): k for k in self._recovery_keys()})
        noop = lambda s: str(self.path)  # noqa: E731 — already verified on read
        for e in self._entries:
            _check_one(e, self.public_key, state, noop)
        return state


class ServerLedgerCopy:
    """The server's per-run copy, ``<run_dir>/ledger/<school>.jsonl``, plus the school's public key
    in ``<run_dir>/keys/<school>.pub`` and the keys it replaced in ``keys/<school>.retired/`` (which
    ``fedfer privacy audit`` uses only with
    ``--trust-run-keys``: an officer verifies against the keyring registered at enrollment)."""

    @staticmethod
    def path(run_dir: Path, school_id: str) -> Path:
        _check_school_name(school_id)
        return Path(run_dir) / "ledger" / f"{school_id}.jsonl"

    @staticmethod
    def store_public_key(run_dir: Path, school_id: str, public_key: Ed25519PublicKey | str | Path) -> Path:
        _check_school_name(school_id)
        path = Path(run_dir) / "keys" / f"{school_id}.pub"
        pem = public_key_pem(load_public_key(public_key))
        if path.exists() and path.read_text(encoding="ascii") != pem:
            raise LedgerError(f"{path}: school {school_id} already has a different public key in this run")
        if not path.exists():
            write_public_key(path, pem)
        return path

    @staticmethod
    def append_verified(run_dir: Path, school_id: str, entry: Mapping[str, Any],
                        public_key: Ed25519PublicKey | str | Path) -> bool:
        """Verify one entry from a school's reply and store it. Returns False if it was already
        stored (a retried reply), True if appended. Raises LedgerError if the signature, hash or
        fields are bad, if it is not the school's, or if it does not link to the last entry stored
        for the school — the first entry stored in a run may link to any earlier history but must
        be the school's first entry of the run (``run_seq`` 0)… or a later one if the server missed
        the school's earlier replies: it is stored, and the auditor reports the copy as incomplete
        (exit 2). Sending the school's entries of the run with every reply (:meth:`sync_verified`,
        ``SchoolLedger.entries_for_run``) keeps the copy complete.
        """
        return bool(ServerLedgerCopy.sync_verified(run_dir, school_id, [entry], public_key))

    @staticmethod
    def sync_verified(run_dir: Path, school_id: str, entries: Sequence[Mapping[str, Any]],
                      public_key: Ed25519PublicKey | str | Path) -> list[dict]:
        """Store the entries (the school's entries of this run, or a suffix of them) that the copy
        does not hold yet, after verifying that they extend it. Returns the newly stored ones."""
        path = ServerLedgerCopy.path(run_dir, school_id)
        pinned = Path(run_dir) / "keys" / f"{school_id}.pub"
        public_key = load_public_key(public_key)
        # the pinned key, then the ones it replaced in this run (the stored copy may start under one)
        trusted = [public_key] + retired_public_keys(pinned)
        recovery_keys = {key_id(k): k for k in recovery_public_keys(pinned)}
        source = f"reply from school {school_id}"
        stored_new: list[dict] = []
        with locked(path):
            stored = read_ledger_file(path, school_id=school_id) if path.exists() else []
            chain = list(stored) + [dict(e) for e in entries]
            start = chain_start_key(chain, trusted, _where(source, None, school_id))   # before anything is written
            state = _ChainState(last_hash=None, run_counts={}, histories={}, trust_first_history=True, key=start,
                                recovery_keys=recovery_keys)
            if stored and isinstance(stored[0], dict) and isinstance(stored[0].get("run_seq"), int):
                state.run_counts[str(stored[0].get("run_id"))] = stored[0]["run_seq"]
            for n, e in enumerate(stored, start=1):
                _check_one(e, public_key, state, lambda s, n=n: _where(str(path), n, school_id))
            known = {e["hash"] for e in stored}
            run_of_copy = copy_run_id(stored) if any(e.get("event") not in KEY_CHANGES for e in stored) else None
            for i, entry in enumerate(entries):
                entry = dict(entry)
                where_of = lambda s, i=i: _where(source, None, school_id) + f" entry {i + 1}"  # noqa: E731
                if isinstance(entry.get("hash"), str) and entry["hash"] in known:
                    continue
                if entry.get("school_id") != school_id:
                    raise LedgerError(f"{where_of(None)}: entry names school {entry.get('school_id')!r}")
                transition = entry.get("event") in KEY_CHANGES
                if run_of_copy is not None and not transition and entry.get("run_id") != run_of_copy:
                    raise LedgerError(f"{where_of(None)}: entry of run {entry.get('run_id')!r}, this copy is run {run_of_copy!r}")
                if not stored and not stored_new and isinstance(entry.get("run_seq"), int):
                    state.run_counts[str(entry.get("run_id"))] = entry["run_seq"]  # see append_verified
                _check_one(entry, public_key, state, where_of)
                if entry["event"] == KEY_RECOVERY and state.last is entry and len(state.seen) == 1:
                    _check_recovered_epsilon(entry, where_of(None))   # nothing before it here to compare with
                if key_id(public_key) not in state.keys:   # new entries are under the pinned key or one it handed to
                    raise LedgerError(f"{where_of(None)}: signed by key {state.keys[-1]}, which this run keeps as a "
                                      f"retired key of the school; its pinned key is {key_id(public_key)}: a retired "
                                      f"key signs only entries before its key transition")
                run_of_copy = run_of_copy if transition else entry["run_id"]
                append_line_atomic(path, _line(entry))
                known.add(entry["hash"])
                stored_new.append(entry)
            if key_id(state.key) != key_id(public_key) and key_id(public_key) in state.keys:
                # the pinned key handed the chain over: the run's key is the new one from now on, the old one is
                # kept retired (the stored copy starts under it: re-verifying it and the audit need it)
                retire_public_key(pinned, public_key)
                write_public_key(pinned, state.key)
        return stored_new


def _check_recovered_epsilon(entry: Mapping[str, Any], where: str) -> None:
    """A key recovery the server holds nothing before (the first entry of a run copy): its ε must be what its
    history gives (within PRV's own error), not less. The anchor has checked the history itself."""
    from privacy.accounting import epsilon_of

    history = [tuple(h) for h in entry["history_before"]]
    for name, kind in (("epsilon", entry["accountant"] if entry["accountant"] in ("prv", "rdp") else "prv"),
                       ("epsilon_rdp", "rdp")):
        carried, recomputed = epsilon_value(entry[name]), epsilon_of(history, entry["delta"], kind)
        if carried < recomputed - (0.01 + 0.005 * recomputed):
            raise LedgerError(f"{where}: key recovery carries ε {carried:.6g}, lower than its history gives "
                              f"({recomputed:.6g}, {kind}): a recovery repeats the ε so far")


def run_entries(entries: Sequence[Mapping[str, Any]], run_id: str) -> list[dict]:
    """A run's entries from a school's whole chain, each preceded by the key transitions and recoveries chained
    just before it (a school changes its key between runs: the next run's copy starts with the change)."""
    out: list[dict] = []
    pending: list[dict] = []
    for e in entries:
        if e["event"] in KEY_CHANGES:
            pending.append(dict(e))
            continue
        if e["run_id"] == run_id:
            out += pending + [dict(e)]
        pending = []
    return out


def copy_run_id(entries: Sequence[Mapping[str, Any]]) -> str:
    """The run a run copy is of: its first entry that is not a key transition or recovery names it."""
    return next((str(e["run_id"]) for e in entries if e.get("event") not in KEY_CHANGES),
                str(entries[0]["run_id"]) if entries else "")


def _check_school_name(school_id: str) -> None:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", str(school_id)):
        raise LedgerError(f"school id {school_id!r} is not usable as a file name (letters, digits, _ . - only)")


def record_round(acct, ledger: SchoolLedger, *, run_id: str, round: int, privacy_unit: str,
                 noise_multiplier: float, sample_rate: float, steps: int, max_grad_norm: float,
                 delta: float, budget: float | None, accountant: str = "prv", **extra: Any) -> dict:
    """After a round's training, before its update leaves the school: append the signed ledger entry
    and record the round in the accountant. Returns the entry (send it with the reply).

    Order: ledger first, then accountant. A crash between the two leaves the accountant one round
    behind the ledger; :func:`reconcile` (called here first) restores it, so spending is never lost.
    """
    reconcile(acct, ledger)
    if hasattr(acct, "check_terms"):
        acct.check_terms(privacy_unit, delta)  # before anything is signed: a mixed history is refused
    history_before = acct.history
    planned = [(noise_multiplier, sample_rate, steps)]
    from privacy.accounting import epsilon_of

    entry = ledger.append(
        event="round", dataset_fingerprint=acct.fingerprint, run_id=str(run_id), round=int(round),
        privacy_unit=privacy_unit, sample_rate=float(sample_rate), noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm), steps=int(steps), delta=float(delta), accountant=accountant,
        history_before=history_before,
        epsilon=epsilon_of(history_before + planned, delta, accountant),
        epsilon_rdp=epsilon_of(history_before + planned, delta, "rdp"),
        budget=None if budget is None or math.isinf(budget) else float(budget), **extra,
    )
    acct.record(noise_multiplier, sample_rate, steps, privacy_unit=privacy_unit, delta=delta)
    return entry


def record_refusal(acct, ledger: SchoolLedger, *, run_id: str, round: int, privacy_unit: str,
                   noise_multiplier: float, sample_rate: float, planned_steps: int, max_grad_norm: float,
                   delta: float, budget: float | None, reason: str = "budget-exhausted",
                   accountant: str = "prv", **extra: Any) -> dict:
    """Append a signed ``refused`` entry (nothing trained, nothing spent); ε is the current one."""
    reconcile(acct, ledger)
    history = acct.history
    from privacy.accounting import epsilon_of

    return ledger.append(
        event="refused", reason=reason, planned_steps=int(planned_steps), dataset_fingerprint=acct.fingerprint,
        run_id=str(run_id), round=int(round), privacy_unit=privacy_unit, sample_rate=float(sample_rate),
        noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm), steps=0,
        delta=float(delta), accountant=accountant, history_before=history,
        epsilon=epsilon_of(history, delta, accountant), epsilon_rdp=epsilon_of(history, delta, "rdp"),
        budget=None if budget is None or math.isinf(budget) else float(budget), **extra,
    )


def reconcile(acct, ledger: SchoolLedger) -> None:
    """Bring the accountant up to the ledger if a crash fell between ledger append and accountant
    record. Raises LedgerError if they disagree in any other way (the accountant file or the ledger
    was replaced or edited): silently picking one could under-count spending."""
    last = ledger.last_entry_for(acct.fingerprint)
    if last is None:
        return
    acct_hist = history_key(acct.history)
    after = history_key(last["history_before"] + (
        [[last["noise_multiplier"], last["sample_rate"], last["steps"]]] if last["event"] == "round" else []))
    if acct_hist == after:
        return
    if last["event"] == "round" and acct_hist == history_key(last["history_before"]):
        acct.record(last["noise_multiplier"], last["sample_rate"], last["steps"])
        return
    raise LedgerError(f"{ledger.path}: accountant {acct.path} disagrees with the ledger for dataset "
                      f"{acct.fingerprint[:16]} (ledger: {sorted(after.items())}, accountant: {sorted(acct_hist.items())})")
