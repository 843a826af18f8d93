"""`fedfer deploy restore-ledger`: a school whose ledger.jsonl is lost rebuilds it from the coordinator's run copies.

The end-to-end test runs the real school round (client_app.train) against the real server-side verification and
anchoring (SchoolFedAvg._store_ledger): the school spends in two runs, loses its ledger and accountant, is refused,
restores from the copies in the anchor's order, and then the audit passes with the same lifetime ε, training goes
on from where the chain was, and the budget guard still counts every earlier round. The other tests are the
restore's refusals: a withheld newest copy, a gap, a copy signed by a key that is not the school's, an accountant
that counted more than the copies hold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from school_fixtures import school_context, train_message, write_school
from test_ledger_trust import Server

from client import app as client_app
from fedfer.cli import main as fedfer_main
from privacy.ledger import LedgerError, read_ledger_file
from privacy.ledger_restore import RESTORE_RECORD, restore_ledger
from privacy.state_folder import LEDGER_MARKER
from server.deploy.commands import make_school_keys
from shared_models.config import from_run_config, load_config
from shared_models.models import registry

BASE = ["train.batch_size=2", "federation.rounds=4", "train.frames_per_student=2"]
SCHOOL = "school-x"   # school_fixtures' node-config


class District:
    """One school (real ClientApp rounds) and the coordinator's runs (real ledger verification and anchors)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.school = write_school(root / "school", [f"s{i}" for i in range(6)])
        self.state = root / "state"
        make_school_keys(self.state)   # at enrolment, as `fedfer deploy school-key` does
        self.keys = root / "deploy" / "keys"
        self.keys.mkdir(parents=True)
        shutil.copy(self.state / "signing_key.pub", self.keys / f"{SCHOOL}.pub")
        cfg = load_config(None, BASE)
        torch.manual_seed(0)
        self.model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"])).state_dict()
        self.servers: list[Server] = []

    def new_run(self, name: str) -> Server:
        server = Server(self.root, name, [])
        server.run.key_path(SCHOOL).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.keys / f"{SCHOOL}.pub", server.run.key_path(SCHOOL))
        self.servers.append(server)
        return server

    def round(self, server: Server, rnd: int, *overrides: str):
        """One round at the school; its reply's ledger goes through the server's verification. Returns the status
        and the entry's ε (None when nothing was signed)."""
        run_config = from_run_config({**dict(o.split("=", 1) for o in BASE), **dict(o.split("=", 1) for o in overrides)})
        out = client_app.train(train_message(self.model, server.run.path, server_round=rnd, run_id=server.run.run_id),
                                school_context(self.school, self.state, run_config))
        status = out.content["status"]["status"]
        if "ledger" not in out.content.config_records:
            return status, None
        server.strategy._store_ledger(out.content, SCHOOL, rnd)
        return status, float(json.loads(out.content["ledger"]["entry"])["epsilon"])

    def audit(self, capsys, *extra: str) -> tuple[int, str]:
        args = [*(str(s.run.path) for s in self.servers), str(self.state / "ledger.jsonl"), "--keys", str(self.keys)]
        code = fedfer_main(["privacy", "audit", *args, *extra])
        captured = capsys.readouterr()
        return code, captured.out + captured.err


def _lifetime_epsilon(out: str) -> float:
    (school,) = [s for s in json.loads(out)["lifetime"] if s["school"] == SCHOOL]
    return float(school["epsilon"])


@pytest.fixture
def spent(tmp_path) -> District:
    """Two runs: rounds 1-2 of run-1, round 1 of run-2."""
    district = District(tmp_path)
    first = district.new_run("run-1")
    for rnd in (1, 2):
        assert district.round(first, rnd)[0] == "ok"
    assert district.round(district.new_run("run-2"), 1)[0] == "ok"
    return district


def _lose_ledger_and_accountant(state: Path) -> None:
    (state / "ledger.jsonl").unlink()
    for path in state.glob("accountant-*.json"):
        path.unlink()


