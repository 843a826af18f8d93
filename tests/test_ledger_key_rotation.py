"""A school rotates its ledger signing key without losing its lifetime budget.

The old key signs a key transition appended to the school's own chain; every later entry is signed by the
new key. The lifetime ε runs on across the keys (and the budget guard with it); the server's run copy, its
pinned key and its anchors follow the transition; the audit verifies each entry with the key in force,
names the transition and refuses a forged transition, a retired key used after it, and a keyring key the
chain never used. Trust flows forward only: a chain must start under a key the verifier already trusts
(the current key, or a retired one from a trusted source: the keyring's `<school>.retired/`, the run's
`keys/<school>.retired/`, the school's `signing_key.retired/`), never a key the entries name. The commands: `fedfer deploy school-key --new-ledger-key` (school) and `fedfer deploy
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
                            read_ledger_file, record_refusal, verify_entries)
from privacy.signing import key_id, load_or_create_signing_key, public_key_pem, retire_public_key, sign_hash
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
    retire_public_key(second.run.key_path(school.name), old_key)   # and its retired one, as _pin_key copies it
    _train(second, school, range(1, 3))
    return school, first, second, old_key


def _rotated_keyring(root: Path, school: School, old: Ed25519PrivateKey) -> Path:
    """The keyring after `fedfer deploy rotate NAME --ledger-key`: the new key, the old one kept retired."""
    keys = _keyring(root, [school])
    retire_public_key(keys / f"{school.name}.pub", old)
    return keys


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
    keys = _rotated_keyring(tmp_path, school, old)
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
    assert any(f"ends under key {key_id(old)}, a retired key the keyring keeps" in t for t in transitions)
    assert not report["problems"] and all(row["status"] == "ok" for row in report["schools"])


def test_pre_rotation_run_copy_passes_with_the_updated_keyring(tmp_path, capsys):
    school, first, _, old = _rotated_federation(tmp_path)
    code, out = _audit(capsys, first.run.path, "--keys", _rotated_keyring(tmp_path, school, old))
    assert code == 0 and f"ends under key {key_id(old)}, a retired key the keyring keeps" in out, out


def test_keyring_with_only_the_new_key_refuses_a_rotated_chain_and_says_to_add_the_retired_key(tmp_path, capsys):
    school, first, second, old = _rotated_federation(tmp_path)
    code, out = _audit(capsys, school.state / "ledger.jsonl", second.run.path, "--keys", _keyring(tmp_path, [school]))
    assert code == 2 and f"starts under key {key_id(old)}, which is not a trusted key ({key_id(school.key)})" in out
    assert "add that retired key (`fedfer deploy rotate NAME --ledger-key` keeps it in keys/<school>.retired/)" in out


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
    retire_public_key(keys / "school-a.pub", school.key)   # even a keyring that trusts the old key as retired
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "line 2" in out and f"not signed by the key in force {key_id(school.key)}" in out, out
    retire_public_key(school.state / "signing_key.pub", school.key)
    with pytest.raises(LedgerError, match="not signed by the key in force"):
        SchoolLedger(school.state, school.name, new)


def test_old_key_used_after_the_transition_is_tampered(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    old = school.key
    _rotate(school)
    _forge(school.state, old)   # the compromised old key extends the chain
    keys = _rotated_keyring(tmp_path, school, old)
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "line 3" in out and f"signed with key {key_id(old)}, retired by the key transition" in out, out


def test_keyring_key_the_chain_does_not_start_under_is_tampered(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    old = school.key
    _rotate(school)
    stranger = Ed25519PrivateKey.generate()
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "school-a.pub").write_text(public_key_pem(stranger))
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and f"starts under key {key_id(old)}, which is not a trusted key ({key_id(stranger)})" in out, out


def test_retired_key_handing_the_chain_to_another_key_is_tampered(tmp_path, capsys):
    """A leaked retired key K0 forks the chain: K0 → X, never through the school's current key K1."""
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    old = school.key
    _rotate(school)   # the fork's transition K0 → X
    current = Ed25519PrivateKey.generate()
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "school-a.pub").write_text(public_key_pem(current))
    retire_public_key(keys / "school-a.pub", old)
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and f"never through the current key {key_id(current)}" in out, out


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
                       "--keys", _rotated_keyring(tmp_path, school, old))
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
    # the old pinned key is kept retired: the stored copy starts under it
    assert (server.run.path / "keys" / "school-a.retired" / f"{key_id(old)}.pub").read_text() == public_key_pem(old)
    _train(server, school, range(3, 4))   # and the next reply verifies against the switched pin


