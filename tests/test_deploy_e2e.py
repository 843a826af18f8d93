"""A real deployment on loopback: TLS + authenticated SuperLink, three school SuperNodes and an
evaluation SuperNode (each with its warm executor), made with `fedfer deploy`, two rounds of the
fedfer apps through `flwr run . <connection> --stream`.

Checks: metrics for both rounds, evaluated by the evaluation node; every school's ledger (its own
and the server's copy, verified against the coordinator's keyring) and the privacy audit; an
unregistered school key is refused; a plaintext connection to the TLS SuperLink fails; every
process the test started is gone at the end (also when it fails: LocalFederation stops them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from server.deploy import credentials as cred
from server.deploy import commands as deploy_cli
from server.deploy.local import LocalFederation
from server.processes import _proc_stat, flower_env, run_flwr, supernode_argv

from deployment_fixtures import ROOT, SCHOOLS, dump_logs, make_deployment, run_config, start_all


def _wait_exit(proc, timeout: float) -> int | None:
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _phase(name: str, since: float) -> float:
    print(f"[deploy-e2e] {name}: {time.perf_counter() - since:.1f} s", flush=True)
    return time.perf_counter()


def test_deployment_two_rounds_with_tls_and_node_auth(tmp_path, monkeypatch):
    clock = time.perf_counter()
    dep, home, data, (spare_port,) = make_deployment(tmp_path, monkeypatch)
    started: list[int] = []
    clock = _phase("data + credentials", clock)

    with LocalFederation(dep, tmp_path / "logs", home) as fed:
        try:
            dep = start_all(fed, home)
            root = dep.root
            clock = _phase("SuperLink + 4 SuperNodes up", clock)
            status = deploy_cli.deployment_status(root, home)
            assert status["problems"] == []
            assert dep.node("school-00").auth_key and not (dep.node_dir("school-00") / "supernode").exists()
            assert {row["name"]: row.get("flower") for row in status["nodes"]} == {n: "online" for n in dep.nodes}

            # An unregistered school key is refused by the SuperLink.
            intruder = cred.create_node_key(tmp_path / "intruder", "supernode")
            argv = supernode_argv(superlink=dep.local_address, runtime_port=spare_port,
                                  node_config={"role": "school", "school-id": "intruder"}, root_certificates=dep.ca_cert,
                                  auth_key=intruder.private_path, isolation="process", poll=None)
            bad = fed.supervisor.start("intruder", argv, env=flower_env(tmp_path / "intruder" / "home"))
            assert _wait_exit(bad, 120) not in (None, 0), "an unregistered SuperNode kept running"
            assert "Failed to activate SuperNode" in bad.log_text(100_000), bad.log_text()

            # A plaintext SuperNode cannot talk to the TLS SuperLink.
            argv = supernode_argv(superlink=dep.local_address, runtime_port=spare_port, node_config={"role": "school"},
                                  root_certificates=None, auth_key=None, insecure=True, isolation="process",
                                  poll=None) + ["--max-retries", "1", "--max-wait-time", "10"]
            plain = fed.supervisor.start("plaintext", argv, env=flower_env(tmp_path / "plain" / "home"))
            assert _wait_exit(plain, 120) not in (None, 0), "a plaintext SuperNode kept running"
            assert "SuperNode ID" not in plain.log_text(100_000)

            clock = _phase("refusals checked", clock)

            # Two rounds of the real apps.
            runs = tmp_path / "runs"
            config = run_config(dep, data, runs)
            result = run_flwr(["run", str(ROOT), dep.connection, "--stream", "-c", config], flwr_home=home,
                              cwd=ROOT, timeout=600)
            started = fed.supervisor.owned_pids()
            clock = _phase("flwr run (2 rounds)", clock)
            log = result.stdout
            run = runs / "e2e"
            assert (run / "metrics.jsonl").exists(), log[-4000:]
            rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert [r["round"] for r in rounds] == [1, 2], log[-4000:]
            # each line once: Opacus's root logging handler used to print every Flower record a second time
            assert sum("[fedfer] round 1/2 |" in line for line in log.splitlines()) == 1, log[-4000:]
            for record in rounds:
                assert record["aggregated"], record
                assert sorted(s for s, o in record["train"].items() if o.get("status") == "ok") == \
                    [f"school-{i:02d}" for i in range(SCHOOLS)], record["train"]
                assert record["evaluated_by"].startswith("evaluator-node"), record["evaluated_by"]
                assert 0.0 <= record["evaluation"]["synthetic-fer2013"]["accuracy"] <= 1.0

            for i in range(SCHOOLS):
                school = f"school-{i:02d}"
                copy = [json.loads(line) for line in (run / "ledger" / f"{school}.jsonl").read_text().splitlines()]
                assert [e["round"] for e in copy] == [1, 2]
                assert 0 < copy[0]["epsilon"] < copy[1]["epsilon"]
                own = Path(dep.node(school).node_config["state-dir"])   # school-00's is outside deploy/
                assert any(own.rglob("*.jsonl")), f"{school} kept no ledger of its own in {own}"
                assert (run / "keys" / f"{school}.pub").read_text() == (dep.keyring / f"{school}.pub").read_text()
            audit = subprocess.run([sys.executable, "-m", "fedfer", "privacy", "audit", str(run), "--keys", str(dep.keyring)],
                                   capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert audit.returncode == 0, audit.stdout + audit.stderr
        except BaseException:
            dump_logs(fed)
            raise
    left = [pid for pid in started if _proc_stat(pid) is not None]
    assert left == [], f"processes left running: {left}"
