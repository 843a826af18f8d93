"""How long a school that dies just before a round stays "online", and what the coordinator does meanwhile.

    python scripts/measure_offline_after_kill.py OUT [ROUNDS] [kill|stop]

Builds the loopback deployment of the deployment tests (tests/deployment_fixtures.py: TLS + node auth, 3 schools
and the evaluation node on tiny synthetic data, in OUT/work), starts a run, and as soon as the coordinator has
validated school-02's round-1 reply (its ledger copy in the run directory) kills school-02's SuperNode and executor
(`kill`: SIGKILL, a crash; `stop`: SIGTERM to its processes, a service stop). It then reads the SuperLink's database
every 0.5 s until the node's `online_until` has passed, and prints (and writes to OUT/notes.json) one JSON line per
step: the kill, when the SuperLink counts the node offline, each round's metrics (train exchange, each school's
status) and events. Every process it starts is stopped at the end (docs/deployment.md §5)."""

import json
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))   # the deployment tests' fixtures
import pytest  # noqa: E402

from deployment_fixtures import ROOT, SCHOOLS, dump_logs, make_deployment, run_config, start_all  # noqa: E402
from server.deploy.layout import Deployment  # noqa: E402
from server.deploy.local import LocalFederation  # noqa: E402
from server.processes import bin_path, flower_env  # noqa: E402

OUT = Path(sys.argv[1])
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
MODE = sys.argv[3] if len(sys.argv) > 3 else "kill"   # kill: SIGKILL (a crash); stop: SIGTERM to every process of the
# node (a service manager stopping its whole group); term-launcher: SIGTERM to the launcher and executor only
tmp = OUT / "work"
tmp.mkdir(parents=True, exist_ok=True)
mp = pytest.MonkeyPatch()
T0 = time.monotonic()
notes = []


def note(what, **kv):
    rec = {"t": round(time.monotonic() - T0, 2), "wall": time.strftime("%H:%M:%S", time.gmtime()), "what": what, **kv}
    notes.append(rec)
    print(json.dumps(rec), flush=True)


def online(db: Path, node_id: int):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("select online_until, status from node where node_id = ?",
                          (node_id if node_id < 2**63 else node_id - 2**64,)).fetchone()
    finally:
        con.close()
    return row


dep, home, data, _ = make_deployment(tmp, mp)
runs = tmp / "runs"
victim = f"school-{SCHOOLS - 1:02d}"
with LocalFederation(dep, tmp / "logs", home) as fed:
    try:
        start_all(fed, home)
        dep = Deployment.load(dep.root)
        vid = int(dep.node(victim).node_id)
        db = dep.coordinator_dir / "superlink.db"
        note("nodes up", victim=victim, node_id=vid, row=online(db, vid))
        cfg = run_config(dep, data, runs, **{"federation.rounds": ROUNDS, "federation.round_timeout": 300})
        argv = [bin_path("flwr"), "run", str(ROOT), dep.connection, "--stream", "-c", cfg]
        run = fed.supervisor.start("flwr-run", argv, env=flower_env(home), cwd=ROOT)
        copy = runs / "e2e" / "ledger" / f"{victim}.jsonl"
        while not (copy.exists() and len(copy.read_text().splitlines()) >= 1):
            time.sleep(0.05)
            if run.popen.poll() is not None:
                raise SystemExit("run ended early")
        note("victim's round-1 reply validated by the coordinator")
        t_kill = time.monotonic()
        if MODE == "stop":
            fed.stop_node(victim)
        elif MODE == "term-launcher":   # SIGTERM to the SuperNode launcher and the executor only, as start.sh's trap
            import signal
            for proc in fed.nodes[victim]:
                proc.popen.send_signal(signal.SIGTERM)
            for proc in fed.nodes[victim]:
                proc.popen.wait(timeout=30)
        else:
            fed.kill_node(victim)
        note(f"victim {MODE}", row=online(db, vid), now=time.time(),
             signal_s=round(time.monotonic() - t_kill, 2))
        offline_at = None
        while run.popen.poll() is None:
            row = online(db, vid)
            if offline_at is None and row and (row[0] is None or row[0] <= time.time()):
                offline_at = time.monotonic()
                note("SuperLink: victim offline (online_until passed)", after_kill_s=round(offline_at - t_kill, 1),
                     row=row, now=time.time())
            time.sleep(0.5)
        note("run ended", exit=run.popen.returncode, after_kill_s=round(time.monotonic() - t_kill, 1))
        metrics = [json.loads(line) for line in (runs / "e2e" / "metrics.jsonl").read_text().splitlines()]
        for m in metrics:
            note("metrics", round=m["round"], round_seconds=m.get("round_seconds"), timing=m.get("timing"),
                 train={k: {kk: v.get(kk) for kk in ("status", "reason", "error")} for k, v in m.get("train", {}).items()})
        for line in (runs / "e2e" / "events.jsonl").read_text().splitlines():
            note("event", **json.loads(line))
        (OUT / "serverapp.log").write_text(run.log_text(400_000))
        (OUT / "superlink.log").write_text(fed.superlink.log_text(400_000) if fed.superlink else "")
    except BaseException:
        dump_logs(fed)
        raise
    finally:
        (OUT / "notes.json").write_text(json.dumps(notes, indent=1))
mp.undo()