def test_trust_run_keys_audit_reads_the_runs_retired_keys(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    server = Server(tmp_path, "run-1", [school])
    _train(server, school, range(1, 2))
    _rotate(school)
    _train(server, school, range(2, 3))
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    assert code == 0, out


def test_server_refuses_a_transition_from_a_key_it_never_anchored(tmp_path):
    from server.strategy import RejectedUpdate

    school = School(tmp_path, "school-a")
    _train(Server(tmp_path, "run-1", [school]), school, range(1, 3))
    other = School(tmp_path / "elsewhere", "school-a")   # a made-up chain under another key, handed to a new key
    other.train("run-0", 1)
    made_up = other.key
    _rotate(other)
    server = Server(tmp_path, "run-2", [other])
    entries = other.train(server.run.run_id, 1)
    with pytest.raises(RejectedUpdate, match="not a trusted key"):   # its start key is no key the server trusts
        server.receive(other, 1, entries)
    # even with a keyring that (wrongly) keeps that key as retired, the anchor refuses it
    retire_public_key(server.run.key_path("school-a"), made_up)
    with pytest.raises(RejectedUpdate, match="unanchored-transition"):
        server.receive(other, 1, entries)
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
    # the ledger names the school, so the coordinator's command is printed ready to run (it said NAME before)
    assert "fedfer deploy rotate school-a --ledger-key signing_key.pub" in out and "NAME" not in out, out
    assert (school.state / "signing_key.pub").read_text() == public_key_pem(load_or_create_signing_key(school.state))
    assert (school.state / "signing_key.retired" / f"{old}.pub").read_text() == public_key_pem(school.key)
    assert "signing_key.retired" in out   # the old public half is kept: the school's own chain starts under it
    # interrupted after the transition, before the key swap: running it again finishes with the same key
    staged = stage_new_signing_key(school.state)
    SchoolLedger(school.state, school.name, load_or_create_signing_key(school.state)).rotate_key(staged)
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(school.state), "--new-ledger-key"]) == 0
    assert key_id(load_or_create_signing_key(school.state)) == key_id(staged)
    assert len(read_ledger_file(school.state / "ledger.jsonl")) == 3 and not (school.state / "signing_key.new.pem").exists()


def test_the_printed_rotate_command_names_the_school_only_with_a_name_a_node_can_have():
    from server.deploy.commands import ledger_school_name

    assert ledger_school_name([{"school_id": "lincoln-high"}]) == "lincoln-high"
    # no ledger, or a signed school id that is no node's name (a newline would break the printed line): NAME
    unusable = ([], [{"school_id": "a b"}], [{"school_id": "lincoln\n"}], [{"school_id": 7}], [{}])
    assert [ledger_school_name(entries) for entries in unusable] == [""] * len(unusable)


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



def keyring_server(root: Path, run_name: str, school: School, keys: Path) -> Server:
    """A run of a deployment: the school's key pinned from the keyring when first selected."""
    from server.run_dir import RunDirectory
    from server.strategy import NodeInfo, SchoolFedAvg
    from shared_models.config import load_config

    cfg = load_config(None, [f"run.root={root / 'runs'}", f"run.name={run_name}", f"privacy.keyring={keys}"])
    server = Server.__new__(Server)
    server.run = RunDirectory.create(cfg)
    server.strategy = SchoolFedAvg(cfg, server.run)
    server.strategy.nodes[1] = NodeInfo("school", school.name, public_key_pem(school.key))
    assert server.strategy._pin_chosen([1]) == [1]
    return server


def enrolled_school(tmp_path: Path):
    """A deployment (`tmp_path/deploy`) with school `lincoln` enrolled from its own state folder
    (`tmp_path/school-machine`, where `fedfer deploy school-key` made its keys): (the deployment, the state)."""
    from server.deploy import commands as deploy_cli

    dep = deploy_cli.init_deployment(tmp_path / "deploy", "fl.district.example", [], port=19093,
                                     flwr_home=tmp_path / "home")
    state = tmp_path / "school-machine"
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(state)]) == 0
    assert fedfer_main(["deploy", "add-school", "lincoln", "--data-dir", "/srv/data", "--declared-students", "900",
                        "--ledger-key", str(state / "signing_key.pub"), "--node-key", str(state / "supernode.pub"),
                        "--state-dir", str(state), "--dir", str(dep.root), "--flwr-home", str(tmp_path / "home")]) == 0
    return dep, state


