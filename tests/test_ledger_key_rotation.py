"""A school rotates its ledger signing key without losing its lifetime budget.

The old key signs a key transition appended to the school's own chain; every later entry is signed by the
new key. The lifetime ε runs on across the keys (and the budget guard with it); the server's run copy, its
pinned key and its anchors follow the transition; the audit verifies each entry with the key in force,
names the transition and refuses a forged transition, a retired key used after it, and a keyring key the
chain never used. The commands: `fedfer deploy school-key --new-ledger-key` (school) and `fedfer deploy
rotate NAME --ledger-key` (coordinator).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedfer.cli import main as fedfer_main
from privacy.accounting import SchoolAccountant, dataset_fingerprint, epsilon_of
from privacy.budget import check_budget
from privacy.ledger import (KEY_TRANSITION, LedgerError, SchoolLedger, ServerLedgerCopy, entry_hash,
                            read_ledger_file, record_refusal)
from privacy.signing import key_id, load_or_create_signing_key, public_key_pem, sign_hash
from server.deploy.commands import rotate_school_ledger_key
from test_ledger_trust import DELTA, Q, SIGMA, STEPS, School, Server, _audit, _keyring


def _rotate(school: School) -> dict:
    """`fedfer deploy school-key --new-ledger-key` at the school; returns the transition entry."""
    rotate_school_ledger_key(school.state)
    school.key = load_or_create_signing_key(school.state)
    return read_ledger_file(school.state / "ledger.jsonl")[-1]


def _train(server: Server, school: School, rounds: range) -> None:
    for rnd in rounds:
        server.receive(school, rnd, school.train(server.run.run_id, rnd))


def _rotated_federation(root: Path) -> tuple[School, Server, Server, Ed25519PrivateKey]:
    """school-a trains 2 rounds in run-1 under its first key, rotates, trains 2 rounds in run-2."""
    school = School(root, "school-a")
    first = Server(root, "run-1", [school])
    _train(first, school, range(1, 3))
    old_key = school.key
    _rotate(school)
    second = Server(root, "run-2", [school])   # the coordinator's keyring has the new key: it is pinned
    _train(second, school, range(1, 3))
    return school, first, second, old_key


def _forge(state: Path, key: Ed25519PrivateKey, **change) -> None:
    """Append to a school's ledger an entry like its last one, chained to it and signed by `key`."""
    path = state / "ledger.jsonl"
    last = read_ledger_file(path)[-1]
    spent = [tuple(h) for h in last["history_before"]] + ([(SIGMA, Q, last["steps"])] if last["event"] == "round" else [])
    history = [(SIGMA, Q, sum(n for _, _, n in spent))]
    entry = {k: v for k, v in last.items() if k not in ("old_public_key", "new_public_key", "new_key_id")}
    entry.update(event="round", prev_hash=last["hash"], key_id=key_id(key), round=last["round"] + 1, run_id="run-x",
                 run_seq=0, history_before=[list(h) for h in history], steps=STEPS)
    entry.update(change)
    if entry["event"] == "round":
        history = history + [(SIGMA, Q, STEPS)]
    entry["epsilon"], entry["epsilon_rdp"] = epsilon_of(history, DELTA, "prv"), epsilon_of(history, DELTA, "rdp")
    entry["hash"] = entry_hash(entry)
    entry["signature"] = sign_hash(key, entry["hash"])
    with path.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------------- lifetime ε
