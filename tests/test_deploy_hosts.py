"""A deployment across "hosts": the coordinator and two schools each in a network namespace of their
own, joined by a bridge in a private test subnet that exists only inside those namespaces.

    coordinator  10.231.0.1/24 (bridge br0)   SuperLink bound to 10.231.0.1 only, TLS + node auth
    school-00    10.231.0.11/24 (veth)        SuperNode + warm executor, dials 10.231.0.1
    school-01    10.231.0.12/24 (veth)        SuperNode + warm executor, dials 10.231.0.1

Made with `fedfer deploy` (`init --coordinator 10.231.0.1 --bind 10.231.0.1`, `add-school`, `register`)
and started with the commands its start scripts run, so the certificate's SANs, the binding and the
node authentication of docs/deployment.md are exercised as across machines: each SuperNode verifies
the SuperLink's certificate for the address it dials, the SuperLink is reachable on that address and
nowhere else (not on the coordinator's loopback), and a round of
the real apps completes. Every process runs inside a namespace; the finalizer kills what is left in
them by PID and deletes them, also when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.deploy.layout import Deployment, node_commands, superlink_command
from server.processes import Supervisor, bin_path, flower_env

from deployment_fixtures import ROOT, _synthetic_data, run_config
from netns_fixtures import Namespaces, netns_unavailable

pytestmark = pytest.mark.slow

SUBNET = "10.231.0"
COORDINATOR = f"{SUBNET}.1"
PORT = 9093
SCHOOLS = ("school-00", "school-01")


@pytest.fixture
def hosts(tmp_path, monkeypatch):
    """Three namespaces on one bridge; yields (namespaces, coordinator ns, {school: ns}, supervisor)."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"multi-host deployment test needs network namespaces: {reason}")
    for key, value in {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
                       "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_HOME": str(tmp_path / "cli_home")}.items():
        monkeypatch.setenv(key, value)
    sup = Supervisor(tmp_path / "logs")
    nets = Namespaces()
    try:
        coord = nets.add("c")
        nets.bridge(coord, f"{COORDINATOR}/24")
        schools = {}
        for i, school in enumerate(SCHOOLS):
            schools[school] = nets.add(f"s{i}")
            nets.attach(coord, schools[school], f"{SUBNET}.{11 + i}/24")
        yield nets, coord, schools, sup
    finally:
        sup.stop_all()
        left = nets.close()
    assert left == [], f"processes still running in the test's namespaces after stopping them: {left}"


def _dump(sup: Supervisor) -> str:
    return "\n".join(f"----- {p.name} (exit {p.popen.poll()})\n{p.log_text(2500)}" for p in sup.processes)


def _connect_from(ns: str, host: str, port: int) -> bool:
    """Whether a TCP connection from inside namespace `ns` to host:port succeeds."""
    probe = ("import socket,sys\ns=socket.socket(); s.settimeout(3)\n"
             f"sys.exit(0 if s.connect_ex(({host!r}, {port})) == 0 else 1)")
    return subprocess.run(Namespaces.argv(ns, [sys.executable, "-c", probe]), timeout=30).returncode == 0


def _on(nets: Namespaces, ns: str, argv: list[str]) -> str:
    """A command run on the machine (namespace) `ns`; its output, after checking it succeeded."""
    result = subprocess.run(nets.argv(ns, argv), capture_output=True, text=True, cwd=ROOT, timeout=180,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stdout}{result.stderr}"
    return result.stdout


# Both schools added on the coordinator in one process (`fedfer deploy add-school` imports torch each
# time): the SuperLink is up, so each node key is registered at once, as docs/deployment.md says.
ADD_SCHOOLS = """
import sys
from pathlib import Path
from server.deploy import commands as deploy_cli
root, home, data = map(Path, sys.argv[1:4])
for school in sys.argv[4:]:
    print(deploy_cli.add_node(root, school, "school", data_dir=data / "schools" / school, flwr_home=home)[1])
"""