def test_rotate_ledger_key_at_the_coordinator(tmp_path, capsys):
    dep, state = enrolled_school(tmp_path)
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
    # no ledger yet, so nothing in the state folder names the school: the command keeps the placeholder
    assert "fedfer deploy rotate NAME --ledger-key signing_key.pub" in capsys.readouterr().out
    assert fedfer_main(rotate + ["--ledger-key", str(state / "signing_key.pub")]) == 0
    out = capsys.readouterr().out
    new = load_or_create_signing_key(state)
    assert (dep.keyring / "lincoln.pub").read_text() == public_key_pem(new) and f"→ {key_id(new)}" in out
    retired = list((dep.keyring / "lincoln.retired").iterdir())   # the replaced key, kept as a retired key
    assert [p.read_text() for p in retired] == [old] and "lincoln.retired" in out
    assert (dep.node_dir("lincoln") / "supernode.pub").read_text() == node_pub   # the node key is left alone


# ----------------------------------------------------------------------------------- forgery: trust flows forward only
def _forged_handover(root: Path, school: School) -> tuple[list[dict], Ed25519PrivateKey]:
    """A ledger anyone can make: 2 rounds of `school`'s name signed by the forger's own key F, then a key
    transition F → the school's real public key (no private half needed). Returns (entries, F)."""
    forger = School(root / "forger", school.name)
    for rnd in (1, 2):
        forger.train("run-1", rnd)
    real = school.key.public_key()
    _forge(forger.state, forger.key, event=KEY_TRANSITION, steps=0, run_id=f"{KEY_TRANSITION}-{key_id(real)}",
           round=0, old_public_key=public_key_pem(forger.key), new_public_key=public_key_pem(real),
           new_key_id=key_id(real))
    return read_ledger_file(forger.state / "ledger.jsonl"), forger.key


def test_forged_handover_to_the_schools_key_is_refused_by_verify_entries(tmp_path):
    school = School(tmp_path, "school-a")
    entries, forger = _forged_handover(tmp_path, school)
    with pytest.raises(LedgerError, match=f"starts under key {key_id(forger)}, which is not a trusted key "
                                          f"\\({key_id(school.key)}\\)"):
        verify_entries(entries, school.key.public_key(), source="forged", school_id=school.name)


def test_forged_handover_is_refused_by_the_servers_run_copy(tmp_path):
    school = School(tmp_path, "school-a")
    server = Server(tmp_path, "run-1", [school])   # the school's real key K is pinned
    entries, forger = _forged_handover(tmp_path, school)
    pinned = server.run.key_path(school.name)
    with pytest.raises(LedgerError, match=f"starts under key {key_id(forger)}, which is not a trusted key"):
        ServerLedgerCopy.sync_verified(server.run.path, school.name, entries, pinned)
    with pytest.raises(LedgerError, match=f"signature does not verify with the school's public key {key_id(school.key)}"):
        ServerLedgerCopy.append_verified(server.run.path, school.name, entries[0], pinned)   # no transition: F's entry
    assert not ServerLedgerCopy.path(server.run.path, school.name).exists()
    assert pinned.read_text() == public_key_pem(school.key)


def test_forged_handover_is_refused_by_the_audit(tmp_path, capsys):
    school = School(tmp_path, "school-a")
    entries, forger = _forged_handover(tmp_path, school)
    alone = tmp_path / "handed-in"   # no key beside it: only the keyring decides
    alone.mkdir()
    (alone / "ledger.jsonl").write_text((tmp_path / "forger" / "schools" / "school-a" / "ledger.jsonl").read_text())
    code, out = _audit(capsys, alone / "ledger.jsonl", "--keys", _keyring(tmp_path, [school]))
    assert code == 2 and f"starts under key {key_id(forger)}, which is not a trusted key" in out, out


def test_a_run_pinned_from_the_keyring_trusts_the_retired_keys_rotate_kept(tmp_path):
    """The next run pins the school's new key from the keyring and copies its retired keys beside the pin:
    the run's copy starts with the transition signed by the old key."""
    school = School(tmp_path, "school-a")
    _train(Server(tmp_path, "run-1", [school]), school, range(1, 2))
    old = school.key
    _rotate(school)
    keys = _rotated_keyring(tmp_path, school, old)
    server = keyring_server(tmp_path, "run-2", school, keys)
    assert (server.run.path / "keys" / "school-a.retired" / f"{key_id(old)}.pub").read_text() == public_key_pem(old)
    _train(server, school, range(1, 2))
    assert [e["event"] for e in read_ledger_file(ServerLedgerCopy.path(server.run.path, "school-a"))] == [KEY_TRANSITION, "round"]
