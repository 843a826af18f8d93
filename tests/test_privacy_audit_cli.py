"""`fedfer privacy audit` as a privacy officer reads it (the walkthrough's findings): what each message
says happened, which verdict is claimed, which inputs are usage errors, and the CLI's manners (a closed
pipe, the canary audit's progress). Signed ledgers and anchors come from test_ledger_trust's school and
server stand-ins (the real ledger, accountant and SchoolFedAvg verification path)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from privacy.ledger import entry_hash
from privacy.signing import sign_hash
from test_ledger_trust import DELTA, School, Server, _audit, _federation, _keyring

ROOT = Path(__file__).resolve().parents[1]


def _resign_last(path: Path, key) -> None:
    """Rewrite a ledger's last entry and re-sign it with the school's own key: a valid chain on its own,
    ε unchanged (only the timestamp differs), but not the entry the server anchored."""
    lines = path.read_text().splitlines()
    e = json.loads(lines[-1])
    e["timestamp"] = "2000-01-01T00:00:00+00:00"
    e["hash"] = entry_hash(e)
    e["signature"] = sign_hash(key, e["hash"])
    path.write_text("\n".join(lines[:-1] + [json.dumps(e)]) + "\n")


def _row(out: str, school: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith(school + " ")).split()


def _verdict(out: str) -> str:
    return out.strip().splitlines()[-1]


def test_a_run_copy_cut_short_is_still_a_problem_against_the_servers_anchor(tmp_path, capsys):
    # the school's ledger ahead of the copy is a lost reply; the copy shorter than what the server anchored is not
    schools, (server,) = _federation(tmp_path, runs=1, rounds=3)
    keys = _keyring(tmp_path, schools)
    copy = server.run.path / "ledger" / "school-b.jsonl"
    copy.write_text("".join(copy.read_text().splitlines(keepends=True)[:-1]))
    code, out = _audit(capsys, server.run.path, schools[1].state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "school-b.jsonl line 3: truncated tail" in out and "never stored" not in out, out


# ------------------------------------------------------------------------ 1. replaced, not truncated
def test_a_replaced_last_entry_is_named_as_replaced_not_as_a_truncated_tail(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1, rounds=3)
    keys = _keyring(tmp_path, schools)
    school_b = schools[1]
    _resign_last(server.run.path / "ledger" / "school-b.jsonl", school_b.key)
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 2 and "truncated" not in out, out
    assert re.search(r"school-b\.jsonl line 3: replaced entry: the entry the server anchored at line 3 .* is not "
                     r"in the copy.*\(school school-b\)", out), out
    # the school's own ledger, rewritten the same way, against the anchors
    _resign_last(school_b.state / "ledger.jsonl", school_b.key)
    code, out = _audit(capsys, school_b.state, "--keys", keys, "--anchors", tmp_path / "runs" / "anchors")
    assert code == 2 and "line 3: replaced entry" in out and "truncated" not in out, out


# ------------------------------------------------------------------------ 2. no budget is not "within budget"
def _state_dir_run(tmp_path: Path) -> tuple[list[School], Server]:
    """A simulated run with privacy.state_dir outside the run: each school's policy.json sits beside its
    ledger there, and the run's config.yaml records where."""
    schools, (server,) = _federation(tmp_path, runs=1)
    config = server.run.path / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["privacy"]["state_dir"] = str(tmp_path / "schools")
    config.write_text(yaml.safe_dump(data))
    return schools, server


def _write_policy(school: School, budget: float) -> None:
    (school.state / "policy.json").write_text(json.dumps({"unit": "student", "delta": DELTA, "budget": budget,
                                                          "max-round-epsilon": budget, "declared-students": 100}))


def test_policy_beside_a_school_ledger_in_a_state_dir_is_the_budget(tmp_path, capsys):
    schools, server = _state_dir_run(tmp_path)
    for school in schools:
        _write_policy(school, 0.5)
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    assert code == 1 and "OVER-BUDGET" in out and "exceeds budget 0.5" in out, out
    code, out = _audit(capsys, schools[0].state, "--trust-run-keys")
    assert code == 1 and "OVER-BUDGET" in out and "school-a" in out, out
    for school in schools:
        _write_policy(school, 40.0)
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    assert code == 0 and _row(out, "school-a")[9] == "40" and _verdict(out) == "audit: intact, within budget (exit 0)"
    # with a keyring only, the policy beside the ledger is not read (whoever edits the ledger can edit it)
    code, out = _audit(capsys, schools[0].state, "--keys", _keyring(tmp_path, schools))
    assert code == 0 and "read only with --trust-run-keys" in out and "no budget to check against" in out, out


