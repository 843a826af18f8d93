"""Faults in a real loopback deployment (TLS + node auth, 3 schools + evaluator, the fedfer apps):

- a school's SuperNode (and its executor) is killed while it trains: Flower's SuperLink answers for
  the dead node once its heartbeat lapses, the round aggregates the other schools, the run finishes;
- one school's SuperNode and executor are SIGKILLed twice: while it trains (run 1) and, in run 2's last
  round, right after it appended its ledger entry but before its reply reached the coordinator; the runs
  finish with the other schools, the school's ledger counts the unacknowledged round (the audit notes the
  run copy lacks it), and restarted it rejoins with its budget guard composing from the recorded ε (run 3);
- the coordinator (SuperLink, SuperExec, ServerApp) is killed after round 1: the SuperLink restarts
  from its database (registrations kept), the SuperNodes reconnect by themselves, and
  `run.resume=<run dir>` finishes the run with one metrics line per round and intact ledgers.

Slow (minutes each) but in the default suite; `pytest -m 'not slow'` skips them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.deploy.local import LocalFederation

from server.processes import Supervisor, _proc_stat, bin_path, flower_env

from deployment_fixtures import ROOT, SCHOOLS, dump_logs, make_deployment, run_config, start_all

pytestmark = pytest.mark.slow


def _start_run(fed: LocalFederation, home: Path, config: str, name: str = "flwr-run"):
    argv = [bin_path("flwr"), "run", str(ROOT), fed.dep.connection, "--stream", "-c", config]
    return fed.supervisor.start(name, argv, env=flower_env(home), cwd=ROOT)


def _wait_for(predicate, timeout: float, what: str, fed: LocalFederation, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    dump_logs(fed)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_school_killed_mid_round_does_not_stop_the_run(tmp_path, monkeypatch):
    dep, home, data, _ = make_deployment(tmp_path, monkeypatch)
    runs = tmp_path / "runs"
    victim = f"school-{SCHOOLS - 1:02d}"
    started: list[int] = []
    with LocalFederation(dep, tmp_path / "logs", home) as fed:
        try:
            start_all(fed, home)
            run = _start_run(fed, home, run_config(fed.dep, data, runs, **{"federation.round_timeout": 400}))
            node_log = fed.nodes[victim][0]
            _wait_for(lambda: "Receiving: train message" in node_log.log_text(1_000_000), 600,
                      f"{victim} to receive its first train message", fed)
            # Killed as soon as the train message is in: the school cannot have replied yet (its DP training
            # takes seconds); if it ever did, the assertion on round 1 below fails rather than passes.
            fed.kill_node(victim)
            assert run.popen.wait(timeout=900) == 0, run.log_text(4000)
            started = fed.supervisor.owned_pids()
            rounds = _metrics(runs / "e2e")
            assert [r["round"] for r in rounds] == [1, 2], run.log_text(4000)
            first = rounds[0]
            assert first["aggregated"] and first["train"][victim]["status"] != "ok", first["train"]
            for record in rounds:
                ok = sorted(s for s, o in record["train"].items() if o.get("status") == "ok")
                assert ok == [f"school-{i:02d}" for i in range(SCHOOLS - 1)], record["train"]
                assert record["aggregated"] and record["evaluated_by"].startswith("evaluator-node")
        except BaseException:
            dump_logs(fed)
            raise
    assert [p for p in started if _proc_stat(p) is not None] == []


def test_coordinator_killed_after_round_one_resumes(tmp_path, monkeypatch):
    dep, home, data, _ = make_deployment(tmp_path, monkeypatch)
    runs = tmp_path / "runs"
    run_dir = runs / "e2e"
    started: list[int] = []
    with LocalFederation(dep, tmp_path / "logs", home) as fed:
        try:
            start_all(fed, home)
            first = _start_run(fed, home, run_config(fed.dep, data, runs))
            # Round 1's checkpoint is written as soon as its model exists; its metrics line only when the
            # evaluation node's verdict comes back with round 2's training (pipelined evaluation). Wait for
            # latest.json, the pointer written after the weights: it is what commits a checkpoint (a kill
            # between the two leaves round-0001.pt uncommitted, and the resume would rightly start over).
            _wait_for(lambda: (run_dir / "checkpoints" / "latest.json").exists(), 900, "round 1's checkpoint", fed,
                      poll=0.05)
            # Crash the coordinator: SIGKILL the SuperLink and everything it started (SuperExec, ServerApp),
            # while round 1's model waits for its evaluation and round 2 is under way.
            fed.supervisor.stop(fed.superlink, grace=0, sig=signal.SIGKILL)
            fed.superlink = None
            try:   # the streaming CLI loses its SuperLink; it may give up or keep retrying
                first.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                fed.supervisor.stop(first)
            assert _metrics(run_dir) == []
            latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
            assert latest["round"] == 1 and latest["evaluated"] is False

            fed.start_superlink()   # same database: the nodes stay registered and reconnect by themselves
            from server.deploy import commands as deploy_cli

            _wait_for(lambda: all(row.get("flower") == "online"
                                  for row in deploy_cli.deployment_status(fed.dep.root, home)["nodes"]),
                      300, "every node to reconnect", fed)
            second = _start_run(fed, home, run_config(fed.dep, data, runs, **{"run.resume": str(run_dir)}),
                                name="flwr-resume")
            assert second.popen.wait(timeout=900) == 0, second.log_text(4000)
            started = fed.supervisor.owned_pids()
            rounds = _metrics(run_dir)
            assert [r["round"] for r in rounds] == [1, 2], second.log_text(4000)
            assert all(r["aggregated"] for r in rounds)
            # round 1's model was evaluated in the resumed run's first exchange, with round 2's training
            assert rounds[0]["evaluated_by"].startswith("evaluator-node-") and rounds[0]["evaluated_in_round"] == 2
            for i in range(SCHOOLS):
                school = f"school-{i:02d}"
                entries = [json.loads(line) for line in (run_dir / "ledger" / f"{school}.jsonl").read_text().splitlines()]
                assert [e["round"] for e in entries] == [1, 2]   # each round once: none lost, repeated or refused
            audit = subprocess.run([sys.executable, "-m", "fedfer", "privacy", "audit", str(run_dir), "--keys", str(fed.dep.keyring)],
                                   capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert audit.returncode == 0, audit.stdout + audit.stderr
        except BaseException:
            dump_logs(fed)
            raise
    assert [p for p in started if _proc_stat(p) is not None] == []


# ------------------------------------------------------------------ one school killed mid-round, twice
def _round_lock_held(state: Path) -> bool:
    """The school holds its round lock (policy check → DP training → ledger append), read from
    /proc/locks so the probe never takes the lock itself."""
    from simulations.crash_harness import locked_inodes

    try:
        return (state / "round.lock").stat().st_ino in locked_inodes()
    except OSError:
        return False


def _ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _spent_rounds(entries: list[dict], run_id: str) -> list[int]:
    return [e["round"] for e in entries if e.get("event") == "round" and e.get("run_id") == run_id]


def _checkpoint_round(run: Path) -> int:
    try:
        return json.loads((run / "checkpoints" / "latest.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def _node_pids(fed: LocalFederation, name: str, which: int) -> list[int]:
    """Every process of a node's SuperNode (which=0: launcher + Flower's SuperNode) or executor (1: + tasks)."""
    from server.processes import process_tree

    return process_tree(fed.nodes[name][which].pid)


def _restart_node(fed: LocalFederation, name: str) -> None:
    """Start a killed node again with its own start command; wait until the SuperLink accepted it (this start's
    part of its appended log has a 'SuperNode ID': `log_text` reads only what this start wrote). The launcher
    retries the SuperLink's refusal while the dead node's heartbeat has not lapsed (up to a minute)."""
    fed.start_node(name, wait=False, timeout=300)
    node = fed.nodes[name][0]
    _wait_for(lambda: "SuperNode ID" in node.log_text(10_000_000), 300, f"{name} to rejoin", fed)


def _audit(*paths: Path, keys: Path) -> tuple[int, dict]:
    audit = subprocess.run([sys.executable, "-m", "fedfer", "privacy", "audit", *map(str, paths), "--keys", str(keys),
                            "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    try:
        return audit.returncode, json.loads(audit.stdout)
    except ValueError:
        raise AssertionError(audit.stdout + audit.stderr) from None


def _train_status(run: Path, school: str) -> list[str]:
    return [r["train"].get(school, {}).get("status", "not asked") for r in _metrics(run)]


def _others_trained_every_round(run: Path, others: list[str]) -> None:
    for record in _metrics(run):   # the federation went on with the other schools
        ok = sorted(s for s, o in record["train"].items() if o.get("status") == "ok")
        assert set(others) <= set(ok) and record["aggregated"], record["train"]


def test_one_school_killed_while_training_and_after_its_ledger_entry(tmp_path, monkeypatch):
    """One deployed school's processes SIGKILLed mid-round, twice: in run 1 while it trains (nothing
    recorded, nothing released), and in the last round of run 2 right after it appended its ledger entry but
    before its reply reached the coordinator (its SuperNode is frozen while the task trains, so the reply
    cannot leave; then everything is killed). Each time the run finishes with the other schools; the
    school's own ledger verifies and counts the unacknowledged round; the audit reads the run copy's missing
    entry as a note, not tampering; restarted, the school rejoins (run 2, run 3) and its budget guard composes
    from the recorded ε (run 3, whose first reply continues an entry the server never got: `ledger-gap`)."""
    dep, home, data, _ = make_deployment(tmp_path, monkeypatch)
    runs = tmp_path / "runs"
    victim = f"school-{SCHOOLS - 1:02d}"
    others = [f"school-{i:02d}" for i in range(SCHOOLS - 1)]
    state = Path(dep.node(victim).node_config["state-dir"])
    own_ledger = state / "ledger.jsonl"
    # target ε 2 a run: three runs stay within every school's budget of 8
    settings = {"federation.rounds": 2, "privacy.target_epsilon": 2.0, "federation.round_timeout": 400}
    started: list[int] = []
    with LocalFederation(dep, tmp_path / "logs", home) as fed:
        def run(name: str, rounds: int) -> tuple[object, Path]:
            config = run_config(fed.dep, data, runs, **{**settings, "federation.rounds": rounds, "run.name": name})
            return _start_run(fed, home, config, name=f"flwr-{name}"), runs / name

        def finished(proc, run_dir: Path, rounds: int) -> None:
            assert proc.popen.wait(timeout=900) == 0, proc.log_text(4000)
            assert [r["round"] for r in _metrics(run_dir)] == list(range(1, rounds + 1)), proc.log_text(4000)
            _others_trained_every_round(run_dir, others)

        try:
            start_all(fed, home)

            # 1. run 1, round 1, during the school's local training: nothing recorded, nothing released
            first, first_dir = run("first", 2)
            _wait_for(lambda: _round_lock_held(state), 600, f"{victim} to train round 1", fed, poll=0.02)
            fed.kill_node(victim)
            finished(first, first_dir, 2)
            assert _train_status(first_dir, victim)[0] != "ok", _train_status(first_dir, victim)
            assert _spent_rounds(_ledger(own_ledger), "first") == [], "killed too late: it recorded run 1"

            # 2. restarted, it rejoins run 2; in run 2's last round it is killed after its ledger append,
            #    before its reply reaches the coordinator
            _restart_node(fed, victim)
            second, second_dir = run("second", 2)
            _wait_for(lambda: _checkpoint_round(second_dir) == 1 and _round_lock_held(state), 600,
                      f"{victim} to train run 2's round 2", fed, poll=0.02)
            Supervisor._signal(_node_pids(fed, victim, 0), signal.SIGSTOP)   # its reply cannot leave now
            _wait_for(lambda: 2 in _spent_rounds(_ledger(own_ledger), "second"), 300,
                      f"{victim}'s round-2 ledger entry", fed, poll=0.02)
            fed.kill_node(victim)
            finished(second, second_dir, 2)
            assert _train_status(second_dir, victim)[0] == "ok", _train_status(second_dir, victim)   # rejoined
            assert _train_status(second_dir, victim)[1] != "ok", _train_status(second_dir, victim)

            # the school's ledger counts the round the coordinator never acknowledged; the run copy lacks it
            school_entries = _ledger(own_ledger)
            assert _spent_rounds(school_entries, "second") == [1, 2]
            assert _spent_rounds(_ledger(second_dir / "ledger" / f"{victim}.jsonl"), "second") == [1]
            code, report = _audit(second_dir, own_ledger, keys=fed.dep.keyring)
            assert code == 0, report
            assert any(f"school {victim}:" in n and "replies the server never stored" in n for n in report["notes"]), \
                report["notes"]
            lifetime = {row["school"]: row for row in report["lifetime"]}
            assert lifetime[victim]["epsilon"] == pytest.approx(school_entries[-1]["epsilon"], rel=1e-6)

            # 3. restarted, it rejoins run 3; its budget guard composes the round the server never saw
            _restart_node(fed, victim)
            third, third_dir = run("third", 1)
            finished(third, third_dir, 1)
            started = fed.supervisor.owned_pids()
            assert _train_status(third_dir, victim) == ["ok"]
            entries = _ledger(own_ledger)
            rejoined = next(e for e in entries if e.get("run_id") == "third" and e.get("event") == "round")
            unacknowledged = next(e for e in entries if e.get("run_id") == "second" and e.get("round") == 2)
            assert rejoined["prev_hash"] == unacknowledged["hash"]
            assert rejoined["epsilon"] > unacknowledged["epsilon"]
            # the guard's history is every step the school's ledger recorded, the unacknowledged round's too
            recorded = [e for e in entries if e.get("event") == "round" and e is not rejoined]
            assert sum(h[2] for h in rejoined["history_before"]) == sum(e["steps"] for e in recorded)
            events = [json.loads(line) for line in (third_dir / "events.jsonl").read_text().splitlines()]
            assert any(e.get("event") == "ledger-gap" and e.get("school") == victim for e in events), events
            code, report = _audit(first_dir, second_dir, third_dir, own_ledger, keys=fed.dep.keyring)
            assert code == 0, report
            lifetime = {row["school"]: row for row in report["lifetime"]}
            assert lifetime[victim]["epsilon"] == pytest.approx(rejoined["epsilon"], rel=1e-6)
        except BaseException:
            dump_logs(fed)
            raise
    assert [p for p in started if _proc_stat(p) is not None] == []