def test_a_lost_ledger_is_restored_from_the_run_copies_and_the_budget_still_holds(spent, capsys):
    district, run_2 = spent, spent.servers[-1]
    code, before = district.audit(capsys, "--json")
    assert code == 0, before
    epsilon_before = _lifetime_epsilon(before)
    entries_before = read_ledger_file(district.state / "ledger.jsonl")

    _lose_ledger_and_accountant(district.state)
    assert district.round(run_2, 2) == ("ledger-lost", None)   # fail closed: no training from ε 0

    code = fedfer_main(["deploy", "restore-ledger", "--state-dir", str(district.state), "--school", SCHOOL,
                        "--from", str(district.root / "runs")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "3 entries" in printed and "run-1, run-2" in printed and "the accountant was rebuilt" in printed
    assert read_ledger_file(district.state / "ledger.jsonl") == entries_before   # the same signed chain

    code, after = district.audit(capsys, "--json")
    assert code == 0, after
    assert _lifetime_epsilon(after) == pytest.approx(epsilon_before, abs=1e-9)
    code, table = district.audit(capsys)
    assert code == 0 and "rebuilt from the coordinator's run copies" in table, table

    status, epsilon = district.round(run_2, 2)   # training continues from where the chain was ...
    assert status == "ok" and epsilon > epsilon_before
    assert not [e for e in run_2.events() if e.get("event") == "ledger-anchor"], run_2.events()
    # ... and the budget guard counts every round before the loss: the next round does not fit the school's 8
    assert epsilon < 8.0 and district.round(run_2, 3) == ("budget-exhausted", pytest.approx(epsilon, abs=1e-9))


def test_a_withheld_newest_copy_is_refused(spent):
    _lose_ledger_and_accountant(spent.state)
    shutil.rmtree(spent.servers[-1].run.path / "ledger")
    with pytest.raises(LedgerError, match="run-2.*missing.*anchor lists run run-2"):
        restore_ledger(spent.state, spent.root / "runs", SCHOOL)
    assert not (spent.state / "ledger.jsonl").exists() and not (spent.state / RESTORE_RECORD).exists()


def test_a_copy_cut_short_is_refused_against_the_anchors_head(spent):
    _lose_ledger_and_accountant(spent.state)
    copy = spent.servers[0].run.path / "ledger" / f"{SCHOOL}.jsonl"
    copy.write_text(copy.read_text().splitlines(keepends=True)[0])   # run-1's second round withheld
    with pytest.raises(LedgerError, match="a gap"):   # run-2 continues an entry no copy holds
        restore_ledger(spent.state, spent.root / "runs", SCHOOL)
    shutil.rmtree(spent.servers[-1].run.path / "ledger")
    anchor = spent.root / "runs" / "anchors" / f"{SCHOOL}.json"
    data = json.loads(anchor.read_text())
    (chain,) = data["chains"].values()
    chain["runs"] = chain["runs"][:1]   # an anchor rewritten consistently without run-2 …
    chain["count"], chain["head"] = len(chain["runs"][0]["hashes"]), chain["runs"][0]["hashes"][-1]
    anchor.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="run-1.*lacks the anchor.s entry 2 of 2"):   # … still lists run-1's second entry
        restore_ledger(spent.state, spent.root / "runs", SCHOOL)


def _withhold_run_2_and_rewrite_the_anchor(district: District) -> None:
    """A coordinator that withholds run-2's copy and rewrites its anchor consistently without it (runs, count,
    head): the anchor's own checks cannot see it."""
    shutil.rmtree(district.servers[-1].run.path / "ledger")
    anchor = district.root / "runs" / "anchors" / f"{SCHOOL}.json"
    data = json.loads(anchor.read_text())
    (chain,) = data["chains"].values()
    chain["runs"] = chain["runs"][:1]
    chain["count"], chain["head"] = len(chain["runs"][0]["hashes"]), chain["runs"][0]["hashes"][-1]
    anchor.write_text(json.dumps(data))


def test_a_withheld_newest_copy_behind_a_rewritten_anchor_is_refused_by_the_schools_own_record(spent):
    _lose_ledger_and_accountant(spent.state)
    _withhold_run_2_and_rewrite_the_anchor(spent)
    with pytest.raises(LedgerError, match="signed 3 entries.*rebuild 2 without that one"):
        restore_ledger(spent.state, spent.root / "runs", SCHOOL)
    assert not (spent.state / "ledger.jsonl").exists()


def test_an_accountant_that_counted_more_than_the_copies_is_refused(spent):
    (spent.state / "ledger.jsonl").unlink()    # the accountant survived: it counts run-2's round
    (spent.state / LEDGER_MARKER).unlink()     # (the record beside the key did not: the accountant alone catches it)
    _withhold_run_2_and_rewrite_the_anchor(spent)
    with pytest.raises(LedgerError, match="accountant counted more spending"):
        restore_ledger(spent.state, spent.root / "runs", SCHOOL)
    assert not (spent.state / "ledger.jsonl").exists()


def test_copies_signed_by_another_key_are_refused(spent, tmp_path):
    """The coordinator's copies are verified with the school's own key, never one the coordinator sends."""
    _lose_ledger_and_accountant(spent.state)
    other = tmp_path / "other"
    make_school_keys(other)
    shutil.copy(other / "signing_key.pub", spent.state / "signing_key.pub")
    with pytest.raises(LedgerError, match="no chain under the school's own keys"):
        restore_ledger(spent.state, spent.root / "runs", SCHOOL)


def test_a_ledger_with_entries_is_never_overwritten(spent, capsys):
    code = fedfer_main(["deploy", "restore-ledger", "--state-dir", str(spent.state), "--school", SCHOOL,
                        "--from", str(spent.root / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "nothing to restore" in err and len(err.strip().splitlines()) == 1, err


def test_a_school_that_lost_its_key_as_well_restores_then_recovers_the_key(spent):
    """Ledger, accountant and signing_key.pem lost, signing_key.pub kept: the restore needs only the public half,
    then the key recovery continues the restored chain under a new key, carrying its ε on."""
    from server.deploy.commands import recover_school_ledger_key

    epsilon_before = float(read_ledger_file(spent.state / "ledger.jsonl")[-1]["epsilon"])
    _lose_ledger_and_accountant(spent.state)
    (spent.state / "signing_key.pem").unlink()
    restored = restore_ledger(spent.state, spent.root / "runs", SCHOOL)
    assert restored.entries == 3 and restored.epsilon == pytest.approx(epsilon_before, abs=1e-9)
    recovery = recover_school_ledger_key(spent.state)
    assert recovery.recovery_line == 4 and recovery.epsilon == pytest.approx(epsilon_before, abs=1e-9)


class _Killed(BaseException):
    """The process killed at that point."""


def test_a_restore_killed_while_it_writes_is_finished_by_running_it_again(spent, monkeypatch):
    """Killed while the accountant is rebuilt, or after and before the ledger is written: running it again
    finishes the restore (were the ledger written first, a kill before the accountant left a ledger beside no
    accountant: nothing to restore, and a round the school refuses)."""
    import privacy.ledger_restore as ledger_restore
    from privacy.accounting import SchoolAccountant

    _lose_ledger_and_accountant(spent.state)
    monkeypatch.setattr(SchoolAccountant, "record", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        restore_ledger(spent.state, spent.root / "runs", SCHOOL)
    monkeypatch.undo()
    real_write = ledger_restore.atomic_write_text

    def killed_at_the_ledger(path, text):
        if Path(path).name == "ledger.jsonl":
            raise _Killed()
        real_write(path, text)

    monkeypatch.setattr(ledger_restore, "atomic_write_text", killed_at_the_ledger)
    with pytest.raises(_Killed):
        restore_ledger(spent.state, spent.root / "runs", SCHOOL)
    monkeypatch.undo()
    again = restore_ledger(spent.state, spent.root / "runs", SCHOOL)   # the accountant it wrote agrees
    assert again.entries == 3 and not again.accountant_rebuilt
    (record,) = json.loads((spent.state / RESTORE_RECORD).read_text())
    assert record["accountant_rebuilt"]   # the first, killed run rebuilt it


def test_a_restore_killed_right_after_writing_the_ledger_still_leaves_its_record(spent, monkeypatch, capsys):
    """Once the ledger is back a re-run has nothing to restore: the record is written before the ledger, so a
    kill between the two cannot leave a rebuilt ledger the audit never names (it was written after)."""
    import privacy.ledger_restore as ledger_restore

    _lose_ledger_and_accountant(spent.state)
    monkeypatch.setattr(ledger_restore, "record_ledger_head", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        restore_ledger(spent.state, spent.root / "runs", SCHOOL)
    monkeypatch.undo()
    assert (spent.state / "ledger.jsonl").is_file()
    (record,) = json.loads((spent.state / RESTORE_RECORD).read_text())
    assert record["entries"] == 3
    assert any("was rebuilt from the coordinator's run copies" in note
               for note in ledger_restore.restore_notes(spent.state / "ledger.jsonl"))


# ------------------------------------------------------------------ through `fedfer simulate`
SIMULATED = ["federation.schools=2", "federation.rounds=2", "federation.min_train_schools=1",
             "data.students_per_school=6", "data.frames_per_student=6", "data.public_students=6", "data.image_size=32",
             "data.public_train_students=0", "data.heldout_students=2", "train.local_epochs=1", "train.batch_size=3",
             "evaluation.bootstrap=50", "model.pretrain=", "data.school_size_spread=30", "privacy.target_epsilon=3"]


def _simulate(work: Path, run: str, *overrides: str) -> str:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fedfer", "simulate", *SIMULATED, f"run.name={run}", f"run.root={work / 'runs'}",
           f"data.root={work / 'data'}", f"privacy.state_dir={work / 'state'}", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow   # two `fedfer simulate` runs (about a minute each on an idle 2-core machine)
def test_a_simulated_school_restores_its_ledger_and_goes_on_under_the_same_budget(tmp_path, capsys):
    """Two simulated schools sharing a state folder across runs (privacy.state_dir): school-00 loses its ledger and
    accountant after run-1, restores from the run copies, and in run-2 both schools spend exactly alike — the same
    lifetime ε, and the same round refused by the budget guard."""
    _simulate(tmp_path, "run-1")
    state = tmp_path / "state" / "school-00"
    audit = ["privacy", "audit", str(tmp_path / "runs" / "run-1"), str(state / "ledger.jsonl"), "--trust-run-keys",
             "--json"]
    assert fedfer_main(audit) == 0
    before = _lifetime_of(capsys.readouterr().out, "school-00")
    _lose_ledger_and_accountant(state)

    assert fedfer_main(["deploy", "restore-ledger", "--state-dir", str(state), "--school", "school-00",
                        "--from", str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    assert fedfer_main(audit) == 0
    assert _lifetime_of(capsys.readouterr().out, "school-00") == pytest.approx(before, abs=1e-9)

    # room for one more round (ε 3 → about 3.7), not for two (about 4.3): the guard counts run-1's rounds
    out = _simulate(tmp_path, "run-2", "privacy.budget=4.0")
    assert "round 1/2 | schools 2/2 ok" in out, out[-3000:]
    events = [json.loads(line) for line in (tmp_path / "runs" / "run-2" / "events.jsonl").read_text().splitlines()]
    refused = {e["school"] for e in events if e.get("status") == "budget-exhausted" and e.get("round") == 2}
    assert refused == {"school-00", "school-01"}, events
    runs = [str(tmp_path / "runs" / r) for r in ("run-1", "run-2")]
    assert fedfer_main(["privacy", "audit", *runs, str(state / "ledger.jsonl"), "--trust-run-keys", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    lifetime = {s["school"]: s["epsilon"] for s in report["lifetime"]}
    assert before < lifetime["school-00"] <= 4.0 and lifetime["school-00"] == pytest.approx(lifetime["school-01"],
                                                                                            abs=1e-9)


def _lifetime_of(out: str, school: str) -> float:
    return float(next(s["epsilon"] for s in json.loads(out)["lifetime"] if s["school"] == school))


def test_the_audit_reports_a_schools_ledger_older_than_its_own_record(spent, capsys):
    """An old backup of the school's ledger given to the audit without the coordinator's anchors: the record
    beside the school's key (signing_key.has-ledger) shows it lacks the entries the school signed later."""
    ledger = spent.state / "ledger.jsonl"
    ledger.write_text(ledger.read_text().splitlines(keepends=True)[0])
    code = fedfer_main(["privacy", "audit", str(ledger), "--keys", str(spent.keys)])
    out = capsys.readouterr()
    assert code == 2 and "holds 1 entry, and not the entry this state folder recorded as its last signed (entry 3" in out.out + out.err, out


def _restore_killed_at(where: str, command: list[str], state: Path) -> None:
    """`fedfer <command>` SIGKILLed by the crash harness's hook at `where`; the ledger is not written yet."""
    import signal
    import subprocess
    import sys

    from simulations.crash_harness import KILLED_RESTORE

    killed = subprocess.run([sys.executable, "-c", KILLED_RESTORE, where, *command], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not (state / "ledger.jsonl").exists()


def test_the_crash_harness_kills_a_real_restore_at_each_write_and_running_it_again_finishes(spent):
    """simulations/crash_harness.py's restore-ledger point: its restore process SIGKILLs itself at the accountant
    write, then between the accountant and the ledger; the plain command run again finishes with the same chain."""
    from simulations.crash_harness import RESTORE_KILLS

    entries_before = read_ledger_file(spent.state / "ledger.jsonl")
    _lose_ledger_and_accountant(spent.state)
    command = ["deploy", "restore-ledger", "--state-dir", str(spent.state), "--school", SCHOOL,
               "--from", str(spent.root / "runs")]
    for where in RESTORE_KILLS:
        _restore_killed_at(where, command, spent.state)
        assert bool(list(spent.state.glob("accountant-*.json"))) == (where == "ledger")
    assert fedfer_main(command) == 0
    assert read_ledger_file(spent.state / "ledger.jsonl") == entries_before
    assert len(json.loads((spent.state / RESTORE_RECORD).read_text())) == 1


def test_the_crash_harness_kills_a_restore_over_an_older_accountant_and_running_it_again_finishes(spent):
    """The restore-old-accountant point: the accountant of an old backup (half its rounds) is brought up to the
    copies; killed at that catch-up the accountant is as it was, killed after it (before the ledger) it already
    counts what the copies hold; the plain command run again writes the same chain, one restore record."""
    from simulations.crash_harness import RESTORE_KILLS, _accountant_history, make_accountant_older

    entries_before = read_ledger_file(spent.state / "ledger.jsonl")
    history_before = _accountant_history(spent.state)
    (spent.state / "ledger.jsonl").unlink()
    make_accountant_older(spent.state)
    history_older = _accountant_history(spent.state)
    assert history_older and history_older != history_before   # it counted less, not nothing
    command = ["deploy", "restore-ledger", "--state-dir", str(spent.state), "--school", SCHOOL,
               "--from", str(spent.root / "runs")]
    for where in RESTORE_KILLS:
        _restore_killed_at(where, command, spent.state)
        assert _accountant_history(spent.state) == (history_older if where == "accountant" else history_before)
    assert fedfer_main(command) == 0
    assert read_ledger_file(spent.state / "ledger.jsonl") == entries_before
    assert _accountant_history(spent.state) == history_before
    assert len(json.loads((spent.state / RESTORE_RECORD).read_text())) == 1
