"""Session 21's walkthrough of `fedfer privacy audit` as a district privacy officer: the tampering it must
name (a ledger copied from another school, a keyring key the server never anchored), and what a
non-engineer reads (each school's budget used and left, which run a row is, what to do next, the same in
JSON). Signed ledgers and anchors come from test_ledger_trust's school and server stand-ins."""

from __future__ import annotations

import json
import re
import shutil

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.ledger import entry_hash
from privacy.signing import public_key_pem, sign_hash
from privacy.state_folder import LEDGER_MARKER
from test_ledger_trust import _audit, _federation, _keyring


def _resign_all(path, key) -> None:
    """Re-hash and re-sign every entry of a ledger with `key`, the chain kept (a forger holding `key`)."""
    prev, lines = None, []
    for raw in path.read_text().splitlines():
        e = json.loads(raw)
        e["prev_hash"] = e["prev_hash"] if prev is None else prev
        e["hash"] = entry_hash(e)
        e["signature"] = sign_hash(key, e["hash"])
        prev = e["hash"]
        lines.append(json.dumps(e))
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------ a ledger copied from another school
def test_a_ledger_copied_into_another_schools_state_dir_is_caught(tmp_path, capsys):
    """school-b's own (valid, signed) ledger put in school-a's state directory: the keyring verifies it as
    school-b's, so only the key beside it (school-a's signing_key.pub) shows whose folder it is in."""
    schools, _ = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools)
    school_a, school_b = schools
    shutil.copy(school_b.state / "ledger.jsonl", school_a.state / "ledger.jsonl")
    code, out = _audit(capsys, school_a.state, "--keys", keys)
    assert code == 2 and "Traceback" not in out, out
    finding = next(line for line in out.splitlines() if "signing_key.pub" in line)
    assert "school-a" in finding and "school-b" in finding and "copied from another school" in finding, out
    assert str(school_a.state / "ledger.jsonl") in finding, out


def test_a_run_copy_holding_another_schools_entries_says_so(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1)
    ledger = server.run.path / "ledger"
    shutil.copy(ledger / "school-b.jsonl", ledger / "school-a.jsonl")
    code, out = _audit(capsys, server.run.path, "--keys", _keyring(tmp_path, schools))
    assert code == 2 and "school-a.jsonl line 1 (school school-a): entry belongs to school 'school-b'" in out, out
    # the lifetime lines still name school-a (it was left out, as if it had not been audited)
    lifetime = out.split("lifetime per school", 1)[1].splitlines()
    line = next(line for line in lifetime if line.strip().startswith("school-a"))
    assert "TAMPERED" in line and "not known" in line, out
    # in name order, in the text and the JSON (school-a came after the schools with an ε)
    assert [line.split()[0] for line in lifetime if line.startswith("  ")] == ["school-a", "school-b"], out
    code, out = _audit(capsys, server.run.path, "--keys", _keyring(tmp_path, schools), "--json")
    assert [entry["school"] for entry in json.loads(out)["lifetime"]] == ["school-a", "school-b"], out


# ------------------------------------------------------------------ a keyring key the server never anchored
def test_a_swapped_keyring_key_with_a_resigned_ledger_is_caught_by_the_anchors(tmp_path, capsys):
    """Whoever swaps the keyring's key and re-signs the school's ledger with the new one passes every
    signature; the server's anchors know the school only under its enrolled key, and must say so (it said
    'no server anchors found', as if the school had never been anchored)."""
    schools, _ = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools)
    forged = Ed25519PrivateKey.generate()
    (keys / "school-a.pub").write_text(public_key_pem(forged))
    handed = tmp_path / "handed-over"   # the ledger alone, without the school's signing_key.pub beside it
    handed.mkdir()
    shutil.copy(schools[0].state / "ledger.jsonl", handed / "ledger.jsonl")
    _resign_all(handed / "ledger.jsonl", forged)
    code, out = _audit(capsys, handed / "ledger.jsonl", "--keys", keys, "--anchors", tmp_path / "runs" / "anchors")
    assert code == 2 and "no server anchors found" not in out, out
    finding = next(line for line in out.splitlines() if "never anchored" in line)
    assert "school-a" in finding and "ledger.jsonl" in finding, out


# ------------------------------------------------------------------ what a non-engineer reads
POLICY = {"unit": "student", "delta": 1e-5, "max-round-epsilon": 50.0, "declared-students": 100}