def test_no_budget_at_all_is_said_not_claimed_within(tmp_path, capsys):
    schools, server = _state_dir_run(tmp_path)
    for target in (server.run.path, schools[0].state):
        code, out = _audit(capsys, target, "--trust-run-keys")
        assert code == 0 and "within budget" not in out, out
        assert _verdict(out) == ("audit: intact; no budget to check against (give --budget or the school's policy) "
                                 "(exit 0)"), out
        assert "budget none" not in out and _row(out, "school-a")[9] == "none"
    _write_policy(schools[0], 40.0)   # one school with a budget, one without
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    assert code == 0 and "no budget to check school-b against" in _verdict(out) and "school-a," not in _verdict(out), out
    report = json.loads(_json(capsys, server.run.path))
    assert report["verdict"].startswith("intact, within budget where one is known"), report


def _json(capsys, *args) -> str:
    from fedfer.cli import main

    main(["privacy", "audit", *map(str, args), "--trust-run-keys", "--json"])
    return capsys.readouterr().out


# ------------------------------------------------------------------------ 3. over budget beside another problem
def test_over_budget_is_reported_when_the_entry_also_has_another_problem(tmp_path, capsys):
    from privacy.accounting import SchoolAccountant, dataset_fingerprint, epsilon_of
    from privacy.ledger import SchoolLedger

    school = School(tmp_path, "s1")
    school.train("run-1", 1)
    ledger = SchoolLedger(school.state, "s1", school.key)
    acct = SchoolAccountant(school.state, "s1", dataset_fingerprint([f"s1,row{i}" for i in range(5)]))
    history = acct.history + [(1.2, 0.25, 8)]
    ledger.append(event="round", dataset_fingerprint=acct.fingerprint, run_id="run-1", round=2,
                  privacy_unit="student", sample_rate=0.25, noise_multiplier=1.2, max_grad_norm=1.0, steps=8,
                  delta=DELTA, accountant="prv", history_before=acct.history,
                  epsilon=epsilon_of(history, DELTA) / 2,   # under-reported, validly signed
                  epsilon_rdp=epsilon_of(history, DELTA, "rdp"), budget=50.0)
    code, out = _audit(capsys, school.state, "--trust-run-keys", "--budget", "0.5")
    assert code == 2 and "line 2 (school s1): stored epsilon" in out, out
    assert "(school s1): ε" in out and "exceeds budget 0.5" in out, out
    assert "INCONSISTENT, OVER-BUDGET" in out and "OVER BUDGET too" in _verdict(out), out


def test_an_rdp_epsilon_above_the_budget_says_the_budget_is_checked_against_prv(tmp_path, capsys):
    """The table shows ε PRV and ε RDP; a row "ok" with its ε RDP above the budget (every default simulated
    school: ε PRV 7.99, ε RDP 8.8-9.0 of 8) left the privacy officer to guess which one the verdict used."""
    schools, (server,) = _federation(tmp_path, runs=1)
    row = json.loads(_json(capsys, server.run.path))["schools"][0]
    assert row["epsilon_rdp"] > row["epsilon_prv"]
    between = (row["epsilon_prv"] + row["epsilon_rdp"]) / 2
    code, out = _audit(capsys, server.run.path, "--trust-run-keys", "--budget", repr(between))
    assert code == 0 and _verdict(out) == "audit: intact, within budget (exit 0)", out
    assert "the budget is checked against ε PRV" in out and "(school-a, school-b) is not a finding" in out, out
    from fedfer.cli import main   # the archive's JSON carries the same note
    main(["privacy", "audit", str(server.run.path), "--trust-run-keys", "--budget", repr(between), "--json"])
    assert any("checked against ε PRV" in n for n in json.loads(capsys.readouterr().out)["notes"])
    code, out = _audit(capsys, server.run.path, "--trust-run-keys", "--budget", repr(row["epsilon_rdp"] * 2))
    assert code == 0 and "checked against ε PRV" not in out, out   # nothing to explain when both are within


def test_the_lifetime_lines_keep_epsilon_in_one_column_for_names_of_any_length(tmp_path, capsys):
    """A deployment with `lincoln-high` beside `school-00` printed the lifetime lines' ε in two columns."""
    schools = [School(tmp_path, "s-1"), School(tmp_path, "lincoln-high")]
    server = Server(tmp_path, "run-1", schools)
    for school in schools:
        server.receive(school, 1, school.train(server.run.run_id, 1))
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    lines = out.split("lifetime per school:\n")[1].splitlines()[:2]
    assert code == 0 and len({line.index(" ε ") for line in lines}) == 1, out


# ------------------------------------------------------------------------ 4. digits that differ
def test_an_epsilon_just_over_the_budget_is_printed_with_digits_that_differ(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1)
    eps = json.loads(_json(capsys, server.run.path))["schools"][0]["epsilon_prv"]
    budget = eps - 2e-5
    assert f"{eps:.4g}" == f"{budget:.4g}"   # where the old message read "ε X exceeds budget X"
    code, out = _audit(capsys, server.run.path, "--trust-run-keys", "--budget", repr(budget))
    assert code == 1, out
    (shown_eps, shown_budget), *_ = re.findall(r"ε (\S+) exceeds budget (\S+)", out)
    assert shown_eps != shown_budget and float(shown_eps) > float(shown_budget), out
    row = _row(out, "school-a")
    assert row[7] != row[9] and float(row[7]) > float(row[9]), out   # the table's ε PRV and budget columns


