"""`install_new_signing_key` (the last step of a ledger-key rotation or recovery) replaces the school's private
signing key and then its public half `signing_key.pub`. A crash between the two left a `.pub` naming the old key
beside the new private key, and nothing repaired it — yet the `.pub` is what the school sends the coordinator
(`fedfer deploy rotate NAME --ledger-key signing_key.pub`) and what `--recover-ledger-key` takes as the lost
key's public half. Now the pair is consistent after the next load, whatever point the crash came at, and a
`.pub` that may be the only copy of a key (the private key restored from a backup older than a rotation, or
lost) is never overwritten."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy import signing
from privacy.ledger import read_ledger_file, verify_entries
from privacy.signing import (NEW_PUBLIC_KEY_FILE, PUBLIC_KEY_FILE, SIGNING_KEY_FILE, key_id, load_or_create_signing_key,
                             load_public_key, retire_public_key, retired_public_keys)
from server.deploy.commands import recover_school_ledger_key, rotate_school_ledger_key
from test_ledger_trust import School


class Crash(Exception):
    """The process dies here (nothing after this point of the install runs)."""


def _crash_at_the_key_swap(monkeypatch, after: bool) -> None:
    """signing.py's os.replace of the staged key onto signing_key.pem raises (`after`: once it is done)."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).name != SIGNING_KEY_FILE:
            return real(src, dst)
        if after:
            real(src, dst)
        raise Crash(f"{'after' if after else 'before'} the key swap")

    monkeypatch.setattr(signing.os, "replace", replace)


def _public_half(state: Path) -> str:
    return key_id(load_public_key(state / PUBLIC_KEY_FILE))


def _rotated_state(tmp_path: Path, monkeypatch, after: bool) -> tuple[School, str, str]:
    """school-a trained a round, then its rotation crashed at the key swap; returns (school, old id, staged id)."""
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    old = key_id(school.key)
    _crash_at_the_key_swap(monkeypatch, after)
    with pytest.raises(Crash):
        rotate_school_ledger_key(school.state)
    monkeypatch.undo()
    staged = read_ledger_file(school.state / "ledger.jsonl")[-1]["new_key_id"]   # the transition came before the swap
    return school, old, staged


def test_a_crash_after_the_private_key_swap_is_repaired_by_the_next_load(tmp_path, monkeypatch, caplog):
    school, old, new = _rotated_state(tmp_path, monkeypatch, after=True)
    key = load_or_create_signing_key(school.state)
    assert key_id(key) == new and _public_half(school.state) == new   # was: the .pub still named the old key
    assert not (school.state / NEW_PUBLIC_KEY_FILE).exists()
    assert [r.getMessage() for r in caplog.records if "interrupted key install" in r.getMessage()]
    # the school's own ledger verifies with its pair, as it does after an uninterrupted rotation
    keys = verify_entries(read_ledger_file(school.state / "ledger.jsonl"),
                          [key.public_key()] + retired_public_keys(school.state / PUBLIC_KEY_FILE), source="ledger")
    assert keys.keys == [old, new]


def test_a_crash_before_the_swap_keeps_the_old_pair_and_running_it_again_finishes(tmp_path, monkeypatch):
    school, old, staged = _rotated_state(tmp_path, monkeypatch, after=False)
    assert key_id(load_or_create_signing_key(school.state)) == old and _public_half(school.state) == old
    rotate_school_ledger_key(school.state)
    assert key_id(load_or_create_signing_key(school.state)) == staged == _public_half(school.state)
    assert not (school.state / NEW_PUBLIC_KEY_FILE).exists() and not (school.state / "signing_key.new.pem").exists()


