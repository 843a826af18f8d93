"""What an IT admin sees when a node (or the coordinator) cannot start: one line naming the file, key or
path, a non-zero exit, no traceback and no two-minute retry; `[code: 2004]` blamed only when Flower said it.
And the deployment folder never travels in the app package `flwr run .` builds.

No SuperLink is started here: the deployments are real (`fedfer deploy init` / `add-school`), the
SuperNode's failures are Flower's own messages replayed by a stand-in child process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path

import pytest

from server.deploy import commands as deploy_cli
from server.deploy.layout import Deployment, node_commands, node_script
from server.processes import free_ports
from test_deploy import FakeClock   # monotonic() moves only when the code under test sleeps

REPO = Path(__file__).resolve().parents[1]

ROOT = Path(__file__).resolve().parent.parent
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A TLS deployment made with `fedfer deploy` (SuperLink not running): one school, one evaluator."""
    tmp = tmp_path_factory.mktemp("start")
    (tmp / "data").mkdir()
    (tmp / "bench.csv").write_text("emotion,pixels,Usage\n")
    deploy_cli.init_deployment(tmp / "deploy", "127.0.0.1", bind="127.0.0.1", port=19593, flwr_home=tmp / "home")
    school_port, evaluator_port = free_ports(2)   # the default 9101, 9102 may be a running node's on this machine
    deploy_cli.add_node(tmp / "deploy", "lincoln", "school", data_dir=tmp / "data", declared=1200,
                        runtime_port=school_port)
    deploy_cli.add_node(tmp / "deploy", "evaluator", "evaluator", benchmarks=[f"fer2013={tmp / 'bench.csv'}"],
                        runtime_port=evaluator_port)
    return Deployment.load(tmp / "deploy")


@pytest.fixture()
def school(deployment):
    """The school's node folder, restored after the test broke it."""
    folder = deployment.node_dir("lincoln")
    backup = folder.parent / "lincoln.backup"
    shutil.copytree(folder, backup, symlinks=True)
    yield folder
    shutil.rmtree(folder)
    backup.rename(folder)


def flower_args(dep: Deployment, name: str) -> list[str]:
    argv = node_commands(dep, name)[0]
    return argv[argv.index("--") + 1:]


def preflight(dep: Deployment, name: str, capsys) -> tuple[int, list[str]]:
    from client.runtime.preflight import main

    code = main(["--", *flower_args(dep, name)])
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, [line for line in captured.err.splitlines() if line.strip()]


def set_key(path: Path, key: str, line: str | None) -> None:
    """Replace (None: drop) the `key = …` line of a node-config.toml."""
    lines = [line if text.split("=")[0].strip() == key else text for text in path.read_text().splitlines()]
    path.write_text("\n".join(text for text in lines if text is not None) + "\n")


# ------------------------------------------------------------------------------------ node-config
BAD_CONFIGS = [
    ("budget", 'budget = "eight"', "node-config.toml: key 'budget' must be a number, got 'eight'"),
    ("budget", "budgte = 8.0", "node-config.toml: unknown key 'budgte' for a school node (did you mean 'budget'?"),
    ("budget", None, "node-config.toml: key 'budget' is required"),
    ("delta", "delta = 0.5", "node-config.toml: key 'delta' must be < 1/declared-students"),
    ("unit", 'unit = "class"', "node-config.toml: key 'unit' must be one of"),
    ("role", 'role = "teacher"', "node-config.toml: key 'role' must be 'school' or 'evaluator'"),
    ("school-id", 'school-id = ""', "node-config.toml: key 'school-id' is required"),
    ("budget", "budget = ", "node-config.toml: invalid TOML: Invalid value (at line "),
    ("budget", "budget = 8.0\nbudget = 9.0", "node-config.toml: invalid TOML: Cannot overwrite a value (at line "),
]


@pytest.mark.parametrize("key, line, needle", BAD_CONFIGS, ids=[c[2].split(": ", 1)[1][:40] for c in BAD_CONFIGS])
def test_a_bad_node_config_stops_the_node_at_start_naming_file_and_key(deployment, school, capsys, key, line, needle):
    set_key(school / "node-config.toml", key, line)
    code, lines = preflight(deployment, "lincoln", capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"fedfer: {school / 'node-config.toml'}: ") and needle in lines[0], lines[0]


def test_the_toml_error_names_the_line(deployment, school, capsys):
    text = (school / "node-config.toml").read_text().splitlines()
    number = next(i for i, t in enumerate(text, 1) if t.startswith("budget"))
    set_key(school / "node-config.toml", "budget", 'budget = "8')
    _, lines = preflight(deployment, "lincoln", capsys)
    assert f"(at line {number}, column" in lines[0], lines


@pytest.mark.parametrize("name, needle", [
    ("ca.crt", "ca.crt: missing (the federation's CA certificate"),
    ("supernode", "supernode: missing (the node's authentication key)"),
    ("superexec.secret", "superexec.secret: missing (the secret"),
    ("node-config.toml", "node-config.toml: missing (the node-config)"),
    ("state/signing_key.pem", "signing_key.pem: missing (the school's ledger signing key"),
])
def test_a_missing_file_is_named_by_its_path(deployment, school, capsys, name, needle):
    (school / name).unlink()
    code, lines = preflight(deployment, "lincoln", capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"fedfer: {school / name}: {needle.split(': ', 1)[1]}"), lines[0]


def test_a_missing_signing_key_beside_a_ledger_points_to_key_recovery(deployment, school, capsys):
    (school / "state" / "ledger.jsonl").write_text("{}\n")   # entries signed with the key (content not read here)
    (school / "state" / "signing_key.pem").unlink()
    code, lines = preflight(deployment, "lincoln", capsys)
    assert code == 2 and len(lines) == 1 and lines[0].endswith(
        f"`fedfer deploy school-key --state-dir {school / 'state'} --recover-ledger-key`"), lines