def test_rotation_keeps_lifetime_epsilon_and_the_budget_guard_refuses_at_the_budget(tmp_path):
    school = School(tmp_path, "school-a")
    for rnd in (1, 2):
        school.train("run-1", rnd)
    before = read_ledger_file(school.state / "ledger.jsonl")[-1]
    old_id = key_id(school.key)
    transition = _rotate(school)
    assert transition["event"] == KEY_TRANSITION and transition["steps"] == 0
    assert transition["key_id"] == old_id and transition["new_key_id"] == key_id(school.key) != old_id
    assert transition["epsilon"] == before["epsilon"] and transition["prev_hash"] == before["hash"]
    assert transition["history_before"] == [[SIGMA, Q, 2 * STEPS]]
    assert not (school.state / "signing_key.new.pem").exists()
    assert key_id(load_or_create_signing_key(school.state)) != old_id   # the old private key is gone

    after = school.train("run-2", 1)[-1]   # signed by the new key, ε over all three rounds
    assert after["key_id"] == key_id(school.key)
    assert after["epsilon"] == pytest.approx(epsilon_of([(SIGMA, Q, 3 * STEPS)], DELTA, "prv"))

    acct = SchoolAccountant(school.state, school.name, dataset_fingerprint([f"school-a,row{i}" for i in range(5)]))
    ledger = SchoolLedger(school.state, school.name, school.key)
    budget = after["epsilon"] + 0.01   # room for nothing more: the next round must be refused
    assert not check_budget(acct, (SIGMA, Q, STEPS), DELTA, budget).allowed
    refusal = record_refusal(acct, ledger, run_id="run-2", round=2, privacy_unit="student", noise_multiplier=SIGMA,
                             sample_rate=Q, planned_steps=STEPS, max_grad_norm=1.0, delta=DELTA, budget=budget)
    assert refusal["epsilon"] == after["epsilon"] and refusal["key_id"] == key_id(school.key)


def test_the_retired_key_cannot_sign_for_the_school_any_more(tmp_path):
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    old = school.key
    _rotate(school)
    with pytest.raises(LedgerError, match="retired key .* --new-ledger-key"):
        SchoolLedger(school.state, school.name, old)   # e.g. a node started before the rotation


# ----------------------------------------------------------------------------------- audit
def test_audit_passes_a_rotated_chain_and_names_the_transition(tmp_path, capsys):
    school, first, second, old = _rotated_federation(tmp_path)
    keys = _keyring(tmp_path, [school])
    code, out = _audit(capsys, first.run.path, second.run.path, school.state / "ledger.jsonl", "--keys", keys,
                       "--budget", "50", "--json")
    report = json.loads(out)
    assert code == 0, out
    lifetime = report["lifetime"][0]
    assert lifetime["steps"] == 4 * STEPS and lifetime["key_id"] == key_id(school.key)
    assert lifetime["epsilon"] == pytest.approx(epsilon_of([(SIGMA, Q, 4 * STEPS)], DELTA, "prv"), abs=0.02)
    transitions = [t for row in report["schools"] for t in row["key_transitions"]]
    assert any(f"ledger key {key_id(old)} → {key_id(school.key)}" in t and "ledger.jsonl line 3" in t
               for t in transitions), transitions
    assert any(f"signed with key {key_id(old)}, which the school retired later" in t for t in transitions)
    assert not report["problems"] and all(row["status"] == "ok" for row in report["schools"])


def test_audit_with_a_keyring_that_still_holds_the_retired_key_says_to_update_it(tmp_path, capsys):
    school, _, second, old = _rotated_federation(tmp_path)
    keys = tmp_path / "old-keys"
    keys.mkdir()
    (keys / "school-a.pub").write_text(public_key_pem(old))
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 0 and f"the keyring's key {key_id(old)} is retired" in out and "--ledger-key" in out, out


def test_forged_transition_signed_by_the_new_key_only_is_tampered(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    new = Ed25519PrivateKey.generate()   # a thief's key, or a school that lost its old one
    _forge(school.state, new, event=KEY_TRANSITION, steps=0, old_public_key=public_key_pem(school.key),
           new_public_key=public_key_pem(new), new_key_id=key_id(new))
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "school-a.pub").write_text(public_key_pem(new))
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "line 2" in out and f"not signed by the key in force {key_id(school.key)}" in out, out
    with pytest.raises(LedgerError, match="not signed by the key in force"):
        SchoolLedger(school.state, school.name, new)