def test_each_schools_lifetime_budget_used_and_left_and_the_run_of_each_row(tmp_path, capsys):
    """Two runs over the same schools and their own ledgers: every row names its run, and one line per
    school gives the lifetime ε (the school's own ledger: all runs), the budget, the share used and what is
    left; the JSON a district archives carries the same."""
    schools, servers = _federation(tmp_path, runs=2)
    keys = _keyring(tmp_path, schools, {"school-a": {**POLICY, "budget": 12.0}, "school-b": {**POLICY, "budget": 6.0}})
    args = [s.run.path for s in servers] + [s.state for s in schools] + ["--keys", keys]
    code, out = _audit(capsys, *args)
    assert code == 1, out   # school-b: 4 rounds at σ 1.2, q 0.25 is ε ≈ 7.3 > 6
    rows = [line.split() for line in out.splitlines() if line.startswith("school-a ")]
    assert [r[-2:] for r in rows] == [["run", "run-1"], ["run", "run-2"], ["school's", "own"]], out
    lifetime = out.split("lifetime per school", 1)[1].splitlines()
    line_a = next(line for line in lifetime if line.strip().startswith("school-a"))
    line_b = next(line for line in lifetime if line.strip().startswith("school-b"))
    assert "of 12" in line_a and "left" in line_a and "%" in line_a and "ok" in line_a, out
    assert "of 6" in line_b and "OVER BUDGET" in line_b and "left" not in line_b, out
    nexts = [line for line in out.splitlines() if line.startswith("next:")]
    assert nexts and "school-b spent more than its budget" in nexts[0], out
    from fedfer.cli import main

    main(["privacy", "audit", *map(str, args), "--json"])
    report = json.loads(capsys.readouterr().out)
    summary = {s["school"]: s for s in report["lifetime"]}
    a = summary["school-a"]
    assert a["budget"] == 12.0 and a["status"] == "ok" and abs(a["budget_left"] - (12.0 - a["epsilon"])) < 1e-9, a
    assert a["source"].endswith("ledger.jsonl") and a["rounds"] == 4, a
    assert summary["school-b"]["status"] == "over-budget" and summary["school-b"]["budget_left"] < 0
    assert {r["run_id"] for r in report["schools"]} == {"run-1", "run-2", ""}
    assert all(len(r["key_id"]) == 16 for r in report["schools"]), report["schools"]
    assert report["next"] and report["audited_at"].endswith("Z") and report["fedfer"], report


# ------------------------------------------------------------------ which record is wrong
def _edit_anchor_last_hash(anchors, school: str) -> None:
    """The coordinator's anchor rewritten consistently (hash and head), the ledgers left alone."""
    path = anchors / f"{school}.json"
    data = json.loads(path.read_text())
    for chain in data["chains"].values():
        chain["runs"][-1]["hashes"][-1] = chain["head"] = "f" * 64
    path.write_text(json.dumps(data))


def test_an_edited_anchor_is_named_when_the_school_and_the_run_copy_agree(tmp_path, capsys):
    """Both ledgers hold the school's signed entry, the anchor another hash: the audit blamed both ledgers
    ('rewritten and re-signed') and never the anchor, the one record that changed."""
    schools, (server,) = _federation(tmp_path, runs=1)
    _edit_anchor_last_hash(tmp_path / "runs" / "anchors", "school-a")
    code, out = _audit(capsys, server.run.path, schools[0].state, "--keys", _keyring(tmp_path, schools))
    assert code == 2, out
    finding = next(line for line in out.splitlines() if "agree" in line)
    assert "school-a" in finding and "anchors/school-a.json" in finding and "anchor was edited" in finding, out
    copy_line = next(line for line in out.splitlines() if "school-a.jsonl line" in line)
    assert "the copy or the anchor was edited" in copy_line, out


def test_a_school_ledger_and_a_run_copy_that_disagree_say_how(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1)
    path = schools[0].state / "ledger.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    code, out = _audit(capsys, server.run.path, schools[0].state, "--keys", _keyring(tmp_path, schools))
    assert code == 2, out
    line = next(line for line in out.splitlines() if line.startswith("school school-a: run"))
    assert "1 entries" not in line and "the run copy holds 1 entry the school's ledger does not" in line, out
    lifetime = out.split("lifetime per school", 1)[1].splitlines()
    assert "INCONSISTENT" in next(line for line in lifetime if "school-a" in line), out   # not "ok"


# ------------------------------------------------------------------ what a school's ledger alone cannot show
def _rewrite_sigma(path, key, factor: float) -> None:
    """The school rewrites its whole ledger with its own key: σ of the first round raised, every later
    history_before and ε re-derived, the chain re-signed. Valid on its own; ε lower than what it spent."""
    from privacy.accounting import epsilon_of
    from privacy.ledger import compress_history_list

    entries = [json.loads(raw) for raw in path.read_text().splitlines()]
    entries[0]["noise_multiplier"] *= factor
    history: list = []
    for e in entries:
        e["history_before"] = compress_history_list(history)
        if e["event"] == "round":
            history = history + [(e["noise_multiplier"], e["sample_rate"], e["steps"])]
        e["epsilon"] = epsilon_of(history, e["delta"], "prv")
        e["epsilon_rdp"] = epsilon_of(history, e["delta"], "rdp")
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    _resign_all(path, key)


