"""A school that LOSES its ledger signing key carries its lifetime ε on under a new key (key recovery).

Nothing can sign a key transition for a lost key, so the new key signs a `key-recovery` entry itself: it names
the lost key, continues the old chain from its last entry (prev_hash) and repeats that entry's history and ε.
The soundness rule: a recovery never lowers the ε anyone counts. The new key is trusted only because an admin
approved it as a recovery key (`fedfer deploy rotate NAME --ledger-key NEW.pub --recovered` keeps it in the
keyring's `<school>.recovered/`; the school's own ledger trusts the key it made), never because the chain says
so; the old chain must verify under a trusted (retired) key up to the entry the recovery continues; evidence of
later old-chain entries (the chain going on past that entry, the server's anchors, its run copies) is a finding.

The forgery tests (a)-(e) each check verify_entries/the school's ledger loader, the server's copy and the audit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedfer.cli import main as fedfer_main
from privacy.accounting import SchoolAccountant, dataset_fingerprint, epsilon_of
from privacy.budget import check_budget
from privacy.ledger import (KEY_RECOVERY, LedgerError, SchoolLedger, ServerLedgerCopy, entry_hash,
                            read_ledger_file, verify_entries)
from privacy.signing import (SigningKeyError, approve_recovery_key, key_id, load_or_create_signing_key,
                             load_public_key, public_key_pem, retire_public_key, sign_hash)
from server.deploy.commands import DeployError, recover_school_ledger_key, rotate_school_ledger_key
from server.strategy import RejectedUpdate
from test_ledger_trust import DELTA, Q, SIGMA, STEPS, School, Server, _audit, _keyring
from test_ledger_key_rotation import enrolled_school, keyring_server


def _lose_key(school: School) -> Ed25519PrivateKey:
    """The disk lost signing_key.pem; its public half signing_key.pub is still there. Returns the lost key."""
    lost = school.key
    (school.state / "signing_key.pem").unlink()
    return lost


def _recover(school: School) -> dict:
    """`fedfer deploy school-key --recover-ledger-key` at the school; returns the recovery entry."""
    recover_school_ledger_key(school.state)
    school.key = load_or_create_signing_key(school.state)
    return read_ledger_file(school.state / "ledger.jsonl")[-1]


def _approved_keyring(root: Path, school: School, lost, *recovery_keys) -> Path:
    """The keyring after `fedfer deploy rotate NAME --ledger-key NEW.pub --recovered`: the new key current, the
    lost one retired, the new one approved as a recovery key."""
    keys = root / "deploy" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / f"{school.name}.pub").write_text(public_key_pem(school.key))
    retire_public_key(keys / f"{school.name}.pub", lost)
    for key in recovery_keys or (school.key,):
        approve_recovery_key(keys / f"{school.name}.pub", key)
    return keys


def _approve_in_run(server: Server, school: School, lost, *recovery_keys) -> None:
    """What the server's key pinning copies from an approved keyring into the run's keys/."""
    pinned = server.run.key_path(school.name)
    pinned.write_text(public_key_pem(school.key))
    retire_public_key(pinned, lost)
    for key in recovery_keys or (school.key,):
        approve_recovery_key(pinned, key)


def _train(server: Server, school: School, rounds: range) -> None:
    for rnd in rounds:
        server.receive(school, rnd, school.train(server.run.run_id, rnd))


def _forged_recovery(prefix: list[dict], lost, new: Ed25519PrivateKey, **change) -> dict:
    """A key-recovery entry continuing `prefix` (its last entry), signed by `new`, with `change` applied."""
    last = prefix[-1]
    spent = sum(h[2] for h in last["history_before"]) + (last["steps"] if last["event"] == "round" else 0)
    entry = {k: v for k, v in last.items() if k not in ("old_public_key", "old_key_id", "new_public_key",
                                                         "new_key_id", "reason", "planned_steps")}
    entry.update(event=KEY_RECOVERY, steps=0, prev_hash=last["hash"], key_id=key_id(new), round=0, run_seq=0,
                 run_id=f"{KEY_RECOVERY}-{key_id(new)}", history_before=[[SIGMA, Q, spent]],
                 old_public_key=public_key_pem(lost), old_key_id=key_id(lost), new_public_key=public_key_pem(new),
                 new_key_id=key_id(new))
    entry.update(change)
    entry["hash"] = entry_hash(entry)
    entry["signature"] = sign_hash(new, entry["hash"])
    return entry


def _write(path: Path, entries: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def _recovered_federation(root: Path) -> tuple[School, Server, Server, Ed25519PrivateKey]:
    """school-a trains 2 rounds of run-1 under K0, loses K0, recovers to K1, trains 2 rounds of run-2."""
    school = School(root, "school-a")
    first = Server(root, "run-1", [school])
    _train(first, school, range(1, 3))
    lost = _lose_key(school)
    _recover(school)
    second = Server(root, "run-2", [school])
    _approve_in_run(second, school, lost)
    _train(second, school, range(1, 3))
    return school, first, second, lost


# ----------------------------------------------------------------------------------- the lifetime ε carries on
def test_recovery_carries_the_lifetime_epsilon_on_under_the_new_key(tmp_path):
    school = School(tmp_path, "school-a")
    for rnd in (1, 2):
        school.train("run-1", rnd)
    before = read_ledger_file(school.state / "ledger.jsonl")[-1]
    lost = _lose_key(school)
    recovery = _recover(school)
    assert recovery["event"] == KEY_RECOVERY and recovery["steps"] == 0 and recovery["prev_hash"] == before["hash"]
    assert recovery["key_id"] == recovery["new_key_id"] == key_id(school.key) != key_id(lost)
    assert recovery["old_key_id"] == key_id(lost) and recovery["old_public_key"] == public_key_pem(lost)
    assert recovery["epsilon"] == before["epsilon"] and recovery["history_before"] == [[SIGMA, Q, 2 * STEPS]]
    after = school.train("run-2", 1)   # the run's entries start with the recovery
    assert [e["event"] for e in after] == [KEY_RECOVERY, "round"] and after[-1]["key_id"] == key_id(school.key)
    assert after[-1]["epsilon"] == pytest.approx(epsilon_of([(SIGMA, Q, 3 * STEPS)], DELTA, "prv"))
    acct = SchoolAccountant(school.state, school.name, dataset_fingerprint([f"school-a,row{i}" for i in range(5)]))
    budget = after[-1]["epsilon"] + 0.01   # the budget guard refuses the next round as it would without the loss
    assert not check_budget(acct, (SIGMA, Q, STEPS), DELTA, budget).allowed
    assert check_budget(acct, (SIGMA, Q, STEPS), DELTA, 50.0).allowed
    # the school keeps the lost key's public half as retired (its chain starts under it) and its own approval
    assert (school.state / "signing_key.retired" / f"{key_id(lost)}.pub").read_text() == public_key_pem(lost)
    assert (school.state / "signing_key.recovered" / f"{key_id(school.key)}.pub").is_file()


def test_recovered_chain_passes_the_server_and_the_audit_which_names_the_recovery(tmp_path, capsys):
    school, first, second, lost = _recovered_federation(tmp_path)
    copy = read_ledger_file(ServerLedgerCopy.path(second.run.path, "school-a"))
    assert [e["event"] for e in copy] == [KEY_RECOVERY, "round", "round"]
    anchors = json.loads((tmp_path / "runs" / "anchors" / "school-a.json").read_text())
    (kid, chain), = anchors["chains"].items()   # one chain, moved to the new key
    assert kid == key_id(school.key) and chain["retired"] == [key_id(lost)] and chain["count"] == 5
    keys = _approved_keyring(tmp_path, school, lost)
    code, out = _audit(capsys, first.run.path, second.run.path, school.state / "ledger.jsonl", "--keys", keys,
                       "--budget", "50", "--json")
    report = json.loads(out)
    assert code == 0, out
    assert report["lifetime"][0]["steps"] == 4 * STEPS
    lifetime = epsilon_of([(SIGMA, Q, 4 * STEPS)], DELTA, "prv")
    assert report["lifetime"][0]["epsilon"] == pytest.approx(lifetime, abs=0.02)
    notes = [t for row in report["schools"] for t in row["key_transitions"]]
    assert any(f"ledger key {key_id(lost)} (lost) → {key_id(school.key)} by key recovery" in t and "line 3" in t
               and "ε carried" in t for t in notes), notes


def test_plain_rotation_keyring_does_not_approve_a_recovery(tmp_path, capsys):
    """The keyring trusts the new key (current) but the admin never approved it as a recovery key: a recovery
    is a hand-over the old key did not sign, so it needs the explicit approval."""
    school = School(tmp_path, "school-a")
    _train(Server(tmp_path, "run-1", [school]), school, range(1, 2))
    lost = _lose_key(school)
    _recover(school)
    keys = _approved_keyring(tmp_path, school, lost)
    shutil.rmtree(keys / "school-a.recovered")
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and f"key recovery by key {key_id(school.key)}, which the verifier never approved" in out, out
    assert "--recovered" in out
    server = Server(tmp_path, "run-2", [school])   # pins the new key, keeps the lost one retired: no approval
    retire_public_key(server.run.key_path("school-a"), lost)
    entries = school.train(server.run.run_id, 1)
    with pytest.raises(LedgerError, match="never approved"):   # the run's copy on its own
        ServerLedgerCopy.sync_verified(server.run.path, "school-a", entries, server.run.key_path("school-a"))
    with pytest.raises(RejectedUpdate, match="not approved in this run"):   # and the server's reply check
        server.receive(school, 1, entries)
    assert not ServerLedgerCopy.path(server.run.path, "school-a").exists()


def test_recovery_during_a_run_counts_there_once_the_keyring_approves_it(tmp_path):
    """A run pins a school's keys when it first selects it. The school loses its key mid-run and recovers; once
    the coordinator approved the new key in the keyring, the run takes it from there (as it would at its start)
    and accepts the recovery with the school's next reply."""
    school = School(tmp_path, "school-a")
    keys = _keyring(tmp_path, [school])   # enrolled with its first key
    server = keyring_server(tmp_path, "run-1", school, keys)
    _train(server, school, range(1, 2))
    lost = _lose_key(school)
    _recover(school)
    _approved_keyring(tmp_path, school, lost)   # `fedfer deploy rotate school-a --ledger-key … --recovered`
    _train(server, school, range(2, 3))
    assert [e["event"] for e in read_ledger_file(ServerLedgerCopy.path(server.run.path, "school-a"))] == [
        "round", KEY_RECOVERY, "round"]
    assert server.run.key_path("school-a").read_text() == public_key_pem(school.key)
    (kid, chain), = json.loads((tmp_path / "runs" / "anchors" / "school-a.json").read_text())["chains"].items()
    assert kid == key_id(school.key) and chain["retired"] == [key_id(lost)]


