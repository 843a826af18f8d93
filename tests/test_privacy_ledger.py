"""Ledger: signing, chaining, server copy, and `fedfer privacy audit` catching every kind of tampering."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedfer.cli import main as fedfer_main
from privacy.accounting import SchoolAccountant, dataset_fingerprint, epsilon_of
from privacy.ledger import (GENESIS_HASH, LedgerError, SchoolLedger, ServerLedgerCopy, entry_hash,
                            read_ledger_file, record_refusal, record_round, verify_entries)
from privacy.signing import (load_or_create_signing_key, load_public_key, public_key_pem, sign_hash)

SIGMA, Q, STEPS, DELTA = 1.2, 0.25, 8, 1e-5


def _school(tmp: Path, name: str, rounds: int, run_id: str = "run-1", run_dir: Path | None = None,
            budget: float | None = 50.0) -> tuple[Path, SchoolLedger, SchoolAccountant]:
    state = tmp / "schools" / name
    key = load_or_create_signing_key(state)
    ledger = SchoolLedger(state, name, key)
    acct = SchoolAccountant(state, name, dataset_fingerprint([f"{name},row{i}" for i in range(5)]))
    for r in range(1, rounds + 1):
        entry = record_round(acct, ledger, run_id=run_id, round=r, privacy_unit="student", noise_multiplier=SIGMA,
                             sample_rate=Q, steps=STEPS, max_grad_norm=1.0, delta=DELTA, budget=budget)
        if run_dir is not None:
            ServerLedgerCopy.store_public_key(run_dir, name, key.public_key())
            assert ServerLedgerCopy.append_verified(run_dir, name, entry, key.public_key())
    return state, ledger, acct


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    run_dir = tmp / "runs" / "run-1"
    _school(tmp, "school-a", 3, run_dir=run_dir)
    _school(tmp, "school-b", 2, run_dir=run_dir)
    return tmp, run_dir


def _audit(capsys, *args) -> tuple[int, str]:
    """Audit trusting the keys stored in the run / beside the ledger (explicitly), unless --keys is given."""
    trust = [] if "--keys" in args else ["--trust-run-keys"]
    code = fedfer_main(["privacy", "audit", *map(str, args), *trust])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_intact_run_audits_clean_and_epsilon_is_recomputed(run, capsys):
    tmp, run_dir = run
    code, out = _audit(capsys, run_dir)
    assert code == 0, out
    assert "school-a" in out and "school-b" in out and "exit 0" in out
    code = fedfer_main(["privacy", "audit", str(run_dir), "--json", "--trust-run-keys"])
    report = json.loads(capsys.readouterr().out)
    row = {r["school"]: r for r in report["schools"]}["school-a"]
    assert row["rounds"] == 3 and row["steps"] == 24
    assert row["epsilon_prv"] == pytest.approx(epsilon_of([(SIGMA, Q, 24)], DELTA), rel=1e-9)
    assert row["epsilon_rdp"] > row["epsilon_prv"]


def test_school_ledger_and_run_copy_agree_and_keys_are_private(run, capsys):
    tmp, run_dir = run
    state = tmp / "schools" / "school-a"
    assert stat.S_IMODE(os.stat(state / "signing_key.pem").st_mode) == 0o600
    code, out = _audit(capsys, run_dir, state / "ledger.jsonl")
    assert code == 0, out


TAMPERS = {
    "edit-steps": lambda ls: ls.__setitem__(1, ls[1].replace('"steps": 8', '"steps": 1')),
    "edit-epsilon": lambda ls: ls.__setitem__(2, ls[2].replace('"epsilon": ', '"epsilon": 0.0001, "x_old": ')),
    "edit-round": lambda ls: ls.__setitem__(0, ls[0].replace('"round": 1', '"round": 7')),
    "delete-middle": lambda ls: ls.pop(1),
    "delete-first": lambda ls: ls.pop(0),
    "reorder": lambda ls: ls.insert(0, ls.pop(1)),
    "strip-signature": lambda ls: ls.__setitem__(1, json.dumps({k: v for k, v in json.loads(ls[1]).items() if k != "signature"}) + "\n"),
    "torn-line": lambda ls: ls.__setitem__(2, ls[2][:40]),
}


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_tampering_is_detected_with_school_and_line(run, tmp_path, capsys, kind):
    _, run_dir = run
    copy = _copy_run(run_dir, tmp_path / "run")
    path = copy / "ledger" / "school-a.jsonl"
    lines = _lines(path)
    TAMPERS[kind](lines)
    path.write_text("".join(lines))
    code, out = _audit(capsys, copy)
    assert code == 2, out
    assert "school-a" in out and " line " in out, out
    assert "TAMPERED" in out or "INCONSISTENT" in out or "UNREADABLE" in out


def test_forged_signature_and_swapped_key_are_detected(run, tmp_path, capsys):
    _, run_dir = run
    forger = Ed25519PrivateKey.generate()
    # forge: re-sign an edited entry with another key (hash recomputed so only the signature is wrong)
    copy = _copy_run(run_dir, tmp_path / "forged")
    path = copy / "ledger" / "school-b.jsonl"
    lines = _lines(path)
    e = json.loads(lines[1])
    e["steps"] = 1
    e["hash"] = entry_hash(e)
    e["signature"] = sign_hash(forger, e["hash"])
    lines[1] = json.dumps(e) + "\n"
    path.write_text("".join(lines))
    code, out = _audit(capsys, copy)
    assert code == 2 and "school-b" in out and "line 2" in out and "signature" in out, out
    # swap the key file: every line fails against the wrong key
    copy2 = _copy_run(run_dir, tmp_path / "swapped")
    (copy2 / "keys" / "school-a.pub").write_text(public_key_pem(forger))
    code, out = _audit(capsys, copy2)
    assert code == 2 and "school-a" in out and "line 1" in out, out
    # ...and a trusted keyring overrides keys stored in the run
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    for school in ("school-a", "school-b"):
        (keyring / f"{school}.pub").write_text((run_dir / "keys" / f"{school}.pub").read_text())
    code, out = _audit(capsys, copy2, "--keys", keyring)
    # the entries verify, and the key the run stored is named as swapped (it was "intact" before session 21)
    assert code == 2 and "does not verify" not in out and "school-a.jsonl (school school-a): the key the run stored" in out, out
    assert "the run's key was swapped" in out and "school-b.jsonl (school school-b): the key" not in out, out


def test_a_run_copy_missing_the_schools_last_entry_is_named_against_the_schools_ledger(run, tmp_path, capsys):
    # what a crash or a lost reply leaves (the school recorded a round the server never stored): the school's
    # ledger counts its ε, so it is a note, not a failure; a copy that differs otherwise is a problem
    tmp, run_dir = run
    copy = _copy_run(run_dir, tmp_path / "run")
    path = copy / "ledger" / "school-a.jsonl"
    kept = _lines(path)
    path.write_text("".join(kept[:-1]))
    code, out = _audit(capsys, copy)  # a shorter chain is still a valid chain on its own
    assert code == 0
    code, out = _audit(capsys, copy, tmp / "schools" / "school-a" / "ledger.jsonl")
    assert code == 0 and "holds 1 entry after the last one" in out and "never stored" in out, out
    path.write_text("".join(kept[:1] + kept[2:]))   # the middle entry gone: not a lost reply
    code, out = _audit(capsys, copy, tmp / "schools" / "school-a" / "ledger.jsonl")
    assert code == 2 and "school-a" in out, out


def test_over_budget_exits_1(run, capsys):
    _, run_dir = run
    code, out = _audit(capsys, run_dir, "--budget", "0.5")
    assert code == 1 and "OVER-BUDGET" in out, out


def test_server_copy_rejects_bad_links_and_accepts_retries(tmp_path):
    run_dir = tmp_path / "run"
    state, ledger, acct = _school(tmp_path, "s1", 3)
    entries = ledger.entries
    pub = ledger.public_key
    assert ServerLedgerCopy.append_verified(run_dir, "s1", entries[0], pub)
    assert not ServerLedgerCopy.append_verified(run_dir, "s1", entries[0], pub)  # retry: no-op
    with pytest.raises(LedgerError, match="prev_hash"):
        ServerLedgerCopy.append_verified(run_dir, "s1", entries[2], pub)  # skips entries[1]
    with pytest.raises(LedgerError, match="signature"):
        ServerLedgerCopy.append_verified(run_dir, "s1", entries[1], Ed25519PrivateKey.generate().public_key())
    with pytest.raises(LedgerError, match="names school"):
        ServerLedgerCopy.append_verified(run_dir, "other", entries[1], pub)
    stored = ServerLedgerCopy.sync_verified(run_dir, "s1", entries, pub)
    assert [e["hash"] for e in stored] == [entries[1]["hash"], entries[2]["hash"]]
    verify_entries(read_ledger_file(run_dir / "ledger" / "s1.jsonl"), pub, source="copy", start="run")


def test_chain_continues_across_runs_and_refusals_are_signed(tmp_path, capsys):
    state, ledger, acct = _school(tmp_path, "s1", 2, run_id="run-1")
    # a second run on the same data: same state dir, history continues
    ledger2 = SchoolLedger(state, "s1", load_or_create_signing_key(state))
    acct2 = SchoolAccountant(state, "s1", acct.fingerprint)
    assert acct2.history == [(SIGMA, Q, STEPS)] * 2
    e = record_round(acct2, ledger2, run_id="run-2", round=1, privacy_unit="student", noise_multiplier=SIGMA,
                     sample_rate=Q, steps=STEPS, max_grad_norm=1.0, delta=DELTA, budget=50.0)
    assert e["run_seq"] == 0 and e["prev_hash"] == ledger.entries[-1]["hash"]
    assert e["history_before"] == [[SIGMA, Q, 2 * STEPS]]
    r = record_refusal(acct2, ledger2, run_id="run-2", round=2, privacy_unit="student", noise_multiplier=SIGMA,
                       sample_rate=Q, planned_steps=STEPS, max_grad_norm=1.0, delta=DELTA, budget=50.0)
    assert r["event"] == "refused" and r["reason"] == "budget-exhausted" and r["steps"] == 0
    assert acct2.history == [(SIGMA, Q, STEPS)] * 3
    entries = read_ledger_file(state / "ledger.jsonl")
    assert entries[0]["prev_hash"] == GENESIS_HASH and len(entries) == 4
    verify_entries(entries, load_public_key(state / "signing_key.pub"), source="ledger.jsonl")
    code, out = _audit(capsys, state)
    assert code == 0 and "1 refused" in out, out


def test_crash_between_ledger_and_accountant_is_reconciled(tmp_path):
    state, ledger, acct = _school(tmp_path, "s1", 1)
    # simulate: the ledger got round 2, the process died before the accountant recorded it
    ledger.append(event="round", dataset_fingerprint=acct.fingerprint, run_id="run-1", round=2,
                  privacy_unit="student", sample_rate=Q, noise_multiplier=SIGMA, max_grad_norm=1.0, steps=STEPS,
                  delta=DELTA, accountant="prv", history_before=acct.history,
                  epsilon=epsilon_of(acct.history + [(SIGMA, Q, STEPS)], DELTA),
                  epsilon_rdp=epsilon_of(acct.history + [(SIGMA, Q, STEPS)], DELTA, "rdp"), budget=50.0)
    e = record_round(acct, ledger, run_id="run-1", round=3, privacy_unit="student", noise_multiplier=SIGMA,
                     sample_rate=Q, steps=STEPS, max_grad_norm=1.0, delta=DELTA, budget=50.0)
    assert e["history_before"] == [[SIGMA, Q, 2 * STEPS]]
    assert sum(s for _, _, s in acct.history) == 3 * STEPS


def test_append_refuses_ledger_set_fields_and_bad_values(tmp_path):
    state = tmp_path / "s"
    ledger = SchoolLedger(state, "s1", load_or_create_signing_key(state))
    with pytest.raises(LedgerError, match="set by the ledger"):
        ledger.append(prev_hash="0" * 64)
    with pytest.raises(LedgerError, match="field 'dataset_fingerprint' missing"):
        ledger.append(run_id="r", round=1)
    os.chmod(state / "signing_key.pem", 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_or_create_signing_key(state)


def test_missing_key_or_directory_is_unreadable(run, tmp_path, capsys):
    _, run_dir = run
    copy = _copy_run(run_dir, tmp_path / "run")
    (copy / "keys" / "school-b.pub").unlink()
    code, out = _audit(capsys, copy)
    assert code == 2 and "school-b" in out and "no public key" in out and "UNREADABLE" in out, out
    code, out = _audit(capsys, tmp_path / "nowhere")   # a usage error: one line, no table, no verdict
    assert code == 2 and out == f"fedfer privacy audit: {tmp_path / 'nowhere'}: not found\n", out


def test_signed_but_wrong_epsilon_is_flagged(tmp_path, capsys):
    state, ledger, acct = _school(tmp_path, "s1", 1)
    hist = acct.history + [(SIGMA, Q, STEPS)]
    ledger.append(event="round", dataset_fingerprint=acct.fingerprint, run_id="run-1", round=2,
                  privacy_unit="student", sample_rate=Q, noise_multiplier=SIGMA, max_grad_norm=1.0, steps=STEPS,
                  delta=DELTA, accountant="prv", history_before=acct.history,
                  epsilon=epsilon_of(hist, DELTA) / 2,  # under-reported, yet validly signed
                  epsilon_rdp=epsilon_of(hist, DELTA, "rdp"), budget=50.0)
    code, out = _audit(capsys, state / "ledger.jsonl")
    assert code == 2 and "line 2 (school s1): stored epsilon" in out and "INCONSISTENT" in out, out