def test_a_ledger_rewritten_by_its_school_is_named_as_what_no_anchor_cannot_show(tmp_path, capsys):
    schools, _ = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools)
    _rewrite_sigma(schools[0].state / "ledger.jsonl", schools[0].key, 3.0)
    # a careless rewrite leaves the record of the last signed entry beside the key (privacy/state_folder.py) ...
    code, out = _audit(capsys, schools[0].state, "--keys", keys)
    assert code == 2 and "or was rewritten after it was signed" in out, out
    (schools[0].state / LEDGER_MARKER).unlink()   # ... which a school rewriting its ledger rewrites too
    code, out = _audit(capsys, schools[0].state, "--keys", keys)
    assert code == 0, out   # by design: the school holds its key; only the server's anchors can tell
    (note,) = [line for line in out.splitlines() if "no server anchors found" in line]
    assert "cut short" in note and "rewritten" in note, out
    code, out = _audit(capsys, schools[0].state, "--keys", keys, "--anchors", tmp_path / "runs" / "anchors")
    assert code == 2 and "line 1: replaced entry" in out, out


def test_a_ledger_signed_with_a_key_the_keyring_no_longer_holds_says_so(tmp_path, capsys):
    """The keyring holds the school's new key, the ledger was signed with its old one (re-enrolled, or the
    keyring's key swapped): the finding says the entry names another key, not only 'does not verify'."""
    schools, _ = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools)
    (keys / "school-a.pub").write_text(public_key_pem(Ed25519PrivateKey.generate()))
    code, out = _audit(capsys, schools[0].state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "Traceback" not in out, out
    finding = next(line for line in out.splitlines() if "ledger.jsonl line 1" in line)
    assert "school-a" in finding and "signed with another key (a rotated-out key" in finding, out


def test_help_shows_a_privacy_officer_the_commands_and_the_json(capsys):
    import pytest

    from fedfer.cli import main

    with pytest.raises(SystemExit):
        main(["privacy", "audit", "--help"])
    out = capsys.readouterr().out
    assert "--budget EPS" in out and "examples:" in out and "offline" in out, out
    assert "runs/anchors" in out and "lifetime" in out and "audited_at" in out, out


def test_budget_left_is_shown_only_on_the_ledger_that_holds_the_schools_latest_spend(tmp_path, capsys):
    """Two runs of one deployment: the table's row for run-1's copy said school-a had the budget left at the end of
    run-1, more than it has now — a figure an officer reads as what is left. Only the row the lifetime line uses
    (the latest run's copy, or the school's own ledger when given) shows `left`; an earlier ledger shows –, and a
    note says where the figure is."""
    schools, servers = _federation(tmp_path, runs=2)
    keys = _keyring(tmp_path, schools, {"school-a": {**POLICY, "budget": 50.0}, "school-b": {**POLICY, "budget": 50.0}})

    def left_column(out: str) -> dict[tuple[str, str], str]:
        header, *rows = out.split("\n\n")[0].splitlines()
        start = header.index("left")
        return {(row.split()[0], row.rsplit(maxsplit=1)[-1]): row[start:].split()[0] for row in rows}

    code, out = _audit(capsys, *(s.run.path for s in servers), "--keys", keys)
    left = left_column(out)
    assert code == 0 and left[("school-a", "run-1")] == "–" and left[("school-b", "run-1")] == "–", out
    assert float(left[("school-a", "run-2")]) == float(left[("school-b", "run-2")]) > 0, out
    assert ("– in the left column: an earlier ledger of that school; what it has left is on its lifetime line"
            in out), out
    # with the schools' own ledgers: those hold the latest spend, both run copies are earlier
    code, out = _audit(capsys, *(s.run.path for s in servers), *(s.state for s in schools), "--keys", keys)
    left = left_column(out)
    assert code == 0 and left[("school-a", "run-2")] == "–" and float(left[("school-a", "own")]) > 0, out
    # one run alone: nothing earlier, no note
    code, out = _audit(capsys, servers[1].run.path, "--keys", keys)
    assert code == 0 and "–" not in out.split("\n\n")[0] and "in the left column" not in out, out


def test_with_no_budget_the_lines_read_as_sentences(tmp_path, capsys):
    """"ε 5.415 at δ 1e-05 no budget known" and "give the policy of school-a, school-b ... to check its budget"."""
    schools, (server,) = _federation(tmp_path, runs=1)
    code, out = _audit(capsys, server.run.path, "--keys", _keyring(tmp_path, schools))
    assert code == 0 and re.search(r"school-a  ε \d+\.\d+ at δ 1e-05, no budget known  \[ok", out), out
    assert ("next: give the policy of school-a, school-b (--budget, or <keys>/<school>.policy.json) to check their "
            "budgets") in out, out
    code, out = _audit(capsys, server.run.path, "--keys", _keyring(tmp_path, schools, {"school-a": {**POLICY, "budget": 50.0}}))
    assert "next: give the policy of school-b (--budget, or <keys>/<school>.policy.json) to check its budget" in out


def test_the_lifetime_lines_keep_their_status_in_one_column(tmp_path, capsys):
    """"of 50 (8 % used), 45.967 left  [ok; …" beside "of 1: OVER BUDGET by 4.03  [OVER-BUDGET; …" put the status
    in two columns; an officer scans that column for anything but ok."""
    schools, (server,) = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools, {"school-a": {**POLICY, "budget": 50.0}, "school-b": {**POLICY, "budget": 1.0}})
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    lines = [line for line in out.split("lifetime per school:\n")[1].splitlines() if line.startswith("  ")]
    assert code == 1 and len(lines) == 2 and len({line.index("  [") for line in lines}) == 1, lines