def test_unapproved_recovery_stops_the_school_in_that_run(tmp_path):
    """Not approved (yet): the reply is refused and the school is not selected again in this run, rather than
    spending ε every round on replies the server refuses."""
    school = School(tmp_path, "school-a")
    server = Server(tmp_path, "run-1", [school])
    _train(server, school, range(1, 2))
    _lose_key(school)
    _recover(school)
    with pytest.raises(RejectedUpdate, match="key recovery to key .* not approved in this run: .*--recovered"):
        server.receive(school, 2, school.train(server.run.run_id, 2))
    assert "school-a" in server.strategy.exhausted
    assert [e["event"] for e in server.events()] == ["ledger-recovery"]


# ------------------------------------------------------------------------------ (a) an early entry of a longer chain
def _early_recovery(root: Path) -> tuple[School, list[dict], Server, Ed25519PrivateKey]:
    """school-a trains 3 rounds (the server anchors them), loses its key AND restores an old ledger backup of 1
    entry, then recovers from it: the recovery continues entry 1 of a 3-entry chain."""
    school = School(root, "school-a")
    server = Server(root, "run-1", [school])
    _train(server, school, range(1, 2))
    backup = root / "backup"
    shutil.copytree(school.state, backup)   # the ledger and accountant after round 1
    _train(server, school, range(2, 4))
    full = read_ledger_file(school.state / "ledger.jsonl")
    shutil.rmtree(school.state)
    shutil.copytree(backup, school.state)
    lost = _lose_key(school)
    _recover(school)
    return school, full, server, lost