@pytest.mark.parametrize("name, content, needle", [
    ("ca.crt", b"", "ca.crt: empty"),
    ("ca.crt", b"not a certificate\n", "ca.crt: not a PEM certificate"),
    ("supernode", b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
     "supernode: not an unencrypted OpenSSH private key"),
])
def test_an_unusable_certificate_or_key_is_named(deployment, school, capsys, name, content, needle):
    (school / name).write_bytes(content)
    code, lines = preflight(deployment, "lincoln", capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_a_node_key_others_can_read_stops_the_node(deployment, school, capsys):
    """Whoever reads the node's key can connect as the school; flower-supernode starts with it all the same (seen
    with a school's own key at 0644: the node started and connected)."""
    os.chmod(school / "supernode", 0o644)   # as a copy to the school's machine without -p can leave it
    _, lines = preflight(deployment, "lincoln", capsys)
    assert lines == [f"fedfer: {school / 'supernode'}: permissions 0o644 let others read the node's authentication key; "
                     "chmod 600 it"]


def test_folders_the_node_config_names_must_exist(deployment, school, capsys, tmp_path):
    set_key(school / "node-config.toml", "data-dir", f'data-dir = "{tmp_path / "nowhere"}"')
    _, lines = preflight(deployment, "lincoln", capsys)
    assert lines == [f"fedfer: {school / 'node-config.toml'}: key 'data-dir': {tmp_path / 'nowhere'}: no such directory"]
    set_key(school / "node-config.toml", "data-dir", 'data-dir = "~/fer"')
    _, lines = preflight(deployment, "lincoln", capsys)
    assert "'~' is not expanded" in lines[0]
    shutil.copy(school / "state" / "signing_key.pem", tmp_path / "key.pem")
    os.chmod(school / "state" / "signing_key.pem", 0o644)   # as a copy without -p leaves it
    set_key(school / "node-config.toml", "data-dir", f'data-dir = "{deployment.root.parent / "data"}"')
    _, lines = preflight(deployment, "lincoln", capsys)
    assert lines == [f"fedfer: {school / 'state' / 'signing_key.pem'}: permissions 0o644 let others read the signing "
                     "key; chmod 600 it"]


def test_a_good_node_starts_its_checks_silently(deployment, capsys):
    assert preflight(deployment, "lincoln", capsys) == (0, [])
    assert preflight(deployment, "evaluator", capsys) == (0, [])


@pytest.mark.parametrize("name", ["lincoln", "evaluator"])
def test_a_runtime_port_in_use_is_named(deployment, capsys, name):
    """Flower's own error was a traceback ending in "SuperNode Runtime HTTP API failed to start."."""
    import socket

    port = deployment.node(name).runtime_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        code, lines = preflight(deployment, name, capsys)
    assert code == 2 and lines == [f"fedfer: 127.0.0.1:{port}, this node's local Runtime API port, is in use by "
                                   "another process (another node on this machine, or this node started twice): "
                                   "stop it, or give the node another port (`fedfer deploy add-school … "
                                   "--runtime-port`)"], lines
    assert preflight(deployment, name, capsys) == (0, [])   # free again


def test_the_evaluators_benchmark_files_are_checked(deployment, capsys):
    config = deployment.node_dir("evaluator") / "node-config.toml"
    before = config.read_text()
    try:
        set_key(config, "benchmarks", 'benchmarks = "fer2013=/nonexistent/fer2013.csv"')
        code, lines = preflight(deployment, "evaluator", capsys)
        assert code == 2 and lines == [f"fedfer: {config}: key 'benchmarks': /nonexistent/fer2013.csv: not found "
                                       "(benchmark fer2013)"]
    finally:
        config.write_text(before)


def test_the_clientapp_reads_the_node_config_with_the_same_checks():
    """The ClientApp's own reading (client/node.py `identify`) and the start check give the same verdict."""
    from client.node import NodeConfigError, identify, read_deployed
    from shared_models.config import load_config

    config = {"role": "school", "school-id": "a", "data-dir": "/d", "state-dir": "/s", "unit": "student",
              "delta": 1e-5, "budget": "eight", "max-round-epsilon": 8.0, "declared-students": 1200}
    with pytest.raises(NodeConfigError, match="^node-config: key 'budget' must be a number"):
        identify(config, load_config(None, []))
    with pytest.raises(NodeConfigError, match="^/x/node-config.toml: key 'budget' must be a number"):
        read_deployed(config, "/x/node-config.toml")
    with pytest.raises(NodeConfigError, match="key 'role' is required"):
        read_deployed({"school-id": "a"}, "/x/node-config.toml")


# ------------------------------------------------------------------------------------ the start path
def run(argv: list[str], cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """Run a start command in its own session; whatever it started is killed if it does not exit in time
    (a check that let the node start would leave a SuperNode and an executor running)."""
    env = {**os.environ, **FLWR_ENV, "PYTHONPATH": str(ROOT), "FEDFER_PYTHON": sys.executable}
    started = time.monotonic()
    with subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, err = popen.communicate()
        finally:
            try:   # background children of a script that exited
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(argv, popen.returncode, out, err), time.monotonic() - started


def test_start_sh_with_a_bad_value_exits_with_one_line_and_starts_nothing(deployment, school):
    """The school's own start script: the check runs before the SuperNode or the executor starts (before,
    the node started and connected, and the ClientApp failed at the next run)."""
    set_key(school / "node-config.toml", "budget", 'budget = "eight"')
    proc, took = run(["bash", str(school / "start.sh")], cwd=school, timeout=30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"fedfer: {school / 'node-config.toml'}: key 'budget' must be a number, "
                                        "got 'eight'"], proc.stderr[-2000:]
    assert proc.stdout == "" and took < 30


def test_the_launcher_checks_before_supervising_and_does_not_retry(deployment, school):
    """`python -m client.runtime.supernode` (what `fedfer deploy up` and the tests start): invalid TOML was a
    tomli traceback, ten times over 120 s, blamed on an unregistered key."""
    set_key(school / "node-config.toml", "budget", "budget = ")
    argv = node_commands(deployment, "lincoln")[0]
    proc, took = run(argv, cwd=school, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedfer: {school / 'node-config.toml'}: invalid TOML: "), lines
    assert "Traceback" not in proc.stderr and "2004" not in proc.stderr and took < 30


def test_every_start_script_checks_first(deployment):
    """Also the plain `flower-supernode` script (`--executor flower`): the check is its first command."""
    flat = node_script(deployment, "lincoln").replace(" \\\n    ", " ")
    assert flat.index('"$PYTHON" -m client.runtime.preflight -- --superlink') < flat.index("client.runtime.supernode")
    assert '-m client.runtime.supernode --checked' in flat
    deployment.executor = "flower"
    try:
        flat = node_script(deployment, "lincoln").replace(" \\\n    ", " ")
    finally:
        deployment.executor = "warm"
    assert flat.index('"$PYTHON" -m client.runtime.preflight -- --superlink') < flat.index("exec flower-supernode")
    assert '--node-config "$HERE/node-config.toml" --root-certificates "$HERE/ca.crt"' in flat


# ------------------------------------------------------------------------------------ the supervisor
def child(tmp_path: Path, stderr: str, code: int = 1) -> list[str]:
    """A stand-in SuperNode: counts its starts, writes `stderr` (Flower's words) and exits `code`."""
    script = tmp_path / "child.py"
    script.write_text(f"import pathlib, sys\np = pathlib.Path({str(tmp_path / 'starts')!r})\n"
                      "p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
                      f"sys.stderr.write({stderr!r})\nsys.exit({code})\n")
    return [sys.executable, str(script), "--auth-supernode-private-key", "/site/lincoln/supernode"]


FLOWER_2004 = ("ERROR 2026-12-04 15:08:25,019:     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
               "[code: 2004] Failed to activate SuperNode.\nThe SuperNode could not establish a connection to the "
               "SuperLink.\n\nFor more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/"
               "305.html>\nINFO:     Shutting down\nINFO:     Finished server process [21490]\n")


@pytest.mark.parametrize("stderr, reason", [
    ("INFO 2026-12-04 15:07:52,590:      Starting Flower SuperNode\nERROR 2026-12-04 15:07:52,596:     Path "
     "argument `--root-certificates` does not point to a file.\n",
     "Path argument `--root-certificates` does not point to a file."),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nFileNotFoundError: [Errno 2] No such "
     "file or directory: '/site/lincoln/supernode'\n",
     "FileNotFoundError: [Errno 2] No such file or directory: '/site/lincoln/supernode'"),
    ("\x1b[91mERROR \x1b[0m:     Exit Code: 302\nUnable to parse the private key file.\nNode authentication requires "
     "elliptic curve private key. Please ensure that the file path points to a valid private key file and try "
     "again.\n\nFor more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/302.html>\n",
     "Flower exit code 302: Unable to parse the private key file."),
])
def test_a_failure_that_is_not_a_refusal_is_not_retried_and_quoted(tmp_path, capsys, monkeypatch, stderr, reason):
    from client.runtime import supernode

    monkeypatch.setattr(supernode, "_time", FakeClock())
    assert supernode.supervise(child(tmp_path, stderr), retry_for=120, retry_every=10) == 1
    assert (tmp_path / "starts").read_text() == "x"                  # one start, no retry
    err = capsys.readouterr().err
    assert err.startswith(stderr)                                    # Flower's log passes through unchanged
    last = err.splitlines()[-1]
    assert last == f"fedfer: the SuperNode stopped (exit 1): {reason}", last
    assert "2004" not in err.replace(stderr, "") and "not registered" not in err


def test_a_refusal_is_retried_and_then_explained_with_both_causes(tmp_path, capsys, monkeypatch):
    from client.runtime import supernode

    monkeypatch.setattr(supernode, "_time", FakeClock())
    assert supernode.supervise(child(tmp_path, FLOWER_2004), retry_for=30, retry_every=10) == 1
    assert (tmp_path / "starts").read_text() == "xxxx"               # t = 0, 10, 20, 30
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("fedfer: the SuperLink refused to activate this SuperNode for 30 s ([code: 2004]")
    assert "the key /site/lincoln/supernode.pub is not registered" in last and "a SuperNode with this key is still connected" in last


FLOWER_TURNED_AWAY = ("INFO 2026-12-04 18:10:35,551:      Sent successfully\n"
                      "INFO 2026-12-04 18:10:44,947:      SuperNode terminated gracefully.\nINFO:     Shutting down\n"
                      "INFO:     Finished server process [24212]\n")


@pytest.mark.parametrize("how", ["exit 0", "SIGINT"])
def test_a_node_the_superlink_turned_away_says_why_and_fails(tmp_path, capsys, monkeypatch, how):
    """`fedfer deploy rotate` (or `revoke`) unregisters the node's key while its SuperNode runs: the SuperLink
    answers its next request 401 and Flower stops the SuperNode by sending itself SIGINT, logging at most
    'terminated gracefully': exit 0, or killed by that SIGINT when a second 401 comes after Flower's handler
    reset it (seen both ways). The school is told why, not "killed by signal 2", and the exit is a failure
    (a service manager restarts it; with the school's rotated key, start.sh reads the new one)."""
    from client.runtime import supernode

    monkeypatch.setattr(supernode, "_time", FakeClock())
    argv = child(tmp_path, FLOWER_TURNED_AWAY, code=0)
    if how == "SIGINT":
        script = Path(argv[1])
        script.write_text(script.read_text().replace(
            "sys.exit(0)", "import os, signal\nsys.stderr.flush()\nsignal.signal(signal.SIGINT, signal.SIG_DFL)\n"
                           "os.kill(os.getpid(), signal.SIGINT)\n"))
    assert supernode.supervise(argv, retry_for=120, retry_every=10) == 1
    assert (tmp_path / "starts").read_text() == "x"                  # not restarted here
    err = capsys.readouterr().err
    assert err.startswith(FLOWER_TURNED_AWAY)
    last = err.splitlines()[-1]
    assert last.startswith("fedfer: the SuperNode stopped on its own") and "key was rotated or revoked" in last, last


def test_a_node_that_stopped_by_signal_says_so(tmp_path, capsys, monkeypatch):
    from client.runtime import supernode

    monkeypatch.setattr(supernode, "_time", FakeClock())
    argv = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert supernode.supervise(argv, retry_for=120, retry_every=10) == -9
    assert capsys.readouterr().err.splitlines()[-1] == "fedfer: the SuperNode stopped (exit -9): killed by signal 9"


# ------------------------------------------------------------------------------------ the coordinator
def test_start_superlink_names_a_missing_certificate(deployment):
    cert = deployment.superlink_cert
    saved = cert.read_bytes()
    cert.unlink()
    try:
        proc, took = run(["bash", str(deployment.coordinator_dir / "start-superlink.sh")], cwd=deployment.root)
    finally:
        cert.write_bytes(saved)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"fedfer: {cert}: missing (the SuperLink's TLS certificate)"], proc.stderr
    assert not (deployment.coordinator_dir / "superlink.db").exists() and took < 30


def test_deploy_up_names_a_missing_superlink_key(deployment, tmp_path):
    from server.deploy.local import LocalFederation
    from server.processes import DeploymentError

    key = deployment.superlink_key
    key.rename(tmp_path / "superlink.key")
    try:
        with LocalFederation(deployment, tmp_path / "logs") as fed, pytest.raises(DeploymentError) as err:
            fed.start_superlink(timeout=20)
    finally:
        (tmp_path / "superlink.key").rename(key)
    assert str(err.value) == f"superlink: {key}: missing (the SuperLink's TLS private key)"


# ------------------------------------------------------------------------------------ the app package
def test_flwr_run_never_packs_the_deployment_folder(tmp_path):
    """`flwr run .` on the coordinator builds the app package (FAB) from the project folder with Flower's own
    `build_fab_from_disk`, which drops what `.gitignore` ignores. A copy of the project with a deploy/ as a
    one-machine trial leaves it (the coordinator's unpacked apps, deployment.json, node-configs, a school's
    state) and a runs/ folder: none of it may be in the package."""
    from flwr.cli.build import build_fab_from_disk

    app = tmp_path / "fedfer"
    app.mkdir()
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        shutil.copy(ROOT / name, app / name)
    for package in ("client", "server", "shared_models", "privacy", "fedfer"):
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    fake = {
        "deploy/deployment.json": "{}",
        "deploy/coordinator/flwr_home/apps/fedfer.fedfer.1.0.0.35c2d3b1/client/app.py": "app = None\n",
        "deploy/coordinator/flwr_home/apps/fedfer.fedfer.1.0.0.35c2d3b1/pyproject.toml": "[project]\n",
        "deploy/nodes/lincoln/node-config.toml": 'role = "school"\n',
        "deploy/nodes/lincoln/state/ledger.jsonl": "{}\n",
        "deploy/nodes/lincoln/state/epsilon-store.json": "{}",
        "deploy/nodes/lincoln/state/round-timing.jsonl": "{}\n",
        "deploy/logs/superlink.log.json": "{}",
        "runs/demo/metrics.jsonl": "{}\n",
        "runs/demo/config.yaml": "a: 1\n",
        ".flwr/config.toml": "",
    }
    for rel, text in fake.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    names = zipfile.ZipFile(BytesIO(build_fab_from_disk(app))).namelist()
    assert "client/app.py" in names and "client/runtime/supernode.py" in names and "pyproject.toml" in names
    assert "server/deploy/layout.py" in names   # the rule is anchored (/deploy/): fedfer's own server/deploy stays
    leaked = [n for n in names if n.split("/")[0] in ("deploy", "runs", ".flwr")]
    assert not leaked, leaked


# ------------------------------------------------------------------------------------ stopping a node
SIGNAL_RECORDER = """import pathlib, signal, sys, time
got, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
got.write_text("")
signal.signal(signal.SIGTERM, lambda s, f: got.write_text(got.read_text() + f"{s}\\n"))
ready.write_text("ready")
end = time.monotonic() + 2
while time.monotonic() < end:
    time.sleep(0.05)
"""


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_stopping_the_start_scripts_group_signals_the_supernode_once(tmp_path):
    """Ctrl-C, `kill -- -PGID` or a service manager signal start.sh's whole process group, and its trap then signals
    the launcher again. Flower's SuperNode resets its handler to the default on the first signal, so a second one
    killed it before it deactivated at the SuperLink, and a restart was refused ([code: 2004]) for about a minute
    (seen here after a run). The SuperNode gets exactly one signal: from the launcher, not from the group."""
    script = tmp_path / "recorder.py"
    script.write_text(SIGNAL_RECORDER)
    got, ready = tmp_path / "got", tmp_path / "ready"
    code = ("import sys; from client.runtime.supernode import supervise; "
            f"sys.exit(supervise([sys.executable, {str(script)!r}, {str(got)!r}, {str(ready)!r}], 0, 1))")
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                                stderr=subprocess.DEVNULL)
    try:
        _wait_for(ready)
        os.killpg(launcher.pid, signal.SIGTERM)     # the whole group, as Ctrl-C or a service manager does
        time.sleep(0.3)
        launcher.send_signal(signal.SIGTERM)        # start.sh's trap: kill $NODE
        assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert got.read_text() == f"{int(signal.SIGTERM)}\n"


def test_the_warm_executor_finishes_its_clean_up_when_signalled_twice(tmp_path):
    code = ("import os, signal, time\n"
            "from client.runtime.warm_executor import _Stop, _stop\n"
            "signal.signal(signal.SIGTERM, _stop)\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "except _Stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)   # a second signal during the clean-up\n"
            "    print('cleaned up')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "cleaned up"), result.stderr[-500:]