# ------------------------------------------------------------------------ 5. the copy column
def test_copy_column_says_run_on_tampered_and_unreadable_run_copies(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1)
    path = server.run.path / "ledger" / "school-a.jsonl"
    path.write_text(path.read_text().replace('"steps": 8', '"steps": 1', 1))
    (server.run.path / "keys" / "school-b.pub").unlink()
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    assert code == 2, out
    assert _row(out, "school-a")[-3:] == ["TAMPERED", "run", server.run.path.name], out
    assert _row(out, "school-b")[-3:] == ["UNREADABLE", "run", server.run.path.name], out
    code, out = _audit(capsys, schools[0].state, "--trust-run-keys")
    assert _row(out, "school-a")[-2:] == ["school's", "own"], out


# ------------------------------------------------------------------------ 6, 7. the anchors themselves
def test_a_corrupt_anchor_is_reported_once(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1)
    (tmp_path / "runs" / "anchors" / "school-a.json").write_text("{not json")
    code, out = _audit(capsys, server.run.path, "--keys", _keyring(tmp_path, schools))
    assert code == 2 and out.count("unreadable") == 1 and "school-a.json: anchor of school school-a" in out, out


def test_an_edited_anchor_count_or_head_is_caught(tmp_path, capsys):
    from privacy.anchors import check_continues, load_chain
    from privacy.ledger import LedgerError

    schools, (server,) = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools)
    anchor = tmp_path / "runs" / "anchors" / "school-a.json"
    intact = anchor.read_text()
    for edit in ({"count": 0}, {"count": 5}, {"head": "f" * 64}):
        data = json.loads(intact)
        (chain,) = data["chains"].values()
        chain.update(edit)
        anchor.write_text(json.dumps(data))
        code, out = _audit(capsys, server.run.path, "--keys", keys)
        assert code == 2 and "school-a.json: anchor of school school-a" in out and "edited or damaged" in out, out
    # the server refuses to build on it too (count 0 would otherwise let a restarted chain through)
    data = json.loads(intact)
    (chain,) = data["chains"].values()
    chain["count"] = 0
    anchor.write_text(json.dumps(data))
    try:
        load_chain(anchor.parent, "school-a", schools[0].key.public_key())
        raise AssertionError("an anchor with an edited count loaded")
    except LedgerError as exc:
        assert "count 0" in str(exc)
    assert check_continues({"count": 0, "head": "", "runs": []}, {"prev_hash": "0" * 64}).problem == ""


def test_an_anchor_behind_the_copy_by_a_crash_is_a_note_not_an_edited_anchor(tmp_path, capsys):
    """Crash harness (session 23, server-ledger-copy): the server stored a reply's entry in the run copy and was
    killed before anchoring it (update_anchor comes after the copy; the next reply heals it). The school's
    ledger and the copy agree and the anchor holds the first of their entries: the audit said 'the anchor
    was edited or damaged', exit 2; it is a note and the audit passes."""
    from privacy.anchors import update_anchor
    from privacy.ledger import read_ledger_file
    from privacy.signing import trusted_public_keys

    schools, (server,) = _federation(tmp_path, runs=1, rounds=2)
    keys = _keyring(tmp_path, schools)
    anchors = tmp_path / "runs" / "anchors"
    (anchors / "school-a.json").unlink()
    copy = read_ledger_file(server.run.path / "ledger" / "school-a.jsonl", school_id="school-a")
    update_anchor(anchors, "school-a", trusted_public_keys(server.run.key_path("school-a")), copy[:-1])
    code, out = _audit(capsys, server.run.path, schools[0].state / "ledger.jsonl", "--keys", keys)
    assert code == 0 and "edited or damaged" not in out, out
    assert "holds 1 of the 2 entries of run 'run-1'" in out and "before anchoring it" in out, out