def _coordinator_up(nets: Namespaces, coord: str, sup: Supervisor, tmp_path: Path) -> Deployment:
    """`fedfer deploy init` on the coordinator, its SuperLink started there, both schools added and
    registered. Everything that dials the SuperLink runs inside the namespaces: nothing in this
    machine's own network namespace ever sends a packet to the test subnet."""
    home, data, root = tmp_path / "cli_home", tmp_path / "data", tmp_path / "deploy"
    _on(nets, coord, [sys.executable, "-m", "fedfer", "deploy", "init", "--coordinator", COORDINATOR,
                      "--bind", COORDINATOR, "--port", str(PORT), "--dir", str(root), "--flwr-home", str(home)])
    dep = Deployment.load(root)
    assert COORDINATOR in dep.sans and dep.local_address == f"{COORDINATOR}:{PORT}"
    link = sup.start("superlink", nets.argv(coord, superlink_command(dep)),
                     env=flower_env(dep.coordinator_dir / "flwr_home"), cwd=dep.coordinator_dir)
    _synthetic_data(data, schools=len(SCHOOLS))     # while the SuperLink starts
    sup.wait_log(link, f"https://{COORDINATOR}:{PORT}", timeout=120)
    out = _on(nets, coord, [sys.executable, "-c", ADD_SCHOOLS, str(root), str(home), str(data), *SCHOOLS])
    assert out.count("registered with the SuperLink as node") == len(SCHOOLS), out
    return Deployment.load(root)


def _schools_up(nets: Namespaces, schools: dict[str, str], sup: Supervisor, dep: Deployment) -> None:
    """Each school's SuperNode and warm executor (the commands of its start.sh) on its own host,
    dialling the coordinator's subnet address; waits until the SuperLink accepted both."""
    for school, ns in schools.items():
        env = flower_env(dep.node_dir(school) / "flwr_home")
        for index, argv in enumerate(node_commands(dep, school, None, dep.superlink_address)):
            sup.start(f"{school}-{'supernode' if index == 0 else 'executor'}", nets.argv(ns, argv), env=env,
                      cwd=dep.node_dir(school))
    for school in SCHOOLS:
        sup.wait_log(next(p for p in sup.processes if p.name == f"{school}-supernode"), "SuperNode ID", 180)


def test_deployment_across_network_namespaces(hosts, tmp_path):
    nets, coord, schools, sup = hosts
    try:
        dep = _coordinator_up(nets, coord, sup, tmp_path)
        assert {dep.nodes[s].status for s in SCHOOLS} == {"registered"}
        _schools_up(nets, schools, sup, dep)
        # Bound to the subnet address only: a school reaches it, the coordinator's own loopback does not.
        assert _connect_from(schools["school-00"], COORDINATOR, PORT)
        assert not _connect_from(coord, "127.0.0.1", PORT)

        runs = tmp_path / "runs"
        config = run_config(dep, tmp_path / "data", runs, **{"federation.rounds": 1, "federation.evaluator": False})
        flwr = sup.start("flwr-run", nets.argv(coord, [bin_path("flwr"), "run", str(ROOT), dep.connection,
                                                       "--stream", "-c", config]),
                         env=flower_env(tmp_path / "cli_home"), cwd=ROOT)
        assert flwr.popen.wait(timeout=600) == 0, flwr.log_text(6000)
        run = runs / "e2e"
        assert (run / "metrics.jsonl").exists(), flwr.log_text(6000)
        rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1], flwr.log_text(6000)
        assert rounds[0]["aggregated"], rounds[0]
        assert sorted(s for s, o in rounds[0]["train"].items() if o.get("status") == "ok") == list(SCHOOLS)
        for school in SCHOOLS:   # the server's ledger copy, verified against the keyring at enrollment
            copy = [json.loads(line) for line in (run / "ledger" / f"{school}.jsonl").read_text().splitlines()]
            assert [e["round"] for e in copy] == [1] and copy[0]["epsilon"] > 0
            assert (run / "keys" / f"{school}.pub").read_text() == (dep.keyring / f"{school}.pub").read_text()
    except BaseException:
        print(_dump(sup))
        raise
