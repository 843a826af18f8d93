"""What a privacy officer can rely on (issue 12, item 6) and the server's anchors across runs (item 3):

- the audit verifies against an independent keyring (`--keys`), and refuses to trust keys stored in the
  run unless told to (`--trust-run-keys`): a swapped key with re-signed, halved steps is caught;
- the budget is the school's policy, not what the entries declare; δ or unit changes are reported;
- the server anchors each school's chain across runs (<run.root>/anchors): a school whose state was wiped
  (chain restarted at genesis, key kept) or whose ledger lost its tail is rejected with an event, and the
  audit reports both, naming school and line.

The server side is the real SchoolFedAvg ledger-verification path (`_store_ledger`), fed the ConfigRecord a
school's reply carries.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, RecordDict

from fedfer.cli import main as fedfer_main
from privacy.accounting import SchoolAccountant, dataset_fingerprint, epsilon_of
from privacy.ledger import GENESIS_HASH, LedgerError, SchoolLedger, entry_hash, record_round
from privacy.signing import load_or_create_signing_key, public_key_pem, sign_hash
from privacy.state_folder import LEDGER_MARKER

SIGMA, Q, STEPS, DELTA = 1.2, 0.25, 8, 1e-5


class _TermlessAccountant:
    """An accountant that keeps no privacy unit or δ (and so cannot refuse to mix them)."""

    def __init__(self, inner: SchoolAccountant) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        if name == "check_terms":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, **_terms) -> None:
        self._inner.record(noise_multiplier, sample_rate, steps)


class School:
    """A school's state directory: signing key, accountant, ledger."""

    def __init__(self, root: Path, name: str) -> None:
        self.name, self.state = name, root / "schools" / name
        self.key = load_or_create_signing_key(self.state)

    def train(self, run_id: str, rnd: int, delta: float = DELTA, unit: str = "student",
              mixed_terms: bool = False) -> list[dict]:
        """Record one round; returns the school's entries of the run (what its reply carries).
        `mixed_terms`: sign it as a school whose accountant does not keep unit and δ would (an older or
        tampered school; fedfer's own accountant refuses the mix), so the audit must catch it."""
        ledger = SchoolLedger(self.state, self.name, self.key)
        acct = SchoolAccountant(self.state, self.name, dataset_fingerprint([f"{self.name},row{i}" for i in range(5)]))
        if mixed_terms:
            acct = _TermlessAccountant(acct)
        record_round(acct, ledger, run_id=run_id, round=rnd, privacy_unit=unit, noise_multiplier=SIGMA,
                     sample_rate=Q, steps=STEPS, max_grad_norm=1.0, delta=delta, budget=50.0)
        return ledger.entries_for_run(run_id)

    def wipe(self) -> None:
        """Lose everything but the signing key, and the marker beside it that a ledger was started: a school
        whose own fedfer does not refuse (an older one, or the marker deleted too; fedfer's own refusal is
        tests/test_lost_ledger.py) starts a new chain at genesis, and the server's anchors must catch it."""
        for path in self.state.iterdir():
            if not path.name.startswith("signing_key") or path.name == LEDGER_MARKER:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


class Server:
    """One run of the coordinator under `root/runs`, verifying replies as SchoolFedAvg does."""

    def __init__(self, root: Path, run_name: str, schools: list[School]) -> None:
        from server.run_dir import RunDirectory
        from server.strategy import SchoolFedAvg
        from shared_models.config import load_config

        cfg = load_config(None, [f"run.root={root / 'runs'}", f"run.name={run_name}"])
        self.run = RunDirectory.create(cfg)
        self.strategy = SchoolFedAvg(cfg, self.run)
        for school in schools:   # the key pinned at enrollment
            self.run.key_path(school.name).parent.mkdir(parents=True, exist_ok=True)
            self.run.key_path(school.name).write_text(public_key_pem(school.key))

    def receive(self, school: School, rnd: int, run_entries: list[dict]) -> None:
        content = RecordDict({"ledger": ConfigRecord({"entry": json.dumps(run_entries[-1]),
                                                      "run-entries": json.dumps(run_entries)})})
        self.strategy._store_ledger(content, school.name, rnd)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.run.events_path.read_text().splitlines()] \
            if self.run.events_path.exists() else []


def _keyring(root: Path, schools: list[School], policies: dict[str, dict] | None = None) -> Path:
    keys = root / "deploy" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    for school in schools:
        (keys / f"{school.name}.pub").write_text(public_key_pem(school.key))
    for name, policy in (policies or {}).items():
        (keys / f"{name}.policy.json").write_text(json.dumps(policy))
    return keys


def _audit(capsys, *args) -> tuple[int, str]:
    code = fedfer_main(["privacy", "audit", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _federation(root: Path, runs: int = 2, rounds: int = 2) -> tuple[list[School], list[Server]]:
    schools = [School(root, "school-a"), School(root, "school-b")]
    servers = []
    for r in range(1, runs + 1):
        server = Server(root, f"run-{r}", schools)
        for rnd in range(1, rounds + 1):
            for school in schools:
                server.receive(school, rnd, school.train(server.run.run_id, rnd))
        servers.append(server)
    return schools, servers


# ----------------------------------------------------------------------------------- keyring
def test_audit_refuses_run_keys_unless_explicitly_allowed(tmp_path, capsys):
    schools, (server, _) = _federation(tmp_path)
    code, out = _audit(capsys, server.run.path)
    assert code == 2 and "--keys" in out and "--trust-run-keys" in out and len(out.strip().splitlines()) == 1, out
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    assert code == 0, out
    code, out = _audit(capsys, server.run.path, "--keys", _keyring(tmp_path, schools))
    assert code == 0, out


def _swap_key_and_resign_with_halved_steps(run_dir: Path, school: str) -> None:
    """What a coordinator who can write the run directory can do: new key, every entry re-signed, steps
    halved, ε and hashes recomputed so the copy is self-consistent."""
    forger = Ed25519PrivateKey.generate()
    path = run_dir / "ledger" / f"{school}.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    prev, history = entries[0]["prev_hash"], [tuple(h) for h in entries[0]["history_before"]]
    history = [(s, q, n // 2) for s, q, n in history]
    out = []
    for e in entries:
        e["steps"] //= 2
        e["history_before"] = [list(h) for h in history]
        history = history + [(e["noise_multiplier"], e["sample_rate"], e["steps"])]
        e["epsilon"] = epsilon_of(history, e["delta"], "prv")
        e["epsilon_rdp"] = epsilon_of(history, e["delta"], "rdp")
        e["prev_hash"] = prev
        e["hash"] = entry_hash(e)
        e["signature"] = sign_hash(forger, e["hash"])
        prev = e["hash"]
        out.append(json.dumps(e))
    path.write_text("\n".join(out) + "\n")
    (run_dir / "keys" / f"{school}.pub").write_text(public_key_pem(forger))


def test_key_swap_and_resign_with_halved_steps_is_caught_with_the_keyring(tmp_path, capsys):
    schools, (first,) = _federation(tmp_path, runs=1)
    forged = tmp_path / "elsewhere" / "run-1"   # no anchors beside it: the keyring alone must catch it
    shutil.copytree(first.run.path, forged)
    _swap_key_and_resign_with_halved_steps(forged, "school-a")
    code, out = _audit(capsys, forged, "--trust-run-keys")
    assert code == 0, out   # what trusting the run's keys gives: the forgery passes
    code, out = _audit(capsys, forged, "--keys", _keyring(tmp_path, schools))
    assert code == 2 and "school-a" in out and "line 1" in out and "signature" in out, out


# ----------------------------------------------------------------------------------- policy
def test_budget_comes_from_the_policy_not_from_entries(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools, {"school-a": {"budget": 0.5}, "school-b": {"budget": 40.0}})
    code, out = _audit(capsys, server.run.path, "--keys", keys)   # entries declare 50
    assert code == 1 and "OVER-BUDGET" in out and "school-a" in out, out
    keys_no_policy = _keyring(tmp_path / "bare", schools)
    code, out = _audit(capsys, server.run.path, "--keys", keys_no_policy)
    assert code == 0 and "no policy budget found" in out, out


def test_node_config_written_by_deploy_is_the_policy(tmp_path, capsys):
    from server.deploy.layout import school_node_config, write_node_config

    from privacy.policy import make_policy

    policy = make_policy(unit="student", delta=DELTA, budget=0.5, max_round_epsilon=0.5, declared_units=100,
                         source="test")
    schools, (server,) = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools)
    for school in schools:
        write_node_config(keys.parent / "nodes" / school.name / "node-config.toml",
                          school_node_config(school.name, tmp_path / "data", school.state, policy))
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 1 and "OVER-BUDGET" in out, out


@pytest.mark.parametrize("change", ["delta", "unit"])
def test_delta_or_unit_change_between_entries_is_reported(tmp_path, capsys, change):
    school = School(tmp_path, "school-a")
    server = Server(tmp_path, "run-1", [school])
    server.receive(school, 1, school.train("run-1", 1))
    kwargs = {"delta": 1e-4} if change == "delta" else {"unit": "image"}
    kwargs["mixed_terms"] = True
    server.receive(school, 2, school.train("run-1", 2, **kwargs))
    keys = _keyring(tmp_path, [school])
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    label = "δ changes" if change == "delta" else "privacy unit changes"
    assert code == 2 and label in out and "line 2 (school school-a)" in out, out
    code, out = _audit(capsys, school.state / "ledger.jsonl", "--keys", keys)
    assert code == 2 and label in out, out


def test_policy_delta_the_entries_do_not_use_is_reported(tmp_path, capsys):
    schools, (server,) = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools, {"school-b": {"budget": 40.0, "delta": 1e-6}})
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 2 and "school-b" in out and "not the policy's" in out, out


# ----------------------------------------------------------------------------------- anchors
def test_server_anchors_each_school_across_runs(tmp_path):
    schools, servers = _federation(tmp_path, runs=2)
    anchor = json.loads((tmp_path / "runs" / "anchors" / "school-a.json").read_text())
    (chain,) = anchor["chains"].values()
    own = SchoolLedger(schools[0].state, "school-a", schools[0].key).entries
    assert chain["count"] == len(own) == 4 and chain["head"] == own[-1]["hash"]
    assert [r["run_id"] for r in chain["runs"]] == ["run-1", "run-2"]
    assert not any(e["event"].startswith("ledger-") for s in servers for e in s.events())


def test_wiped_school_is_rejected_and_the_audit_reports_it(tmp_path, capsys):
    from server.validation import RejectedUpdate

    schools, _ = _federation(tmp_path, runs=1)
    school = schools[0]
    school.wipe()
    server = Server(tmp_path, "run-2", schools)
    entries = school.train("run-2", 1)
    assert entries[0]["prev_hash"] == GENESIS_HASH and entries[0]["history_before"] == []
    with pytest.raises(RejectedUpdate, match="restarted at genesis"):
        server.receive(school, 1, entries)
    server.receive(schools[1], 1, schools[1].train("run-2", 1))   # the other school is unaffected
    (event,) = [e for e in server.events() if e["event"] == "ledger-anchor"]
    assert event["school"] == "school-a" and event["problem"] == "restarted-chain"
    assert "school-a" in server.strategy.exhausted   # not sent training again in this run
    assert not (server.run.path / "ledger" / "school-a.jsonl").exists()
    keys = _keyring(tmp_path, schools)
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 2 and "school school-a" in out and "restarted-chain" in out and "line 1" in out, out
    # the school's own (restarted) ledger, against the anchors
    code, out = _audit(capsys, school.state, "--keys", keys, "--anchors", tmp_path / "runs" / "anchors")
    assert code == 2 and "school-a" in out and "line 1: restarted chain" in out, out


def test_restarted_chain_in_a_run_copy_is_caught_by_the_audit(tmp_path, capsys):
    """A coordinator that skipped the anchor check stored a restarted chain: the audit still sees it."""
    from privacy.ledger import ServerLedgerCopy

    schools, (first,) = _federation(tmp_path, runs=1)
    school = schools[0]
    school.wipe()
    server = Server(tmp_path, "run-2", schools)
    ServerLedgerCopy.sync_verified(server.run.path, "school-a", school.train("run-2", 1), school.key.public_key())
    from privacy.anchors import anchors_dir_of_run, update_anchor

    update_anchor(anchors_dir_of_run(server.run.path), "school-a", school.key.public_key(),
                  SchoolLedger(school.state, "school-a", school.key).entries_for_run("run-2"))
    code, out = _audit(capsys, server.run.path, "--keys", _keyring(tmp_path, schools))
    assert code == 2 and "line 1: restarted chain" in out and "school-a" in out, out


def test_truncated_tail_is_rejected_by_the_server_and_caught_by_the_audit(tmp_path, capsys):
    from server.validation import RejectedUpdate

    schools, (first,) = _federation(tmp_path, runs=1, rounds=3)
    keys = _keyring(tmp_path, schools)
    # the run copy loses its last line: the anchor knows 3 entries of run-1
    copy = first.run.path / "ledger" / "school-b.jsonl"
    intact = copy.read_text()
    copy.write_text("".join(intact.splitlines(keepends=True)[:-1]))
    code, out = _audit(capsys, first.run.path, "--keys", keys)
    assert code == 2 and "truncated tail" in out and "school-b" in out and "line 3" in out, out
    copy.unlink()   # the whole copy gone
    code, out = _audit(capsys, first.run.path, "--keys", keys)
    assert code == 2 and "school-b.jsonl (school school-b): missing" in out, out
    copy.write_text(intact)
    code, out = _audit(capsys, first.run.path, "--keys", keys)
    assert code == 0, out
    # the school's state goes back to after round 1 (a restored backup): its next run is rejected
    school = schools[0]
    backup = tmp_path / "backup"
    shutil.copytree(school.state, backup)
    lines = (school.state / "ledger.jsonl").read_text().splitlines(keepends=True)
    (school.state / "ledger.jsonl").write_text("".join(lines[:1]))
    (school.state / "accountant.json").unlink(missing_ok=True)
    for path in school.state.glob("accountant*"):
        path.unlink()
    server = Server(tmp_path, "run-2", schools)
    # the school itself refuses: its marker beside the key records 3 entries signed (tests/test_lost_ledger.py) ...
    with pytest.raises(LedgerError, match="older than the school's spending"):
        school.train("run-2", 1)
    (school.state / LEDGER_MARKER).unlink()   # ... so the server's anchor is the check for a school without one
    with pytest.raises(RejectedUpdate, match="truncated-tail"):
        server.receive(school, 1, school.train("run-2", 1))
    code, out = _audit(capsys, school.state, "--keys", keys, "--anchors", tmp_path / "runs" / "anchors")
    assert code == 2 and "truncated tail" in out and "school-a" in out, out


def test_anchor_check_classifies_history_reset_and_gaps():
    from privacy.anchors import check_continues

    head, older = "a" * 64, "b" * 64
    chain = {"head": head, "count": 2, "histories": {"fp": [[SIGMA, Q, 16]]},
             "runs": [{"run_id": "run-1", "hashes": [older, head], "histories_after": {"fp": [[SIGMA, Q, 16]]}}]}

    def entry(prev, history):
        return {"prev_hash": prev, "dataset_fingerprint": "fp", "history_before": history}

    assert check_continues(chain, entry(head, [[SIGMA, Q, 16]])).problem == ""
    assert check_continues(chain, entry(head, [])).kind == "history-reset"
    assert check_continues(chain, entry(older, [[SIGMA, Q, 8]])).kind == "truncated-tail"
    assert check_continues(chain, entry(GENESIS_HASH, [])).kind == "restarted-chain"
    assert check_continues(chain, entry("c" * 64, [[SIGMA, Q, 8]])).kind == "history-reset"
    gap = check_continues(chain, entry("c" * 64, [[SIGMA, Q, 24]]))   # a reply the server never received
    assert gap.problem == "" and gap.kind == "gap" and gap.note
    assert check_continues(None, entry(GENESIS_HASH, [])).problem == ""


def test_trusting_a_simulated_run_also_trusts_its_school_policies(tmp_path, capsys):
    """A simulation has no keyring: with --trust-run-keys the audit reads each simulated school's
    policy from the run (<run>/schools/<school>/policy.json); without it, never."""
    schools, (server,) = _federation(tmp_path, runs=1)
    for school in schools:
        folder = server.run.path / "schools" / school.name
        folder.mkdir(parents=True)
        (folder / "policy.json").write_text(json.dumps({"unit": "student", "delta": DELTA, "budget": 0.5,
                                                        "max-round-epsilon": 0.5, "declared-students": 100}))
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    assert code == 1 and "OVER-BUDGET" in out, out
    keys = _keyring(tmp_path, schools)
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 0 and "no policy budget found" in out, out


@pytest.mark.usefixtures("serverapp_identity")
def test_the_entry_of_a_reply_rejected_for_its_weights_is_still_in_the_run_copy(tmp_path):
    """A school whose update is refused (here: its norm; e.g. a paper preset at a small batch) trained and
    spent all the same: the run's copy lacked its entry, so the summary showed 'ε —, after 0 round(s)' for
    schools that had spent ε 8."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from server.strategy import NodeInfo
    from shared_models.config import load_config
    from server.run_dir import RunDirectory
    from server.strategy import SchoolFedAvg

    school = School(tmp_path, "school-a")
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=r", "federation.max_update_norm=1"])
    run = RunDirectory.create(cfg)
    strategy = SchoolFedAvg(cfg, run)
    entries = school.train(run.run_id, 1)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(4, 10.0, dtype=np.float32))}),
                          "metrics": MetricRecord({"unit-weight": 1, "declared-units": 100, "epsilon": 0.5}),
                          "status": ConfigRecord({"status": "ok"}),
                          "ledger": ConfigRecord({"entry": json.dumps(entries[-1]), "run-entries": json.dumps(entries)})})
    request = Message(RecordDict({}), dst_node_id=101, message_type=MessageType.TRAIN)
    reply = Message(content, reply_to=request)
    node = NodeInfo("school", "school-a", public_key_pem(school.key), pinned=True)
    run.key_path("school-a").parent.mkdir(parents=True, exist_ok=True)
    run.key_path("school-a").write_text(public_key_pem(school.key))
    outcome = strategy._accept(reply, "school-a", node, 1, {"w": np.zeros(4, dtype=np.float32)})
    assert outcome["status"] == "rejected" and "max_update_norm" in outcome["reason"]
    copy = [json.loads(line) for line in run.ledger_path("school-a").read_text().splitlines()]
    assert [e["hash"] for e in copy] == [entries[-1]["hash"]]


def test_audit_of_runs_glob_takes_the_anchors_folder_as_anchors(tmp_path, capsys):
    """`fedfer privacy audit runs/*` also names runs/anchors: it is read as the anchors, not refused as a
    directory without a ledger (the whole audit used to stop there)."""
    _, servers = _federation(tmp_path)
    runs = tmp_path / "runs"
    code, out = _audit(capsys, *sorted(runs.iterdir()), "--trust-run-keys")
    assert code == 0 and "read as --anchors" in out and "no ledger/ directory" not in out, out
    code, out = _audit(capsys, runs / "anchors", "--trust-run-keys")
    assert code == 2 and "the coordinator's anchors, not a ledger" in out, out


def test_audit_of_runs_glob_notes_a_run_that_stored_no_reply_and_still_checks_it_against_the_anchors(tmp_path, capsys):
    """A run stopped before any school's reply was stored (killed in its first round, or while preparing) has a
    config.yaml but no ledger copies; `fedfer privacy audit runs/*` stopped the whole audit at it ('no ledger/
    directory'). Now it is a note; a run whose copies were deleted after the server anchored them is still a
    finding, and that run alone is still one line saying there is nothing to audit."""
    from server.run_dir import RunDirectory
    from shared_models.config import load_config

    _federation(tmp_path, runs=1)
    runs = tmp_path / "runs"
    stopped = RunDirectory.create(load_config(None, [f"run.root={runs}", "run.name=stopped"])).path
    code, out = _audit(capsys, *sorted(runs.iterdir()), "--trust-run-keys")
    assert code == 0 and f"{stopped}: no ledger copies" in out and "no ledger/ directory" not in out, out
    code, out = _audit(capsys, stopped, "--trust-run-keys")
    assert code == 2 and "a run directory with no ledger copies" in out and len(out.strip().splitlines()) == 1, out
    shutil.rmtree(runs / "run-1" / "ledger")   # copies the server anchored, deleted
    code, out = _audit(capsys, *sorted(runs.iterdir()), "--trust-run-keys")
    assert code == 2 and "school-a.jsonl (school school-a): missing, but the server anchored" in out, out


@pytest.mark.parametrize("budget, needle", [(1e300, "must be an ε of at most 1000"), (0, "must be a finite ε > 0"),
                                            (-2, "must be a finite ε > 0")])
def test_a_policy_budget_no_school_could_set_is_unreadable_not_compared(tmp_path, capsys, budget, needle):
    """A policy the school's own checks refuse (budget 1e300, 0, negative: privacy/policy.py's one rule) was
    compared with as a budget by the audit (1e300: every school "within budget"); now the row is unreadable,
    exit 2, naming the file and the key."""
    schools, (server,) = _federation(tmp_path, runs=1)
    for school in schools:
        folder = server.run.path / "schools" / school.name
        folder.mkdir(parents=True)
        (folder / "policy.json").write_text(json.dumps({"unit": "student", "delta": DELTA, "budget": budget,
                                                        "max-round-epsilon": 0.5, "declared-students": 100}))
    code, out = _audit(capsys, server.run.path, "--trust-run-keys")
    assert code == 2 and f"policy.json: policy key 'budget' {needle}" in out, out


def test_a_report_only_policy_in_a_deployed_schools_state_folder_is_not_read_as_its_training_policy(tmp_path, capsys):
    """A deployed school keeps its training policy in its node-config and may write a policy.json holding only
    the classroom report's keys into its state folder (docs/classroom.md). `privacy audit <state dir>
    --trust-run-keys` read that file as the school's privacy policy and said only "no policy budget found";
    now it says the file is the report's, not a training policy, and where the budget is."""
    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    (school.state / "policy.json").write_text(json.dumps({"report-min-students": 8}))
    code, out = _audit(capsys, school.state, "--trust-run-keys")
    assert code == 0 and "no budget to check" in out, out
    assert (f"school school-a: {school.state / 'policy.json'} holds only the classroom report's keys "
            f"(report-min-students, per-student-figures), not a training policy; a deployed school's budget is in "
            f"its node-config.toml") in out, out
    # a training policy in the same place (a simulated school's) is still the school's policy
    (school.state / "policy.json").write_text(json.dumps({"unit": "student", "delta": DELTA, "budget": 0.01,
                                                          "max-round-epsilon": 0.01, "declared-students": 100,
                                                          "report-min-students": 8}))
    code, out = _audit(capsys, school.state, "--trust-run-keys")
    assert code == 1 and "OVER-BUDGET" in out and "classroom report's keys" not in out, out


def test_a_report_only_policy_in_the_keyring_does_not_hide_the_schools_node_config(tmp_path, capsys):
    """The keyring's `<school>.policy.json` comes before the node-config `fedfer deploy` wrote (docs/deployment.md),
    but one holding only the classroom report's keys states no budget: it was taken as the school's policy, and the
    node-config's budget, δ and unit were never read ("no budget to check", exit 0, for a school over its budget).
    The search now goes on past it; with no node-config either, the note says where it looked."""
    schools, (server,) = _federation(tmp_path, runs=1)
    keys = _keyring(tmp_path, schools, {"school-a": {"report-min-students": 8}})
    node = keys.parent / "nodes" / "school-a"
    node.mkdir(parents=True)
    (node / "node-config.toml").write_text('role = "school"\nschool-id = "school-a"\nunit = "student"\n'
                                           f'delta = {DELTA}\nbudget = 0.01\nmax-round-epsilon = 0.01\n'
                                           'declared-students = 100\n')
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 1 and "school-a" in out and "exceeds budget 0.01" in out, out
    assert "classroom report's keys" not in out, out
    # the node-config's δ is the school's policy too: one the entries do not use is reported
    (node / "node-config.toml").write_text(f'role = "school"\nunit = "student"\ndelta = 1e-06\nbudget = 50.0\n')
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 2 and f"is not the policy's 1e-06 ({node / 'node-config.toml'})" in out, out
    # no node-config: the report-only file is named, and where the node-config was looked for
    shutil.rmtree(node)
    code, out = _audit(capsys, server.run.path, "--keys", keys)
    assert code == 0 and "audit: intact; no budget to check against" in out, out
    assert (f"school school-a: {keys / 'school-a.policy.json'} holds only the classroom report's keys "
            f"(report-min-students, per-student-figures), not a training policy; a deployed school's budget is in its "
            f"node-config.toml (none at {node / 'node-config.toml'} either") in out, out