def test_a_school_without_a_budget_gets_one_note_naming_the_policy_beside_its_ledger(tmp_path, capsys):
    """A run copy and the school's own ledger (its policy.json beside it) each added a note why no budget was
    compared: "no policy budget found" for the copy, "its policy beside the ledger … is read only with
    --trust-run-keys" for the ledger — two lines, one of them wrong, for one school. Now one, the one that says
    where the policy is."""
    schools, (server,) = _federation(tmp_path, runs=1)
    (schools[0].state / "policy.json").write_text(json.dumps({**POLICY, "budget": 50.0}))
    code, out = _audit(capsys, server.run.path, schools[0].state, "--keys", _keyring(tmp_path, schools))
    notes = [line for line in out.splitlines() if line.startswith("school school-a:") and "not compared" in line]
    assert code == 0 and len(notes) == 1 and "read only with --trust-run-keys" in notes[0], out


def test_an_audit_against_the_runs_own_keys_says_so(tmp_path, capsys):
    """`--trust-run-keys` (every simulated run's audit) verifies against keys whoever wrote the run could swap, yet
    the report read "intact" with nothing to say so: an officer took it for an independent check. One note names
    the schools whose keys came from the run; against the keyring there is none."""
    schools, (server,) = _federation(tmp_path, runs=1)
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    assert code == 0 and ("keys of school-a, school-b: the ones stored with the ledgers (--trust-run-keys), not an "
                          "independent keyring") in out, out
    code, out = _audit(capsys, server.run.path, "--keys", _keyring(tmp_path, schools))
    assert code == 0 and "stored with the ledgers" not in out, out


# ------------------------------------------------------------------ a ledger in which nothing trained
def test_a_refusal_only_ledger_shows_steps_sigma_and_q_as_not_applicable(tmp_path, capsys):
    """A school that only refused (here a run-config weaker than its policy: the refusal records σ 0 and q 0)
    was shown with an empty steps column and σ 0, q 0, as if it had trained without noise. Nothing ran: the
    text shows – in all three, the JSON null for σ and q (steps stays the count, 0)."""
    from privacy.accounting import SchoolAccountant, dataset_fingerprint
    from privacy.ledger import SchoolLedger, record_refusal
    from test_ledger_trust import School

    school = School(tmp_path, "school-a")
    ledger = SchoolLedger(school.state, school.name, school.key)
    acct = SchoolAccountant(school.state, school.name, dataset_fingerprint(["school-a,row0"]))
    record_refusal(acct, ledger, reason="policy-violation", setting="privacy.target_epsilon", planned_steps=0,
                   run_id="run-1", round=1, privacy_unit="student", noise_multiplier=0.0, sample_rate=0.0,
                   max_grad_norm=1.0, delta=1e-5, budget=8.0)
    keys = _keyring(tmp_path, [school], {"school-a": {**POLICY, "budget": 8.0}})
    code, out = _audit(capsys, school.state, "--keys", keys)
    header = next(line for line in out.splitlines() if line.startswith("school "))
    row = next(line for line in out.splitlines() if line.startswith("school-a "))
    columns = {name: row[header.index(name):].split("  ")[0].strip() for name in ("steps", "σ", "q")}
    assert columns == {"steps": "–", "σ": "–", "q": "–"}, out
    assert "– in the steps, σ and q columns: no round trained in that ledger (refusals only)" in out, out
    from fedfer.cli import main

    main(["privacy", "audit", str(school.state), "--keys", str(keys), "--json"])
    (only,) = json.loads(capsys.readouterr().out)["schools"]
    assert (only["sigma"], only["q"], only["steps"], only["refusals"]) == (None, None, 0, 1), only