# ------------------------------------------------------------------------ 8. no anchors at all
def test_no_anchors_found_is_noted(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1, rounds=3)
    keys = _keyring(tmp_path, schools)
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 0 and "no server anchors" not in out, out
    # a school's own ledger given beside the run is checked against that run's anchors
    code, out = _audit(capsys, server.run.path, schools[1].state / "ledger.jsonl", "--keys", keys)
    assert code == 0 and "no server anchors" not in out, out
    _resign_last(schools[1].state / "ledger.jsonl", schools[1].key)
    code, out = _audit(capsys, server.run.path, schools[1].state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and "ledger.jsonl line 3: replaced entry" in out, out
    shutil.rmtree(tmp_path / "runs" / "anchors")
    copy = server.run.path / "ledger" / "school-b.jsonl"
    copy.write_text("".join(copy.read_text().splitlines(keepends=True)[:-1]))
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 0, out
    (note,) = [line for line in out.splitlines() if "no server anchors found" in line]
    assert "school-a, school-b" in note and "cut short" in note and str(tmp_path / "runs" / "anchors") in note, out


# ------------------------------------------------------------------------ 9, 10, 11. usage errors
def test_a_missing_path_or_keyring_is_a_one_line_usage_error(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools)
    for argv, message in (
            ([tmp_path / "nowhere", "--keys", keys], f"{tmp_path / 'nowhere'}: not found"),
            ([server.run.path, "--keys", tmp_path / "deploy" / "nokeys"], f"--keys {tmp_path / 'deploy' / 'nokeys'}: not found"),
            ([server.run.path, "--keys", keys / "school-a.pub"], "a file, not a keyring"),
            ([tmp_path / "runs" / "anchors", "--keys", keys], "the coordinator's anchors, not a ledger"),
            ([tmp_path / "runs", "--keys", keys], "no ledger/ directory")):
        code, out = _audit(capsys, *argv)
        assert code == 2 and len(out.splitlines()) == 1 and out.startswith("fedfer privacy audit: "), out
        assert message in out and "TAMPERED" not in out and "status" not in out, out
    code, out = _audit(capsys, server.run.path, "--keys", keys / "school-a.pub")
    assert "directory" in out and "<school>.pub" in out, out


@pytest.mark.parametrize("words, message", [
    (["--json"], "the following arguments are required"),
    (["{tmp}/nowhere", "--keys", "{tmp}", "--json"], "{tmp}/nowhere: not found"),
    (["{tmp}", "--keys", "{tmp}", "--json", "--bogus"], "unrecognized arguments: --bogus"),
    (["{tmp}", "--json", "--keys"], "argument --keys: expected one argument"),
    (["{tmp}", "--trust-run-keys", "--js", "--budget", "abc"], "argument --budget: invalid float value: 'abc'"),
    (["{tmp}", "--trust-run-keys", "--json", "--budget", "nan"], "--budget must be a finite ε > 0, got nan"),
    (["{tmp}", "--trust-run-keys", "--json", "--budget", "0"], "--budget must be a finite ε > 0, got 0.0"),
    (["{tmp}", "--trust-run-keys", "--json", "--budget", "1e300"], "--budget must be an ε of at most 1000"),
    (["{tmp}", "--json"], "give --keys DIR")], ids=["no-path", "missing-path", "unknown-flag", "flag-no-value",
                                                     "abbreviated-json-bad-number", "budget-nan", "budget-zero",
                                                     "budget-huge", "no-keys"])
def test_with_json_a_usage_error_is_one_json_object_on_stdout(tmp_path, capsys, words, message):
    """`privacy audit --json` is read by an archive script: a usage error argparse finds (an unknown flag, a
    missing path, a value that is not a number) or the audit refuses (a path not found) was a plain-text line
    on stderr; now it is one JSON object with the report's keys on stdout, exit 2 as before."""
    from fedfer.cli import main

    words = [w.replace("{tmp}", str(tmp_path)) for w in words]
    try:
        code = main(["privacy", "audit", *words])
    except SystemExit as exc:   # argparse's errors end by SystemExit
        code = exc.code
    out, err = capsys.readouterr()
    report = json.loads(out)   # the whole of stdout is one object
    assert code == 2 and report["exit_code"] == 2 and report["verdict"] == "USAGE ERROR", out
    assert message.replace("{tmp}", str(tmp_path)) in report["error"] and report["problems"] == [report["error"]], out
    assert report["schools"] == [] and report["lifetime"] == [] and "audited_at" in report and err == "", err


PLAN = ["plan", "--epsilon", "4", "--delta", "1e-5", "--rounds", "4", "--local-epochs", "1", "--students", "48",
        "--batch", "16"]


@pytest.mark.parametrize("words, message", [
    ([*PLAN, "--json", "--points", "1"], "--points must be at least 2"),
    ([*PLAN, "--json", "--bogus"], "unrecognized arguments: --bogus"),
    ([*PLAN[:-2], "--json"], "the following arguments are required: --batch"),
    ([*PLAN, "--js", "--rounds", "x"], "argument --rounds: invalid int value: 'x'"),
    ([*PLAN[:2], "1e-12", *PLAN[3:], "--json"], "cannot reach epsilon 1e-12"),   # the accountant refuses
    (["canary-audit", "--json", "--canaries", "1"], "--canaries must be at least 2"),
    (["canary-audit", "--json", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["canary-audit", "--json", "--bogus"], "unrecognized arguments: --bogus"),
    (["attack", "--json", "--image-size", "100000"], "--image-size must be at most 512")],
    ids=["plan-points", "plan-unknown-flag", "plan-missing-flag", "plan-bad-int", "plan-accounting",
         "canary-count", "canary-bad-int", "canary-unknown-flag", "attack-image-size"])
def test_plan_and_canary_audit_with_json_print_a_usage_error_as_one_json_object(capsys, monkeypatch, words, message):
    """`privacy plan --json` and `privacy canary-audit --json` printed their usage errors as plain text on
    stderr (an archive script reading stdout as JSON got nothing); now, like `privacy audit --json`, one JSON
    object on stdout, exit 2: the same printer, without the audit's report keys."""
    from fedfer.cli import main
    from fedfer.commands import privacy as command

    monkeypatch.setattr(command, "_school_tensors", lambda args, unit: pytest.fail("the school was loaded"))
    try:
        code = main(["privacy", *words])
    except SystemExit as exc:   # argparse's errors end by SystemExit
        code = exc.code
    out, err = capsys.readouterr()
    error = json.loads(out)   # the whole of stdout is one object
    assert code == 2 and err == "" and error["exit_code"] == 2 and error["verdict"] == "USAGE ERROR", (out, err)
    assert message in error["error"] and "schools" not in error, out


@pytest.mark.parametrize("command", [PLAN, ["canary-audit", "--canaries", "40"]], ids=["plan", "canary-audit"])
def test_without_json_words_no_parser_took_are_one_line_naming_the_sub_command(capsys, command):
    """A word left over after `privacy plan` / `canary-audit` was argparse's usage block of the whole `fedfer`
    command; it is now the sub-command's own one line, as for `privacy audit`."""
    from fedfer.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["privacy", *command, "--bogus"])
    out, err = capsys.readouterr()
    name = "plan" if command is PLAN else "canary-audit"
    assert exc.value.code == 2 and out == "" and err == f"fedfer privacy {name}: unrecognized arguments: --bogus\n", err


def test_without_json_a_usage_error_stays_one_line_on_stderr(tmp_path, capsys):
    from fedfer.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["privacy", "audit", str(tmp_path), "--keys"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "" and err.splitlines()[-1].endswith("argument --keys: expected one argument")
    with pytest.raises(SystemExit) as exc:
        main(["privacy", "audit", str(tmp_path), "--trust-run-keys", "--bogus"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "" and err == "fedfer privacy audit: unrecognized arguments: --bogus\n", err


def test_a_simulated_run_audited_without_its_keys_is_pointed_to_trust_run_keys(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1)
    code, out = _audit(capsys, server.run.path, "--keys", tmp_path / "deploy" / "keys")   # no deployment here
    assert code == 2 and "--trust-run-keys" in out and "coordinator" in out and len(out.splitlines()) == 1, out
    empty = tmp_path / "empty-keyring"
    empty.mkdir()
    code, out = _audit(capsys, server.run.path, "--keys", empty)
    assert code == 2 and "no public key" in out and "--trust-run-keys uses it" in out, out
    readme = (ROOT / "README.md").read_text()
    reading = readme[readme.index("## Reading a run"):readme.index("## Config")]
    assert "--trust-run-keys" in reading and "--keys deploy/keys" in reading


# ------------------------------------------------------------------------ 12. a closed pipe
def test_a_closed_stdout_ends_quietly(tmp_path):
    schools, (server,) = _federation(tmp_path, runs=1)
    read, write = os.pipe()
    os.close(read)   # `| head` that has already left
    try:
        done = subprocess.run([sys.executable, "-m", "fedfer", "privacy", "audit", str(server.run.path),
                               "--trust-run-keys", "--json"], stdout=write, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


# ------------------------------------------------------------------------ 13. canary-audit progress
def test_canary_audit_says_calibrating_once(monkeypatch, capsys):
    import torch

    from fedfer.cli import main
    from fedfer.commands import privacy as command

    def school(args, unit):
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(48, 3, args.image_size, args.image_size, generator=gen) * 2 - 1
        return x, torch.arange(48) % 7, [f"s{i // 2}" for i in range(48)], "a tiny test school"

    monkeypatch.setattr(command, "_school_tensors", school)
    code = main(["privacy", "canary-audit", "--canaries", "40", "--runs", "4", "--epochs", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("run 4/4") == 1, out
    assert out.count("calibrating σ") == 1, out


@pytest.mark.parametrize("text", [b"a: &x [1]\nb: *x\n", b"\xff\xfe not utf-8", b"- a list\n", b"a: [unclosed\n"],
                         ids=["alias", "binary", "list", "syntax"])
def test_canary_audit_reads_a_run_config_strictly(tmp_path, capsys, text):
    """`canary-audit RUN_DIR` reads the run's config.yaml with the project's strict reader: one line, exit 2
    (yaml.safe_load expanded aliases, and a non-UTF-8 file or a list was an internal error)."""
    from fedfer.cli import main

    (tmp_path / "config.yaml").write_bytes(text)
    assert main(["privacy", "canary-audit", str(tmp_path), "--canaries", "40", "--runs", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.yaml" in err and "internal error" not in err, err


@pytest.mark.parametrize("flags, words", [(["--image-size", "100000"], "--image-size must be at most 512"),
                                          (["--seed", "-1"], "--seed must be >= 0, got -1")])
def test_canary_audit_flags_out_of_range_are_one_line_naming_the_flag(capsys, flags, words):
    """--image-size 100000 asked torch for 27 TB (an internal error); --seed -1 was numpy's message, naming no flag."""
    from fedfer.cli import main

    assert main(["privacy", "canary-audit", "--canaries", "40", "--runs", "4", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "internal error" not in err, err


@pytest.mark.parametrize("flags, words", [
    (["--canaries", str(10**12)], "--canaries must be at most 100000, got 1000000000000"),
    (["--canaries", "100001", "--black-box"], "--canaries must be at most 100000, got 100001"),
    (["--canaries", "50000", "--runs", "2"], "puts 25000 canaries in a run; at most 10000 per run: give more --runs"),
    (["--canaries", "1"], "--canaries must be at least 2")],
    ids=["10^12", "100001-black-box", "25000-per-run", "one"])
def test_canary_audit_refuses_more_canaries_than_it_can_hold_before_loading_data(monkeypatch, capsys, flags, words):
    """--canaries had no upper bound: 10^12 asked numpy for 466 GiB, 50000 over 2 runs torch for 5 GB a step
    (an internal error at best). Refused in one line before the school is loaded."""
    from fedfer.cli import main
    from fedfer.commands import privacy as command

    def no_school(args, unit):
        raise AssertionError("the school was loaded before --canaries was checked")

    monkeypatch.setattr(command, "_school_tensors", no_school)
    assert main(["privacy", "canary-audit", "--epochs", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "internal error" not in err, err


@pytest.mark.parametrize("flags, words", [
    (["--canaries", "100000", "--black-box", "--model", "hafnet:dp"],
     "100000 canaries (black-box) of 64x64 faces would take about 16.0 GB for the canaries alone (at most 4 GB): "
     "give fewer --canaries or a model with smaller inputs than hafnet:dp's"),
    (["--black-box", "--image-size", "512"], "500 canaries (black-box) of 512x512 faces would take about 5.1 GB"),
    (["--canaries", "16000", "--runs", "4", "--image-size", "512"],
     "16000 canaries (white-box) of 512x512 faces would take about 23.6 GB for the canaries alone (at most 4 GB): "
     "give fewer --canaries, more --runs or a smaller --image-size")],
    ids=["10^5-black-box-hafnet", "black-box-512", "white-box-512"])
def test_canary_audit_refuses_canaries_that_would_not_fit_in_memory_at_their_image_size(monkeypatch, capsys, flags,
                                                                                       words):
    """The --canaries caps were counts, right at 16x16 faces: 10^5 black-box canaries at a registered model's size
    (or --image-size 512) are many GB. Now also capped by the memory they would take, with the estimate, before
    the school is loaded; what the documented audits use still fits."""
    from fedfer.cli import main
    from fedfer.commands import privacy as command

    def no_school(args, unit):
        raise AssertionError("the school was loaded before the canaries' memory was checked")

    monkeypatch.setattr(command, "_school_tensors", no_school)
    assert main(["privacy", "canary-audit", "--epochs", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "internal error" not in err, err
    for canaries, runs, white, size in ((100_000, 16, False, 16), (10_000, 1, True, 16), (8000, 16, True, 64),
                                        (16_000, 16, True, 64)):   # the count caps' extremes; the benchmarks' audits
        assert command.canary_memory_bytes(canaries, runs, white, size, 2) <= command.MAX_CANARY_BYTES


def test_the_history_footnote_only_asks_for_ledgers_not_given(tmp_path, capsys):
    """A run copy's ε includes the earlier spending its first entry claims; the footnote asks for the school's own
    ledger to check that claim, and is gone once every school's own ledger is given beside the run."""
    schools, (_, second) = _federation(tmp_path, runs=2)
    keys = _keyring(tmp_path, schools)
    code, out = _audit(capsys, second.run.path, "--keys", keys)
    assert code == 0 and "pass the school's own ledger.jsonl too" in out, out
    code, out = _audit(capsys, second.run.path, *(s.state for s in schools), "--keys", keys)
    assert code == 0 and "pass the school's own ledger.jsonl too" not in out, out
    code, out = _audit(capsys, second.run.path, schools[0].state, "--keys", keys)   # one school's: still asked
    assert "pass the school's own ledger.jsonl too to check it (school-b)" in out, out   # for the other one


# ------------------------------------------------------------------------ two ledgers under one school id
SHARED_NAME_VERDICT = "audit: ledgers intact, but SEVERAL SCHOOLS SHARE A NAME"


def test_two_schools_of_one_name_are_refused_naming_both_ledgers(tmp_path, capsys):
    """Each simulation makes its schools afresh, so two runs' school-a are two schools; audited together the
    audit showed one lifetime ε for "school-a" (the first ledger's) and said intact."""
    first, _ = _federation(tmp_path / "sim-1", runs=1)
    second, _ = _federation(tmp_path / "sim-2", runs=1)
    one, other = first[0].state, second[0].state
    code, out = _audit(capsys, one, other, "--trust-run-keys")
    assert code == 2 and _verdict(out).startswith(SHARED_NAME_VERDICT), out
    line = next(line for line in out.splitlines() if "two ledgers under one school id" in line)
    assert f"{one / 'ledger.jsonl'} line 1" in line and f"{other / 'ledger.jsonl'} line 1" in line
    # the same for the two runs' copies
    code, out = _audit(capsys, tmp_path / "sim-1" / "runs" / "run-1", tmp_path / "sim-2" / "runs" / "run-1",
                       "--trust-run-keys")
    assert code == 2 and "two ledgers under one school id" in out, out
    # one school's own ledger beside the copy of its own run is one chain: no finding
    code, out = _audit(capsys, tmp_path / "sim-1" / "runs" / "run-1", one, "--trust-run-keys")
    assert code == 0 and "two ledgers" not in out, out


def _simulations(root: Path, count: int, only_in_first: tuple[str, ...] = ()) -> Path:
    """`count` simulated runs under one runs/ root, as `fedfer simulate` leaves them: each makes its schools
    afresh (new keys) under the same ids, school-a and school-b (and `only_in_first` in sim-1 alone); the anchors
    beside them."""
    for k in range(1, count + 1):
        names = ("school-a", "school-b") + (only_in_first if k == 1 else ())
        schools = [School(root / f"sim-{k}", name) for name in names]
        server = Server(root, f"sim-{k}", schools)
        for school in schools:
            server.receive(school, 1, school.train(server.run.run_id, 1))
    return root / "runs"


def test_many_simulated_runs_give_one_line_per_school_id_and_one_next_step(tmp_path, capsys):
    """`fedfer privacy audit runs/*` over several simulations printed one "two ledgers under one school id" line
    per school and pair of runs (40 for 10 schools x 5 runs) and told the officer to ask for the original files.
    The refusal stays (exit 2, a different school per run under one id), but as one line per school id naming
    how many ledgers and keys and the first runs, and one `next:` line saying to audit each run on its own."""
    runs = _simulations(tmp_path, 5)
    code, out = _audit(capsys, *sorted(runs.iterdir()), "--trust-run-keys", "--budget", 50)   # as a policy.json would
    assert code == 2 and _verdict(out).startswith(SHARED_NAME_VERDICT), out
    same_id = [line for line in out.splitlines() if "ledgers under one school id" in line]
    assert [line.split(":")[0] for line in same_id] == ["school school-a", "school school-b"], out
    assert all("5 ledgers under one school id (run sim-1, run sim-2, run sim-3 and 2 more), signed by 5 different "
               "keys" in line for line in same_id), same_id
    nexts = [line for line in out.splitlines() if line.startswith("next:")]
    assert len(nexts) == 1 and "audit each simulated run on its own" in nexts[0], nexts
    assert f"fedfer privacy audit {runs / 'sim-1'} --trust-run-keys" in nexts[0] and "do not sign off" not in out
    assert "no one lifetime ε: 5 schools of this name" in out and not re.search(r"ε \d", out.split("lifetime per school")[1])
    # a school's own ledger beside the run copies: one chain with its own run's copy, and not compared entry by
    # entry with the other simulations' school-a (it used to be: "disagree" once per other run, "do not sign off")
    code, out = _audit(capsys, *sorted(runs.iterdir()), tmp_path / "sim-1" / "schools" / "school-a",
                       "--trust-run-keys", "--budget", 50)
    assert code == 2 and "signed by 5 different keys" in out and "disagree" not in out, out
    assert "do not sign off" not in out and len([line for line in out.splitlines() if line.startswith("next:")]) == 1
    # --json: the same keys as before, the collisions in full under a new one
    code, out = _audit(capsys, *sorted(runs.iterdir()), "--trust-run-keys", "--json")
    report = json.loads(out)
    assert code == 2 and report["exit_code"] == 2 and {"verdict", "lifetime", "next", "problems", "notes",
                                                        "schools"} <= set(report)
    assert [c["school"] for c in report["same_id"]] == ["school-a", "school-b"]
    assert report["same_id"][0]["runs"] == [f"sim-{k}" for k in range(1, 6)] and report["same_id"][0]["keys"] == 5
    assert report["same_id"][0]["different_schools"] is True
    # one run alone is intact; a usage error's JSON has the report's keys, same_id among them
    assert _audit(capsys, runs / "sim-3", "--trust-run-keys")[0] == 0
    code, out = _audit(capsys, runs / "sim-9", "--trust-run-keys", "--json")
    usage = json.loads(out)
    assert code == 2 and usage["verdict"] == "USAGE ERROR" and set(report) <= set(usage) and usage["same_id"] == []


def test_a_forked_ledger_is_refused_naming_where_it_forks(tmp_path, capsys):
    """A school's ledger restored from an older copy and written on: two different entries after its line 2,
    each branch a valid chain on its own, neither counting the other's spend."""
    schools, _ = _federation(tmp_path, runs=1, rounds=2)
    school = schools[0]
    backup, branch = tmp_path / "backup", tmp_path / "first-branch"
    shutil.copytree(school.state, backup)
    school.train("run-2", 1)               # the school goes on ...
    shutil.copytree(school.state, branch)
    shutil.rmtree(school.state)
    shutil.copytree(backup, school.state)  # ... is restored from the older copy ...
    school.train("run-3", 1)               # ... and goes on again from there
    for alone in (branch, school.state):
        assert _audit(capsys, alone, "--trust-run-keys")[0] == 0
    code, out = _audit(capsys, branch, school.state, "--trust-run-keys")
    assert code == 2, out
    line = next(line for line in out.splitlines() if "two ledgers under one school id" in line)
    assert f"{branch / 'ledger.jsonl'} line 3 and {school.state / 'ledger.jsonl'} line 3" in line, line
    assert "after the same entry" in line and "signed by one key: one school's ledger forked" in line
    # one school's ledger forked is a finding, not schools of one name: no advice to audit the runs apart
    assert "do not sign off" in out and "audit each simulated run on its own" not in out, out


def test_schools_of_one_name_have_no_lifetime_epsilon_in_the_json_either(tmp_path, capsys):
    """The text said "no one lifetime ε: 2 schools of this name" while --json's `lifetime` gave school-a one run's
    ε, budget left and source, as if it were the school's. Now its `epsilon` (and every other single figure) is
    null, and `per_run` holds each ledger's figures keyed by run id and key; a school only one run has keeps its
    lifetime figure as before."""
    runs = _simulations(tmp_path, 2, only_in_first=("school-c",))
    code, out = _audit(capsys, *sorted(runs.iterdir()), "--trust-run-keys", "--budget", 50, "--json")
    report = json.loads(out)
    lifetime = {entry["school"]: entry for entry in report["lifetime"]}
    rows = {(r["school"], r["run_id"]): r for r in report["schools"]}
    for school in ("school-a", "school-b"):
        entry = lifetime[school]
        assert entry["status"] == "shared-name" and all(entry[k] is None for k in (
            "epsilon", "delta", "budget", "budget_left", "rounds", "refusals", "steps", "source", "key_id")), entry
        assert [p["run_id"] for p in entry["per_run"]] == ["sim-1", "sim-2"], entry
        for figures in entry["per_run"]:
            row = rows[(school, figures["run_id"])]
            assert figures["epsilon"] == row["epsilon_prv"] and figures["key_id"] == row["key_id"]
            assert figures["budget"] == 50 and figures["budget_left"] == 50 - row["epsilon_prv"]
            assert figures["source"] == row["source"] and figures["status"] == "ok" and figures["steps"] > 0
        assert len({p["key_id"] for p in entry["per_run"]}) == 2
    alone = lifetime["school-c"]
    assert alone["epsilon"] == rows[("school-c", "sim-1")]["epsilon_prv"] and alone["status"] == "ok", alone
    assert "per_run" not in alone
    # the text says the same: no ε on school-a's lifetime line, one on school-c's
    code, out = _audit(capsys, *sorted(runs.iterdir()), "--trust-run-keys", "--budget", 50)
    lines = out.split("lifetime per school:")[1].splitlines()
    assert not re.search(r"ε \d", next(line for line in lines if "school-a" in line)), lines
    assert re.search(r"ε \d", next(line for line in lines if "school-c" in line)), lines


def test_schools_of_one_name_alone_get_their_own_verdict_not_tampered(tmp_path, capsys):
    """Schools of one name (each simulation's own, signed by different keys) as the only finding read
    "TAMPERED, INCONSISTENT OR UNREADABLE": an officer took the ledgers for tampered with. They get their own
    verdict; the exit stays 2 (no lifetime ε can be signed off, and 0 or 1 would say one was checked). A fork
    under one key beside them is still the strongest verdict."""
    runs = _simulations(tmp_path, 2)
    code, out = _audit(capsys, *sorted(runs.iterdir()), "--trust-run-keys", "--budget", 50)
    assert code == 2 and _verdict(out) == (f"{SHARED_NAME_VERDICT} (school-a, school-b): no one lifetime ε for "
                                           f"them — audit each run on its own (exit 2)"), out
    assert "TAMPERED" not in out and "INCONSISTENT" not in out and "do not sign off" not in out, out
    assert "[SHARED NAME; audit each run on its own]" in out, out
    # one run's school over its budget as well: said too
    code, out = _audit(capsys, *sorted(runs.iterdir()), "--trust-run-keys", "--budget", 0.01)
    assert code == 2 and _verdict(out).startswith(SHARED_NAME_VERDICT) and "; OVER BUDGET too" in _verdict(out)
    # one school's ledger forked under one key, beside them: tampered, do not sign off
    schools, _ = _federation(tmp_path / "deployed", runs=1, rounds=2)
    school = schools[0]
    backup, branch = tmp_path / "backup", tmp_path / "first-branch"
    shutil.copytree(school.state, backup)
    school.train("run-2", 1)
    shutil.copytree(school.state, branch)
    shutil.rmtree(school.state)
    shutil.copytree(backup, school.state)
    school.train("run-3", 1)
    code, out = _audit(capsys, *sorted(runs.iterdir()), branch, school.state, "--trust-run-keys", "--budget", 50)
    assert code == 2 and _verdict(out).startswith("audit: TAMPERED, INCONSISTENT OR UNREADABLE"), out
    assert "next: do not sign off" in out and SHARED_NAME_VERDICT not in out, out