def test_a_early_pointer_is_refused_by_verify_entries(tmp_path):
    school, full, _, lost = _early_recovery(tmp_path)
    recovery = read_ledger_file(school.state / "ledger.jsonl")[-1]
    with pytest.raises(LedgerError, match="line 4 .*key recovery continues line 1, but the chain goes on past it "
                                          "to line 3: it would drop 2 later entries"):
        verify_entries(full + [recovery], [school.key.public_key(), lost.public_key()], source="ledger",
                       recovery_keys=[school.key.public_key()])


def test_a_early_pointer_is_refused_by_the_server(tmp_path):
    school, _, _, lost = _early_recovery(tmp_path)
    server = Server(tmp_path, "run-2", [school])
    _approve_in_run(server, school, lost)
    with pytest.raises(RejectedUpdate, match="truncated-tail"):
        server.receive(school, 1, school.train(server.run.run_id, 1))
    assert [e["problem"] for e in server.events()] == ["truncated-tail"]


def test_a_early_pointer_is_refused_by_the_audit(tmp_path, capsys):
    school, _, first, lost = _early_recovery(tmp_path)
    keys = _approved_keyring(tmp_path, school, lost)
    code, out = _audit(capsys, first.run.path, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "key recovery at line 2 continues anchored entry 1 of 3" in out \
        and "truncated the old chain" in out, out


def test_a_early_pointer_is_found_by_the_audit_from_the_run_copies_alone(tmp_path, capsys):
    """No anchors (deleted, or another coordinator's runs): the run copy of the old chain shows entries after the
    one the recovery continues, with a higher ε."""
    school, _, first, lost = _early_recovery(tmp_path)
    second = Server(tmp_path, "run-2", [school])
    _approve_in_run(second, school, lost)
    with pytest.raises(RejectedUpdate):   # the server refuses it, but suppose its copy were kept anyway
        second.receive(school, 1, school.train(second.run.run_id, 1))
    _write(ServerLedgerCopy.path(second.run.path, "school-a"), school.train(second.run.run_id, 2)[:1])
    shutil.rmtree(tmp_path / "runs" / "anchors")
    (second.run.path / "events.jsonl").unlink()
    keys = _approved_keyring(tmp_path, school, lost)
    code, out = _audit(capsys, first.run.path, second.run.path, "--keys", keys)
    assert code == 2 and "key recovery continues entry" in out and "run-1" in out and "line 2" in out \
        and "truncated the old chain" in out, out


def test_a_early_pointer_is_found_by_the_audit_from_a_later_runs_copy_alone(tmp_path, capsys):
    """The dropped entries are in a later run's copy only, which starts after the entry the recovery continues
    (its first entry follows an entry the copy does not hold); no anchors, no copy of the first run."""
    school = School(tmp_path, "school-a")
    _train(Server(tmp_path, "run-1", [school]), school, range(1, 2))
    backup = tmp_path / "backup"
    shutil.copytree(school.state, backup)
    second = Server(tmp_path, "run-2", [school])
    _train(second, school, range(1, 3))
    shutil.rmtree(school.state)
    shutil.copytree(backup, school.state)
    lost = _lose_key(school)
    _recover(school)
    shutil.rmtree(tmp_path / "runs" / "anchors")
    keys = _approved_keyring(tmp_path, school, lost)
    code, out = _audit(capsys, second.run.path, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "key recovery continues entry" in out and "truncated the old chain" in out, out


def test_a_early_pointer_is_found_by_the_audit_against_every_anchored_chain_of_the_ledgers_keys(tmp_path, capsys):
    """The recovery never reached the server (the school trained once more before it was approved, so no run copy
    carries it): the server anchored the new key as a chain of its own. The school's ledger is still checked
    against the lost key's anchored chain, which shows the entries the recovery dropped."""
    school, _, _, lost = _early_recovery(tmp_path)
    school.train("run-x", 1)   # a round the server never stored: the next run's copy starts after the recovery
    second = Server(tmp_path, "run-2", [school])
    _train(second, school, range(1, 2))
    assert [e["event"] for e in read_ledger_file(ServerLedgerCopy.path(second.run.path, "school-a"))] == ["round"]
    keys = _approved_keyring(tmp_path, school, lost)
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys, "--anchors", tmp_path / "runs" / "anchors")
    assert code == 2 and "key recovery at line 2 continues anchored entry 1 of 3" in out, out


def test_a_early_pointer_reaching_the_server_only_as_new_key_rounds_is_a_history_reset(tmp_path):
    """The same at the server: a run that keeps the lost key as retired compares the new key's first entries,
    which continue a chain it never saw, with what the lost key anchored: less spending is a history reset."""
    school, _, _, lost = _early_recovery(tmp_path)
    school.train("run-x", 1)
    second = Server(tmp_path, "run-2", [school])
    _approve_in_run(second, school, lost)
    with pytest.raises(RejectedUpdate, match="history-reset"):
        second.receive(school, 1, school.train(second.run.run_id, 1))
    assert [e["problem"] for e in second.events()] == ["history-reset"]


# ----------------------------------------------------------------------------------- (b) a lower ε
def _lower_epsilon(root: Path) -> tuple[School, list[dict], Ed25519PrivateKey, Ed25519PrivateKey]:
    school = School(root, "school-a")
    for rnd in (1, 2):
        school.train("run-1", rnd)
    chain = read_ledger_file(school.state / "ledger.jsonl")
    lost = school.key
    new = Ed25519PrivateKey.generate()
    recovery = _forged_recovery(chain, lost, new, epsilon=chain[-1]["epsilon"] / 2)
    return school, chain + [recovery], lost, new


def test_b_lower_epsilon_is_refused_by_verify_entries_and_the_schools_ledger(tmp_path):
    school, entries, lost, new = _lower_epsilon(tmp_path)
    with pytest.raises(LedgerError, match="line 3 .*key recovery carries ε .* lower than the ε .* of the entry it "
                                          "continues"):
        verify_entries(entries, [new.public_key(), lost.public_key()], source="ledger",
                       recovery_keys=[new.public_key()])
    _write(school.state / "ledger.jsonl", entries)
    retire_public_key(school.state / "signing_key.pub", lost)
    approve_recovery_key(school.state / "signing_key.pub", new)
    with pytest.raises(LedgerError, match="lower than the ε"):
        SchoolLedger(school.state, school.name, new)


def test_b_lower_epsilon_is_refused_by_the_server_and_the_audit(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    first = Server(tmp_path, "run-1", [school])
    _train(first, school, range(1, 3))
    chain = read_ledger_file(school.state / "ledger.jsonl")
    lost = school.key
    school.key = Ed25519PrivateKey.generate()
    recovery = _forged_recovery(chain, lost, school.key, epsilon=chain[-1]["epsilon"] / 2)
    second = Server(tmp_path, "run-2", [school])
    _approve_in_run(second, school, lost)
    pinned = second.run.key_path("school-a")
    with pytest.raises(LedgerError, match="key recovery carries ε .* lower than its history gives"):
        ServerLedgerCopy.sync_verified(second.run.path, "school-a", [recovery], pinned)
    assert not ServerLedgerCopy.path(second.run.path, "school-a").exists()
    keys = _approved_keyring(tmp_path, school, lost)
    _write(tmp_path / "handed-in" / "ledger.jsonl", chain + [recovery])
    code, out = _audit(capsys, tmp_path / "handed-in" / "ledger.jsonl", first.run.path, "--keys", keys)
    assert code == 2 and "lower than the ε" in out, out


# ------------------------------------------------------------------------------ (c) a key the verifier never trusted
def test_c_untrusted_recovery_key_is_refused_everywhere(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    first = Server(tmp_path, "run-1", [school])
    _train(first, school, range(1, 3))
    chain = read_ledger_file(school.state / "ledger.jsonl")
    lost = school.key
    approved = Ed25519PrivateKey.generate()   # the key the admin approved
    thief = Ed25519PrivateKey.generate()      # a key nobody approved
    recovery = _forged_recovery(chain, lost, thief)
    with pytest.raises(LedgerError, match=f"line 3 .*key recovery by key {key_id(thief)}, which the verifier never "
                                          f"approved"):
        verify_entries(chain + [recovery], [approved.public_key(), lost.public_key()], source="ledger",
                       recovery_keys=[approved.public_key()])
    school.key = approved
    second = Server(tmp_path, "run-2", [school])
    _approve_in_run(second, school, lost)
    with pytest.raises(LedgerError, match="never approved"):
        ServerLedgerCopy.sync_verified(second.run.path, "school-a", [recovery], second.run.key_path("school-a"))
    assert not ServerLedgerCopy.path(second.run.path, "school-a").exists()
    keys = _approved_keyring(tmp_path, school, lost)
    _write(tmp_path / "handed-in" / "ledger.jsonl", chain + [recovery])
    code, out = _audit(capsys, tmp_path / "handed-in" / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "never approved" in out, out


# ----------------------------------------------------------------------------------- (d) a recovery in the middle of a chain
def test_d_lost_key_signing_after_the_recovery_is_refused_everywhere(tmp_path, capsys):
    """The 'lost' key turns up again (or a thief has it): it cannot extend the chain after the recovery."""
    school, first, second, lost = _recovered_federation(tmp_path)
    entries = read_ledger_file(school.state / "ledger.jsonl")
    last = entries[-1]
    late = {**last, "key_id": key_id(lost), "prev_hash": last["hash"], "round": 3, "run_seq": 2,
            "history_before": [[SIGMA, Q, 4 * STEPS]],
            "epsilon": epsilon_of([(SIGMA, Q, 5 * STEPS)], DELTA, "prv"),
            "epsilon_rdp": epsilon_of([(SIGMA, Q, 5 * STEPS)], DELTA, "rdp")}
    late["hash"] = entry_hash(late)
    late["signature"] = sign_hash(lost, late["hash"])
    with pytest.raises(LedgerError, match=f"line 6 .*signed with key {key_id(lost)}, retired by the key recovery"):
        verify_entries(entries + [late], [school.key.public_key(), lost.public_key()], source="ledger",
                       recovery_keys=[school.key.public_key()])
    with pytest.raises(RejectedUpdate, match="does not verify"):
        second.receive(school, 3, read_ledger_file(ServerLedgerCopy.path(second.run.path, "school-a")) + [late])
    _write(school.state / "ledger.jsonl", entries + [late])
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", _approved_keyring(tmp_path, school, lost))
    assert code == 2 and "retired by the key recovery" in out, out


def test_d_recovery_from_a_key_already_handed_over_is_refused_everywhere(tmp_path, capsys):
    """K0 → K1 by a proper transition; a recovery then names K0 as lost: a fork from the middle of the chain."""
    school = School(tmp_path, "school-a")
    _train(Server(tmp_path, "run-1", [school]), school, range(1, 2))
    k0 = school.key
    rotate_school_ledger_key(school.state)
    k1 = school.key = load_or_create_signing_key(school.state)
    second = Server(tmp_path, "run-2", [school])
    retire_public_key(second.run.key_path("school-a"), k0)
    _train(second, school, range(1, 2))
    chain = read_ledger_file(school.state / "ledger.jsonl")   # round, transition, round
    k2 = Ed25519PrivateKey.generate()
    recovery = _forged_recovery(chain, k0, k2)
    trusted = [k2.public_key(), k1.public_key(), k0.public_key()]
    with pytest.raises(LedgerError, match=f"line 4 .*key recovery names lost key {key_id(k0)}, but the key in "
                                          f"force is {key_id(k1)}"):
        verify_entries(chain + [recovery], trusted, source="ledger", recovery_keys=[k2.public_key()])
    approve_recovery_key(second.run.key_path("school-a"), k2)   # even a run that approved k2
    with pytest.raises(LedgerError, match="key in force"):
        ServerLedgerCopy.sync_verified(second.run.path, "school-a", [recovery], second.run.key_path("school-a"))
    school.key = k2
    keys = _approved_keyring(tmp_path, school, k0)
    retire_public_key(keys / "school-a.pub", k1)
    _write(tmp_path / "handed-in" / "ledger.jsonl", chain + [recovery])
    code, out = _audit(capsys, tmp_path / "handed-in" / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "key in force" in out, out


def test_d_recovery_cannot_start_a_chain(tmp_path):
    """A 'recovery' at genesis continues nothing: it would only carry a made-up history under a new key."""
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    lost, new = school.key, Ed25519PrivateKey.generate()
    recovery = _forged_recovery(read_ledger_file(school.state / "ledger.jsonl"), lost, new,
                                prev_hash="0" * 64, history_before=[])
    with pytest.raises(LedgerError, match="line 1 .*key recovery at the start of a chain"):
        verify_entries([recovery], [new.public_key(), lost.public_key()], source="ledger",
                       recovery_keys=[new.public_key()])


# ----------------------------------------------------------------------------------- (e) two recoveries race
def _racing_recoveries(root: Path) -> tuple[School, School, Server, Ed25519PrivateKey]:
    """Two copies of the school's state (say two admins each restored a backup) each recover from the same last
    entry, to two different keys."""
    school = School(root, "school-a")
    server = Server(root, "run-1", [school])
    _train(server, school, range(1, 3))
    lost = _lose_key(school)
    twin = School.__new__(School)
    twin.name, twin.state = school.name, root / "twin" / school.name
    shutil.copytree(school.state, twin.state)
    _recover(school)
    _recover(twin)
    return school, twin, server, lost


def test_e_racing_recoveries_are_refused_by_verify_entries(tmp_path):
    school, twin, _, lost = _racing_recoveries(tmp_path)
    one = read_ledger_file(school.state / "ledger.jsonl")
    other = read_ledger_file(twin.state / "ledger.jsonl")[-1]
    with pytest.raises(LedgerError, match="line 4 .*key recovery continues line 2, but the chain goes on past it "
                                          "to line 3"):
        verify_entries(one + [other], [school.key.public_key(), lost.public_key()], source="ledger",
                       recovery_keys=[school.key.public_key(), twin.key.public_key()])


def test_e_racing_recoveries_are_refused_by_the_server_and_the_audit(tmp_path, capsys):
    school, twin, first, lost = _racing_recoveries(tmp_path)
    second = Server(tmp_path, "run-2", [school])
    _approve_in_run(second, school, lost)
    _train(second, school, range(1, 2))   # the first recovery is accepted and anchored
    third = Server(tmp_path, "run-3", [twin])   # an admin approved the twin's key as well
    _approve_in_run(third, twin, lost, school.key, twin.key)
    with pytest.raises(RejectedUpdate, match="truncated-tail"):
        third.receive(twin, 1, twin.train(third.run.run_id, 1))
    keys = _approved_keyring(tmp_path, twin, lost, school.key, twin.key)
    code, out = _audit(capsys, first.run.path, second.run.path, twin.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "key recovery at line 3 continues anchored entry 2 of" in out, out
    # without the anchors, the two school ledgers side by side show the fork
    shutil.rmtree(tmp_path / "runs" / "anchors")
    code, out = _audit(capsys, school.state / "ledger.jsonl", twin.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "key recovery continues entry" in out and "holds another entry after it" in out, out


# ----------------------------------------------------------------------------------- commands
def test_node_does_not_make_a_new_key_beside_a_ledger_its_lost_key_signed(tmp_path):
    """Before recovery existed, a node whose signing_key.pem was deleted made a fresh key, overwrote
    signing_key.pub (the lost key's public half, which a recovery names) and then could not open its ledger."""
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    pub = (school.state / "signing_key.pub").read_text()
    _lose_key(school)
    with pytest.raises(SigningKeyError, match="--recover-ledger-key"):
        load_or_create_signing_key(school.state)
    assert (school.state / "signing_key.pub").read_text() == pub and not (school.state / "signing_key.pem").exists()


def test_school_key_recover_ledger_key_command(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    argv = ["deploy", "school-key", "--state-dir", str(school.state), "--recover-ledger-key"]
    before = {p.name: p.read_bytes() for p in school.state.iterdir() if p.is_file()}
    assert fedfer_main(argv) == 2   # the key is still there: rotation is the right tool
    err = capsys.readouterr().err
    assert "--new-ledger-key" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in school.state.iterdir() if p.is_file()} == before
    lost = _lose_key(school)
    assert fedfer_main(argv) == 0
    out = capsys.readouterr().out
    new = load_or_create_signing_key(school.state)
    assert f"key recovery {key_id(lost)} (lost) → {key_id(new)}" in out and "line 2" in out, out
    assert "fedfer deploy rotate school-a --ledger-key signing_key.pub --recovered" in out and "NAME" not in out, out
    assert load_public_key(school.state / "signing_key.pub").public_bytes_raw() == new.public_key().public_bytes_raw()
    school.key = new
    assert school.train("run-2", 1)[-1]["key_id"] == key_id(new)


def test_recovery_interrupted_before_the_key_swap_is_finished_by_running_it_again(tmp_path):
    from privacy.signing import stage_new_signing_key

    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    lost = _lose_key(school)
    staged = stage_new_signing_key(school.state)   # the command's first steps: the new key, then the entry
    retire_public_key(school.state / "signing_key.pub", lost)
    approve_recovery_key(school.state / "signing_key.pub", staged)
    SchoolLedger.recover(school.state, school.name, lost.public_key(), staged)
    recover_school_ledger_key(school.state)   # crashed before the swap: finishing does not append again
    assert key_id(load_or_create_signing_key(school.state)) == key_id(staged)
    assert [e["event"] for e in read_ledger_file(school.state / "ledger.jsonl")] == ["round", KEY_RECOVERY]


def test_recovery_with_the_lost_public_key_from_the_coordinator(tmp_path, capsys):
    """signing_key.pub is gone with the private key: the coordinator's keys/NAME.pub names the lost key."""
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    from_keyring = tmp_path / "school-a.pub"
    from_keyring.write_text(public_key_pem(school.key))
    lost = _lose_key(school)
    (school.state / "signing_key.pub").unlink()
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(school.state), "--recover-ledger-key",
                        "--lost-key", str(from_keyring)]) == 0
    assert f"key recovery {key_id(lost)} (lost)" in capsys.readouterr().out
    recovery = read_ledger_file(school.state / "ledger.jsonl")[-1]
    assert recovery["event"] == KEY_RECOVERY and recovery["old_key_id"] == key_id(lost)
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(school.state), "--lost-key", "x.pub"]) == 2
    assert "--lost-key goes with --recover-ledger-key" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["ledger-dir", "ledger-fifo"])
def test_a_ledger_that_is_not_a_regular_file_is_named_as_such_not_as_missing(tmp_path, case):
    """Fuzzer (session 23): a ledger.jsonl that is a directory or a named pipe was refused as "no ledger.jsonl,
    so no chain to continue", which sends the school looking for a file that is there."""
    import os

    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    _lose_key(school)
    ledger = school.state / "ledger.jsonl"
    ledger.unlink()
    ledger.mkdir() if case == "ledger-dir" else os.mkfifo(ledger)
    with pytest.raises(DeployError) as exc:
        recover_school_ledger_key(school.state)
    assert f"{ledger} is not a regular file" in str(exc.value) and "no ledger.jsonl" not in str(exc.value)
    assert not (school.state / "signing_key.new.pem").exists()


@pytest.mark.parametrize("case", ["no-ledger", "no-public-key", "ledger-not-under-it"])
def test_recover_ledger_key_bad_input_changes_nothing(tmp_path, case):
    school = School(tmp_path, "school-a")
    if case != "no-ledger":
        school.train("run-1", 1)
    _lose_key(school)
    if case == "no-public-key":
        (school.state / "signing_key.pub").unlink()
    if case == "ledger-not-under-it":
        (school.state / "signing_key.pub").write_text(public_key_pem(Ed25519PrivateKey.generate()))
    before = {p.name: p.read_bytes() for p in school.state.iterdir() if p.is_file()}
    with pytest.raises(DeployError) as exc:
        recover_school_ledger_key(school.state)
    assert "\n" not in str(exc.value)
    assert {p.name: p.read_bytes() for p in school.state.iterdir() if p.is_file()} == before
    assert not (school.state / "signing_key.new.pem").exists()


def test_a_lost_key_that_signed_no_entry_is_named_as_the_wrong_key_not_as_a_broken_chain(tmp_path, capsys):
    """Fuzzer (session 23): --lost-key with another school's key, on a ledger that went through a rotation,
    was refused as "the chain goes A → B and never through the current key", blaming an intact ledger; the
    refusal names the --lost-key file and says it signed no entry. Nothing is written."""
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    rotate_school_ledger_key(school.state)
    school.key = load_or_create_signing_key(school.state)
    school.train("run-2", 1)
    _lose_key(school)
    foreign = tmp_path / "foreign.pub"
    foreign.write_text(public_key_pem(Ed25519PrivateKey.generate()))
    before = {p.name: p.read_bytes() for p in school.state.iterdir() if p.is_file()}
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(school.state), "--recover-ledger-key",
                        "--lost-key", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert f"{foreign}: key " in err and "signed no entry" in err and "--lost-key" in err, err
    assert "never through the current key" not in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in school.state.iterdir() if p.is_file()} == before


def test_rotate_recovered_at_the_coordinator_approves_the_key(tmp_path, capsys):
    dep, state = enrolled_school(tmp_path)
    old = load_public_key(dep.keyring / "lincoln.pub")
    new = Ed25519PrivateKey.generate()
    (tmp_path / "new.pub").write_text(public_key_pem(new))
    capsys.readouterr()
    rotate = ["deploy", "rotate", "lincoln", "--ledger-key", str(tmp_path / "new.pub"), "--dir", str(dep.root)]
    assert fedfer_main(rotate + ["--recovered"]) == 0
    out = capsys.readouterr().out
    assert f"{key_id(old)} (lost) → {key_id(new)}" in out and "recovered" in out, out
    assert (dep.keyring / "lincoln.recovered" / f"{key_id(new)}.pub").read_text() == public_key_pem(new)
    assert (dep.keyring / "lincoln.retired" / f"{key_id(old)}.pub").is_file()
    assert fedfer_main(["deploy", "rotate", "lincoln", "--recovered", "--dir", str(dep.root)]) == 2
    assert "--recovered goes with --ledger-key" in capsys.readouterr().err
    # an admin who ran a plain rotate first adds the approval afterwards
    other = Ed25519PrivateKey.generate()
    (tmp_path / "other.pub").write_text(public_key_pem(other))
    other_rotate = ["deploy", "rotate", "lincoln", "--ledger-key", str(tmp_path / "other.pub"), "--dir", str(dep.root)]
    assert fedfer_main(other_rotate) == 0 and not (dep.keyring / "lincoln.recovered" / f"{key_id(other)}.pub").exists()
    assert fedfer_main(other_rotate + ["--recovered"]) == 0
    assert "now approved as its recovery key" in capsys.readouterr().out
    assert (dep.keyring / "lincoln.recovered" / f"{key_id(other)}.pub").read_text() == public_key_pem(other)


def test_run_pinned_from_an_approving_keyring_copies_the_recovery_keys(tmp_path):
    school = School(tmp_path, "school-a")
    _train(Server(tmp_path, "run-1", [school]), school, range(1, 2))
    lost = _lose_key(school)
    _recover(school)
    keys = _approved_keyring(tmp_path, school, lost)
    server = keyring_server(tmp_path, "run-2", school, keys)
    assert (server.run.path / "keys" / "school-a.recovered" / f"{key_id(school.key)}.pub").is_file()
    _train(server, school, range(1, 2))
    assert [e["event"] for e in read_ledger_file(ServerLedgerCopy.path(server.run.path, "school-a"))] == [KEY_RECOVERY, "round"]