def test_a_rotation_killed_after_the_swap_and_run_again_reports_it_instead_of_rotating_again(tmp_path, monkeypatch):
    """Run again before anything loaded the key (signing_key.new.pub still there): the rotation was complete but
    for the .pub, so the command finishes it and reports that rotation; it used to hand the ledger to yet
    another key (a second transition, a key the admin had not asked for)."""
    school, old, new = _rotated_state(tmp_path, monkeypatch, after=True)
    entries = read_ledger_file(school.state / "ledger.jsonl")
    rotation = rotate_school_ledger_key(school.state)
    assert (rotation.old_key_id, rotation.new_key_id, rotation.transition_line) == (old, new, len(entries))
    assert read_ledger_file(school.state / "ledger.jsonl") == entries   # no second transition
    assert key_id(load_or_create_signing_key(school.state)) == new == _public_half(school.state)


def test_after_a_crash_and_a_lost_key_recovery_names_the_right_key(tmp_path, monkeypatch):
    """The repaired .pub names the key in force, so a recovery after losing it (default: signing_key.pub as the
    lost key's public half) continues the chain; with the stale .pub it refused: 'chain ends under key …'."""
    school, _, new = _rotated_state(tmp_path, monkeypatch, after=True)
    load_or_create_signing_key(school.state)   # the node's next start
    (school.state / SIGNING_KEY_FILE).unlink()  # then the disk loses the key
    recovery = recover_school_ledger_key(school.state)
    assert recovery.lost_key_id == new


def test_a_pub_left_by_an_older_fedfers_interrupted_install_is_rewritten(tmp_path):
    """No signing_key.new.pub (an older fedfer): the .pub names a key the school retired, so it is stale."""
    school = School(tmp_path, "school-a")
    old = school.key
    retire_public_key(school.state / PUBLIC_KEY_FILE, old)   # rotation's step before the swap
    installed = Ed25519PrivateKey.generate()   # the swap done, the .pub not written yet
    signing.atomic_write_bytes(school.state / SIGNING_KEY_FILE, signing._private_pem(installed), mode=0o600)
    assert _public_half(school.state) == key_id(old)
    load_or_create_signing_key(school.state)
    assert _public_half(school.state) == key_id(installed)


def test_a_pub_naming_a_key_the_school_never_retired_is_left_alone(tmp_path):
    """The private key restored from a backup older than a rotation: the .pub names the newer key, which may be
    the school's only copy of it (a recovery needs it). Not a crash the loader can tell: left as it is."""
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    backup = (school.state / SIGNING_KEY_FILE).read_bytes()
    rotate_school_ledger_key(school.state)
    newer = _public_half(school.state)
    (school.state / SIGNING_KEY_FILE).write_bytes(backup)
    load_or_create_signing_key(school.state)
    assert _public_half(school.state) == newer


def test_with_the_private_key_lost_the_pub_is_kept_for_the_recovery(tmp_path):
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    lost = key_id(school.key)
    (school.state / SIGNING_KEY_FILE).unlink()
    with pytest.raises(signing.SigningKeyError, match="recover-ledger-key"):
        load_or_create_signing_key(school.state)
    assert _public_half(school.state) == lost


def test_a_recovery_killed_after_the_key_swap_is_finished_by_running_it_again(tmp_path, monkeypatch):
    """Its docstring promised it; it refused instead ('the key is there and readable, so the key is not lost'),
    pointing the admin at a rotation — a further key and transition for a recovery that was complete."""
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    lost = key_id(school.key)
    (school.state / SIGNING_KEY_FILE).unlink()
    _crash_at_the_key_swap(monkeypatch, after=True)
    with pytest.raises(Crash):
        recover_school_ledger_key(school.state)
    monkeypatch.undo()
    entries = read_ledger_file(school.state / "ledger.jsonl")
    again = recover_school_ledger_key(school.state)
    assert (again.lost_key_id, again.new_key_id, again.recovery_line) == (lost, entries[-1]["new_key_id"], 2)
    assert _public_half(school.state) == again.new_key_id   # what the admin sends the coordinator
    assert read_ledger_file(school.state / "ledger.jsonl") == entries   # nothing appended


def test_a_key_at_hand_is_still_refused_as_not_lost(tmp_path):
    from server.deploy.commands import DeployError

    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    with pytest.raises(DeployError, match="not lost"):
        recover_school_ledger_key(school.state)