def test_old_key_used_after_the_transition_is_tampered(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    old = school.key
    _rotate(school)
    _forge(school.state, old)   # the compromised old key extends the chain
    keys = _keyring(tmp_path, [school])
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "line 3" in out and f"signed with key {key_id(old)}, retired by the key transition" in out, out


def test_keyring_key_that_is_in_no_chain_is_tampered(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    _rotate(school)
    stranger = Ed25519PrivateKey.generate()
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "school-a.pub").write_text(public_key_pem(stranger))
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and f"the key it is checked against ({key_id(stranger)}) is none of the keys" in out, out


# ----------------------------------------------------------------------------------- server
def test_run_copy_and_anchors_follow_the_rotation_across_runs(tmp_path, capsys):
    school, first, second, old = _rotated_federation(tmp_path)
    copy = read_ledger_file(ServerLedgerCopy.path(second.run.path, "school-a"))
    assert [e["event"] for e in copy] == [KEY_TRANSITION, "round", "round"]
    anchors = json.loads((tmp_path / "runs" / "anchors" / "school-a.json").read_text())
    (kid, chain), = anchors["chains"].items()   # one chain, moved to the new key
    assert kid == key_id(school.key) and chain["retired"] == [key_id(old)] and chain["count"] == 5
    assert [r["run_id"] for r in chain["runs"]] == ["run-1", "run-2"]
    third = Server(tmp_path, "run-3", [school])   # the next run continues the anchored chain
    _train(third, school, range(1, 2))
    assert not third.events()
    # the old key forks the chain before the transition: the server refuses it
    fork = tmp_path / "fork"
    fork.mkdir()
    for name in ("ledger.jsonl",):
        lines = (school.state / name).read_text().splitlines()[:2]   # run-1 only, before the transition
        (fork / name).write_text("\n".join(lines) + "\n")
    _forge(fork, old, run_id=third.run.run_id, round=2)
    entry = read_ledger_file(fork / "ledger.jsonl")[-1]
    from server.strategy import RejectedUpdate

    with pytest.raises(RejectedUpdate, match="does not verify"):
        third.receive(school, 2, [entry])
    code, out = _audit(capsys, first.run.path, second.run.path, third.run.path, school.state / "ledger.jsonl",
                       "--keys", _keyring(tmp_path, [school]))
    assert code == 0, out


def test_a_rotation_during_a_run_switches_the_runs_pinned_key(tmp_path):
    school = School(tmp_path, "school-a")
    server = Server(tmp_path, "run-1", [school])   # pinned: the first key
    _train(server, school, range(1, 2))
    old = school.key
    _rotate(school)
    _train(server, school, range(2, 3))
    copy = read_ledger_file(ServerLedgerCopy.path(server.run.path, "school-a"))
    assert [e["event"] for e in copy] == ["round", KEY_TRANSITION, "round"]
    assert server.run.key_path("school-a").read_text() == public_key_pem(school.key) != public_key_pem(old)
    _train(server, school, range(3, 4))   # and the next reply verifies against the switched pin


def test_server_refuses_a_transition_from_a_key_it_never_anchored(tmp_path):
    from server.strategy import RejectedUpdate

    school = School(tmp_path, "school-a")
    _train(Server(tmp_path, "run-1", [school]), school, range(1, 3))
    other = School(tmp_path / "elsewhere", "school-a")   # a made-up chain under another key, handed to a new key
    other.train("run-0", 1)
    _rotate(other)
    server = Server(tmp_path, "run-2", [other])
    with pytest.raises(RejectedUpdate, match="unanchored-transition"):
        server.receive(other, 1, other.train(server.run.run_id, 1))
    assert [e["problem"] for e in server.events()] == ["unanchored-transition"]


# ----------------------------------------------------------------------------------- commands
def test_school_key_new_ledger_key_happy_path_and_interrupted_rotation(tmp_path, capsys):
    from privacy.signing import stage_new_signing_key

    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    old = key_id(school.key)
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(school.state), "--new-ledger-key"]) == 0
    out = capsys.readouterr().out
    new = key_id(load_or_create_signing_key(school.state))
    assert f"new key {new}" in out and f"key transition {old} → {new}" in out and "line 2" in out
    assert "fedfer deploy rotate NAME --ledger-key signing_key.pub" in out
    assert (school.state / "signing_key.pub").read_text() == public_key_pem(load_or_create_signing_key(school.state))
    # interrupted after the transition, before the key swap: running it again finishes with the same key
    staged = stage_new_signing_key(school.state)
    SchoolLedger(school.state, school.name, load_or_create_signing_key(school.state)).rotate_key(staged)
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(school.state), "--new-ledger-key"]) == 0
    assert key_id(load_or_create_signing_key(school.state)) == key_id(staged)
    assert len(read_ledger_file(school.state / "ledger.jsonl")) == 3 and not (school.state / "signing_key.new.pem").exists()


