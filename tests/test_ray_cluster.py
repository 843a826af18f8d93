"""`fedfer simulate --ray-address` on a real two-node Ray cluster started by the test.

The cluster is a head (`ray start --head`, 1 CPU) and a second node (`ray start --address`, 1 CPU, its
own temp dir and a custom resource `node2`), both inside a network namespace that has only its loopback
interface, so every Ray port stays on 127.0.0.1 of that namespace (Ray otherwise rewrites a loopback
head address to the machine's own IP and listens on all interfaces). `fedfer simulate` runs there too,
with three tiny schools and the evaluation node, one round, DP on (the default `dp` preset).

Checks: the run completes with every school's update aggregated; the ServerApp reports
it ran on that cluster; Ray's own task records (read from the cluster's GCS: node ids are public, and
nothing a school replies is involved) show Flower's ClientApp actors running messages on *both* nodes,
and each node's own worker logs show a school's DP round trained there (so each read the school data);
every process the test started — both Ray nodes, their workers, the SuperLink, the simulation — is
gone afterwards, also when the test fails (the namespace's processes are killed by PID, then the
namespace is deleted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from server.processes import Supervisor

from netns_fixtures import Namespaces, netns_unavailable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_PORT = 6379          # inside the test's own namespace: nothing else listens there
# Ray's memory monitor kills workers when the *machine's* memory passes 95 %, whoever uses it; on a
# shared machine that is other jobs' doing, so it is off here (the kernel's OOM killer still applies).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_memory_monitor_refresh_ms": "0"}
TINY = [
    "federation.schools=3", "federation.rounds=1", "federation.min_train_schools=3",
    "data.students_per_school=6", "data.frames_per_student=4", "data.public_students=6", "data.image_size=32",
    "data.public_train_students=0", "data.heldout_students=0",
    "train.local_epochs=1", "train.batch_size=3", "evaluation.bootstrap=20",
    "evaluation.benchmarks=synthetic-fer2013",
    "model.pretrain=", "data.school_size_spread=30",   # from scratch, sizes as before: no pre-training in a test
]

# Run inside the namespace after the federation: every node of the cluster, and the node each of
# Flower's `ClientAppActor.run` tasks (one per message a simulated node handled) executed on, from the
# task events the cluster's GCS keeps (Ray's public state API needs the dashboard, which is off).
TASK_NODES = """
import json, ray
from ray._private.state import state
from ray.core.generated import gcs_pb2
ray.init(address="127.0.0.1:%d", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k == "node2") for n in ray.nodes() if n["Alive"]}
runs = {}
for raw in state._connect_and_get_accessor().get_task_events():
    event = gcs_pb2.TaskEvents.FromString(raw)
    node = event.state_updates.node_id.hex()
    if event.task_info.name == "ClientAppActor.run" and node:
        runs[node] = runs.get(node, 0) + 1
print("TASK-NODES " + json.dumps({"nodes": nodes, "runs": runs}))
""" % HEAD_PORT


@pytest.fixture
def ray_cluster(tmp_path):
    """Two Ray nodes in a loopback-only namespace; yields (namespace, head address, each node's temp dir).
    Stops them all, also when the test fails."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"two-node Ray cluster test needs a network namespace of its own: {reason}")
    # Ray's socket paths must fit in 107 bytes, so its temp dirs are short and outside tmp_path.
    temp = Path(tempfile.mkdtemp(prefix="ffray", dir="/tmp"))
    sup = Supervisor(tmp_path / "ray-logs")
    nets = Namespaces()
    try:
        ns = nets.add("ray")
        common = ["--num-cpus", "1", "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
                  "--block"]
        head = sup.start("ray-head", nets.argv(ns, [RAY, "start", "--head", "--port", str(HEAD_PORT),
                                                    "--temp-dir", str(temp / "h"), "--include-dashboard=false",
                                                    *common]), env=RAY_ENV)
        second = sup.start("ray-node2", nets.argv(ns, [RAY, "start", "--address", f"127.0.0.1:{HEAD_PORT}",
                                                       "--temp-dir", str(temp / "w"),
                                                       "--resources", json.dumps({"node2": 1}), *common]),
                           env=RAY_ENV)
        sup.wait_log(head, "Ray runtime started", timeout=180)   # the second node waits for the head by itself
        sup.wait_log(second, "Ray runtime started", timeout=180)
        yield ns, f"127.0.0.1:{HEAD_PORT}", {"head": temp / "h", "node2": temp / "w"}
    finally:
        sup.stop_all()
        left = nets.close()
        shutil.rmtree(temp, ignore_errors=True)
    assert left == [], f"processes still running in the test's namespace after stopping the Ray nodes: {left}"


def _in_namespace(ns: str, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.run(Namespaces.argv(ns, argv), capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def test_simulation_runs_schools_on_both_nodes_of_a_ray_cluster(ray_cluster, tmp_path):
    ns, address, temp_dirs = ray_cluster
    work = tmp_path / "work"
    work.mkdir()
    run = work / "runs" / "ray"
    sim = _in_namespace(ns, [sys.executable, "-m", "fedfer", "simulate", "--ray-address", address, *TINY,
                             "run.name=ray", f"run.root={work / 'runs'}", f"data.root={work / 'data'}"],
                        cwd=work, timeout=600)
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    assert f"simulated schools run on the Ray cluster at {address}" in sim.stdout, sim.stdout[-3000:]

    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1]
    for record in rounds:
        assert record["aggregated"], record
        assert sorted(s for s, o in record["train"].items() if o.get("status") == "ok") == \
            ["school-00", "school-01", "school-02"], record["train"]
    assert "ray_address: 127.0.0.1:6379" in (run / "config.yaml").read_text()

    probe = _in_namespace(ns, [sys.executable, "-c", TASK_NODES], cwd=work, timeout=120)
    line = next((ln for ln in probe.stdout.splitlines() if ln.startswith("TASK-NODES ")), None)
    assert line, probe.stdout[-2000:] + probe.stderr[-2000:]
    found = json.loads(line.split(" ", 1)[1])
    assert len(found["nodes"]) == 2, found
    second = next(node for node, marks in found["nodes"].items() if marks == ["node2"])
    head = next(node for node in found["nodes"] if node != second)
    assert found["runs"].get(head, 0) > 0 and found["runs"].get(second, 0) > 0, found
    # every message the federation sent was handled by an actor on one of the two nodes
    assert set(found["runs"]) <= set(found["nodes"]), found
    # Each node's own worker logs (under its own temp dir) show a school's DP round trained there, so
    # both read the school data from data.root: three train messages go out at once to the two actors.
    for node, temp in temp_dirs.items():
        trained = [line for path in temp.rglob("worker-*") for line in _lines(path)
                   if "[fedfer client] school-" in line and "DP steps" in line]
        logs = sorted(path.name for path in temp.rglob("worker-*"))
        assert trained, f"no school trained on {node} (its worker logs: {logs[:6]})"


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []
