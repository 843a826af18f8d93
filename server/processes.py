"""Start, watch and stop the processes of a Flower deployment (SuperLink, SuperNodes, warm executors).

Used by the deployment test, the deployment benchmark and `fedfer deploy up` on one machine. Every
process is started in its own session (its own process group), and the supervisor remembers the
sessions of everything it started *and of their descendants* (the SuperLink starts a detached
`flower-superexec`, which starts `flwr-serverapp`; a SuperNode starts `flower-superexec`, which
starts `flwr-clientapp`). `Supervisor.stop_all()` terminates all of them — SIGTERM, a grace period,
then SIGKILL — and runs from `__exit__`, so a failing test or benchmark leaves nothing behind.
It only ever signals processes it started or their descendants, never anything found by name.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Mapping, Sequence

# Flower behaviour we never want in a deployment on this stack: no `uv sync` of the app's dependencies
# at run time (Flower 1.41's SuperLink does it by default, and it fails offline), no telemetry, no update check.
FLOWER_ENV: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
# glibc keeps freed per-sample-gradient buffers instead of unmapping them every DP step (the same
# settings as simulations/launcher.py; measured there 277 -> 362 samples/s for HAFNet-cpu).
MALLOC_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "MALLOC_TOP_PAD_": "67108864",
}


class DeploymentError(RuntimeError):
    """A deployment process failed to start, died, or a port never opened."""


# ------------------------------------------------------------------------------------ /proc helpers
def stop_with_parent() -> None:
    """For `subprocess.Popen(preexec_fn=...)`: the child gets SIGTERM when the thread that started it ends,
    also when its process is SIGKILLed (Linux PR_SET_PDEATHSIG). A SuperLink started in a session of its own
    otherwise outlives a `fedfer simulate` killed alone and keeps the run (and itself) going; with this it
    stops, and its SuperExec and simulation follow it (they watch its pid)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)   # 1 = PR_SET_PDEATHSIG


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, sid) of a live process, None if gone (Linux /proc)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] == "Z":  # zombie: already dead, only waiting to be reaped
        return None
    return int(fields[1]), int(fields[2]), int(fields[3])


def is_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return _proc_stat(pid) is not None


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants (parents before children)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
    order, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _proc_stat(pid) is None:
            continue
        order.append(pid)
        todo.extend(children.get(pid, []))
    return order


def processes_with_flwr_home(under: Path) -> set[int]:
    """Every live process whose FLWR_HOME lies under `under`: the launcher gives each Flower process of a run
    (SuperLink, simulation, Ray's raylet and workers, which inherit its environment) FLWR_HOME inside the
    run directory, so this finds them even when they left the process tree (Ray's daemons)."""
    marker = f"FLWR_HOME={under}".encode()
    found = set()
    for pid in _all_pids():
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes():
                found.add(pid)
        except OSError:
            continue
    return found


def pids_in_sessions(sessions: Iterable[int]) -> list[int]:
    wanted = set(sessions)
    return [pid for pid in _all_pids() if (st := _proc_stat(pid)) is not None and st[2] in wanted and pid != os.getpid()]


# ------------------------------------------------------------------------------------ ports
# Ports are chosen below the kernel's ephemeral range (and above Ray's default worker ports, 10002-19999):
# a port the OS hands out for bind(0) is one it may also hand to any outgoing connection, and a SuperLink
# that binds seconds after the port was chosen then fails with "address already in use" (seen once in
# session 25 on the default demo). Falls back to the OS's choice where the range cannot be read.
_LOWEST_CHOSEN_PORT = 20000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bound_socket(host: str, taken: set[int]) -> socket.socket:
    """A socket bound to a free port outside the ephemeral range (else the OS's choice), not in `taken`."""
    low, _ = _ephemeral_range()
    candidates = list(range(_LOWEST_CHOSEN_PORT, low)) if low - _LOWEST_CHOSEN_PORT >= 1000 else []
    rng = random.SystemRandom()
    for port in rng.sample(candidates, min(200, len(candidates))):
        if port in taken:
            continue
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
            return sock
        except OSError:
            sock.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing is bound to right now, outside the range the OS uses for outgoing connections."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports (all held open together while choosing, so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(_bound_socket(host, {int(s.getsockname()[1]) for s in socks}))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tls_handshake_ok(host: str, port: int, ca_file: Path, server_name: str | None = None, timeout: float = 2.0) -> bool:
    """True when `host:port` presents a certificate that verifies against `ca_file` for `server_name`."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_name or host):
                return True
    except (OSError, ssl.SSLError):
        return False


# ------------------------------------------------------------------------------------ supervisor
@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path | None
    _log: IO[bytes] | None = field(default=None, repr=False)
    # where this start's output begins in `log_path`: the log is appended to at every start (`fedfer deploy up`
    # again), and an earlier start's lines ("SuperNode ID", its errors) must not be read as this one's
    log_start: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self, tail: int = 4000) -> str:
        """The last `tail` characters this start wrote to its log (never an earlier start's)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(self.log_start)
            return handle.read().decode(errors="replace")[-tail:]


class Supervisor:
    """Owns every process it starts; `stop_all()` (also on `__exit__`) kills them and their children."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self.log_dir = Path(log_dir) if log_dir else None
        self.processes: list[ManagedProcess] = []
        self._sessions: set[int] = set()
        self._known: set[int] = set()

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: Path | None = None, stdin: int | None = subprocess.DEVNULL) -> ManagedProcess:
        """Start `argv` in a new session with output to `<log_dir>/<name>.log`."""
        log_path, log, log_start = None, None, 0
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
            log = open(log_path, "ab")
            log_start = log.tell()   # opened for appending: at the end of the earlier starts' lines
        full_env = dict(os.environ)
        full_env.update(env or {})
        try:
            popen = subprocess.Popen(list(argv), env=full_env, cwd=str(cwd) if cwd else None, stdin=stdin,
                                     stdout=log if log else subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        except FileNotFoundError as exc:
            if log:
                log.close()
            raise DeploymentError(f"{name}: command not found: {argv[0]}") from exc
        proc = ManagedProcess(name, list(argv), popen, log_path, log, log_start=log_start)
        self.processes.append(proc)
        self._sessions.add(popen.pid)  # start_new_session: sid == pid
        self.refresh()
        return proc

    def refresh(self) -> None:
        """Remember the sessions of all current descendants (Flower detaches some into new sessions)."""
        for proc in self.processes:
            if proc.alive():
                for pid in process_tree(proc.pid):
                    self._known.add(pid)
                    if (st := _proc_stat(pid)) is not None:
                        self._sessions.add(st[2])

    def owned_pids(self) -> list[int]:
        self.refresh()
        pids = set(pids_in_sessions(self._sessions))
        pids |= {pid for pid in self._known if _proc_stat(pid) is not None}
        for proc in self.processes:
            if proc.alive():
                pids |= set(process_tree(proc.pid))
        pids.discard(os.getpid())
        return sorted(pids)

    def stop(self, proc: ManagedProcess, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Stop one process and its descendants (SIGTERM → grace → SIGKILL)."""
        tree = process_tree(proc.pid) if proc.alive() else []
        self._signal(tree, sig)
        self._wait_gone(tree, grace)
        self._signal([p for p in tree if _proc_stat(p) is not None], signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)

    def kill(self, proc: ManagedProcess) -> None:
        """SIGKILL one process only (a crash, for fault tests); its children are left to notice."""
        self.refresh()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)

    def stop_all(self, grace: float = 10.0) -> list[int]:
        """Stop everything started here (and descendants). Returns the PIDs that had to be SIGKILLed."""
        pids = self.owned_pids()
        self._signal(pids, signal.SIGTERM)
        self._wait_gone(pids, grace)
        left = [p for p in self.owned_pids() if _proc_stat(p) is not None]
        self._signal(left, signal.SIGKILL)
        self._wait_gone(left, 5.0)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=2)
            if proc._log is not None:
                proc._log.close()
                proc._log = None
        return left

    @staticmethod
    def _signal(pids: Iterable[int], sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _wait_gone(self, pids: Sequence[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.processes:  # reap our direct children so they do not linger as zombies
                proc.popen.poll()
            if all(_proc_stat(p) is None for p in pids):
                return
            time.sleep(0.1)

    def wait_port(self, proc: ManagedProcess, host: str, port: int, timeout: float = 60.0) -> None:
        """Wait until `proc` listens on host:port; fail early with its log if it dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode} before opening "
                                      f"{host}:{port} (log: {proc.log_path})\n{proc.log_text()}")
            if port_open(host, port):
                self.refresh()
                return
            time.sleep(0.2)
        raise DeploymentError(f"{proc.name}: {host}:{port} did not open within {timeout:.0f} s\n{proc.log_text()}")

    def wait_log(self, proc: ManagedProcess, needle: str, timeout: float = 60.0) -> None:
        """Wait until `needle` appears in the process log (e.g. 'SuperNode ID')."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in proc.log_text(tail=1_000_000):
                self.refresh()
                return
            if not proc.alive():
                raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode} before logging "
                                      f"{needle!r} (log: {proc.log_path})\n{proc.log_text()}")
            time.sleep(0.2)
        raise DeploymentError(f"{proc.name}: {needle!r} not logged within {timeout:.0f} s\n{proc.log_text()}")


# ------------------------------------------------------------------------------------ command lines
def bin_path(name: str) -> str:
    """A console script of this Python environment (flower-superlink, flwr, …)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def superlink_argv(*, host: str, port: int, database: Path, ca_cert: Path | None, cert: Path | None,
                   key: Path | None, insecure: bool = False, node_auth: bool = True,
                   log_file: Path | None = None, hold: float = 0.0) -> list[str]:
    """`flower-superlink` with TLS and SuperNode authentication (unless `insecure`).

    hold > 0: started through server.held_pulls, whose pulls wait up to `hold` s for a message."""
    argv = ["--host", host, "--port", str(port), "--database", str(database), "--disable-runtime-dependency-installation"]
    if insecure:
        argv.append("--insecure")
    else:
        if not (ca_cert and cert and key):
            raise ValueError("a TLS SuperLink needs ca_cert, cert and key")
        argv += ["--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        if node_auth:
            argv.append("--enable-supernode-auth")
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    if hold > 0:
        return [sys.executable, "-m", "server.held_pulls", "--hold", str(hold), "--", *argv]
    return [bin_path("flower-superlink"), *argv]


def format_node_config(values: Mapping[str, object]) -> str:
    """Flower's `--node-config` string: space-separated key=value, strings quoted (TOML values)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"node-config '{key}' must be a finite number, got {value}")
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_argv(*, superlink: str, runtime_port: int, node_config: Mapping[str, object] | str | Path,
                   root_certificates: Path | None, auth_key: Path | None, insecure: bool = False,
                   isolation: str = "process", runtime_host: str = "127.0.0.1",
                   poll: tuple[float, float] | None = (0.5, 0.1),
                   superexec_secret: Path | None = None) -> list[str]:
    """`flower-supernode` for one school / the evaluator.

    isolation="process": the school's warm executor (client.runtime.warm_executor) runs the ClientApp;
    "subprocess": Flower starts one fresh `flwr-clientapp` process per message (slow, see the module doc).
    poll=(idle, reply): start it through client.runtime.supernode with shorter poll sleeps; None: plain Flower.
    node_config: a mapping, Flower's "k=v …" string, or a path to a .toml file.
    """
    flower = ["--superlink", superlink, "--host", runtime_host, "--port", str(runtime_port), "--isolation", isolation]
    if isinstance(node_config, Path):
        flower += ["--node-config", str(node_config)]
    else:
        flower += ["--node-config", node_config if isinstance(node_config, str) else format_node_config(node_config)]
    if insecure:
        flower.append("--insecure")
    else:
        if root_certificates is None:
            raise ValueError("a TLS SuperNode needs root_certificates (the coordinator CA)")
        flower += ["--root-certificates", str(root_certificates)]
        if auth_key is not None:
            flower += ["--auth-supernode-private-key", str(auth_key)]
    if superexec_secret is not None and isolation == "process":
        flower += ["--superexec-auth-secret-file", str(superexec_secret)]
    if poll is None:
        return [bin_path("flower-supernode"), *flower]
    return [sys.executable, "-m", "client.runtime.supernode", "--idle-poll", str(poll[0]), "--reply-poll", str(poll[1]),
            "--", *flower]


def warm_executor_argv(*, runtime_port: int, runtime_host: str = "127.0.0.1", preload: Sequence[str] = (),
                       poll: float | None = None, superexec_secret: Path | None = None) -> list[str]:
    """The school's long-running ClientApp executor (see client/runtime/warm_executor.py)."""
    argv = [sys.executable, "-m", "client.runtime.warm_executor", "--runtime-api-address", f"{runtime_host}:{runtime_port}"]
    if superexec_secret is not None:
        argv += ["--superexec-auth-secret-file", str(superexec_secret)]
    if preload:
        argv += ["--preload", ",".join(preload)]
    if poll is not None:
        argv += ["--poll", str(poll)]
    return argv


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for any Flower process: its own FLWR_HOME and the offline switches."""
    env = {**FLOWER_ENV, **MALLOC_ENV}
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts its helpers by bare name (flower-superexec, flwr-serverapp, flwr-clientapp):
    # they must resolve to this environment even when it is not activated.
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if venv_bin not in path.split(os.pathsep):
        env["PATH"] = venv_bin + os.pathsep + path
    env.update(extra or {})
    return env


def run_flwr(args: Sequence[str], *, flwr_home: Path, cwd: Path | None = None, timeout: float = 120.0,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one `flwr …` CLI command (register, list, run) in its own session; kill it on timeout."""
    full_env = dict(os.environ)
    full_env.update(flower_env(flwr_home, env))
    with subprocess.Popen([bin_path("flwr"), *args], cwd=str(cwd) if cwd else None, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, start_new_session=True) as popen:
        try:
            out, _ = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in reversed(process_tree(popen.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out, _ = popen.communicate()
            raise DeploymentError(f"flwr {' '.join(args[:2])} timed out after {timeout:.0f} s\n{out[-4000:]}")
    return subprocess.CompletedProcess(popen.args, popen.returncode, out, "")