@pytest.mark.parametrize("case", ["no-key", "tampered-ledger", "with-node-key"])
def test_school_key_new_ledger_key_bad_input_changes_nothing(tmp_path, capsys, case):
    state = tmp_path / "state"
    if case != "no-key":
        school = School(tmp_path, "school-a")
        school.train("run-1", 1)
        state = school.state
        ledger = state / "ledger.jsonl"
        if case == "tampered-ledger":
            ledger.write_text(ledger.read_text().replace('"steps": 8', '"steps": 4'))
    before = {p.name: p.read_bytes() for p in state.iterdir()} if state.exists() else {}
    argv = ["deploy", "school-key", "--state-dir", str(state), "--new-ledger-key"]
    if case == "with-node-key":
        with pytest.raises(SystemExit) as exc:
            fedfer_main(argv + ["--new-node-key"])
        assert exc.value.code == 2
        err = capsys.readouterr().err   # argparse: its usage, then one error line
        assert err.strip().splitlines()[-1].endswith("not allowed with argument --new-ledger-key"), err
    else:
        assert fedfer_main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    after = {p.name: p.read_bytes() for p in state.iterdir()} if state.exists() else {}
    assert after == before


def test_rotate_ledger_key_at_the_coordinator(tmp_path, capsys):
    from server.deploy import commands as deploy_cli

    dep = deploy_cli.init_deployment(tmp_path / "deploy", "fl.district.example", [], port=19093,
                                     flwr_home=tmp_path / "home")
    state = tmp_path / "school-machine"
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(state)]) == 0
    assert fedfer_main(["deploy", "add-school", "lincoln", "--data-dir", "/srv/data", "--declared-students", "900",
                        "--ledger-key", str(state / "signing_key.pub"), "--node-key", str(state / "supernode.pub"),
                        "--state-dir", str(state), "--dir", str(dep.root), "--flwr-home", str(tmp_path / "home")]) == 0
    old = (dep.keyring / "lincoln.pub").read_text()
    node_pub = (dep.node_dir("lincoln") / "supernode.pub").read_text()
    capsys.readouterr()
    rotate = ["deploy", "rotate", "lincoln", "--dir", str(dep.root), "--flwr-home", str(tmp_path / "home")]
    # bad input: the same key, not a key, an unknown school: one line each, the keyring untouched
    (tmp_path / "junk.pub").write_text("not a key")
    for bad, expect in ((["--ledger-key", str(state / "signing_key.pub")], "already its ledger key"),
                        (["--ledger-key", str(tmp_path / "junk.pub")], "not a PEM public key"),
                        (["--ledger-key", str(tmp_path / "missing.pub")], "not a file")):
        assert fedfer_main(rotate + bad) == 2
        err = capsys.readouterr().err
        assert expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert (dep.keyring / "lincoln.pub").read_text() == old
    assert fedfer_main(["deploy", "rotate", "nobody", "--ledger-key", str(state / "signing_key.pub"),
                        "--dir", str(dep.root)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # the happy path: the school rotates (its ledger is still empty: the key is simply replaced) and sends it
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(state), "--new-ledger-key"]) == 0
    capsys.readouterr()
    assert fedfer_main(rotate + ["--ledger-key", str(state / "signing_key.pub")]) == 0
    out = capsys.readouterr().out
    new = load_or_create_signing_key(state)
    assert (dep.keyring / "lincoln.pub").read_text() == public_key_pem(new) and f"→ {key_id(new)}" in out
    assert (dep.node_dir("lincoln") / "supernode.pub").read_text() == node_pub   # the node key is left alone
