"""One-machine federation on Flower's own simulation engine.

`fedfer simulate` does what `flwr run .` does, with the housekeeping a user should not have to do:
it starts a private SuperLink (simulation mode, loopback only, its own FLWR_HOME inside the run
directory, telemetry and runtime dependency installation off), submits this app with the resolved
config through `flwr run --stream`, shows fedfer's own progress lines, keeps Flower's full log in
`<run>/flower.log`, and stops the SuperLink and everything it started (Ray included) when the run
ends, fails or is interrupted. With `federation.ray_address` the simulated schools run on an existing
Ray cluster instead (docs/scaling.md); the cluster itself is the user's and is left running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping, TextIO

from server.processes import flower_env, free_port, is_alive, process_tree, stop_with_parent
from server.run_dir import restart_message
from shared_models.config import to_toml

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedfer-sim"


class SimulationError(RuntimeError):
    """The federation did not complete; the message says where to look."""


def offline_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process we start: Flower's offline switches and allocator settings
    (server/processes.py, shared with deployment), plus Ray's."""
    env = dict(os.environ)
    env.update(flower_env(flwr_home, {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
    }))
    return env


def stop_process_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process and every descendant (Ray daemons leave the process group, not the tree);
    SIGKILL whatever is left after `grace`."""
    victims = process_tree(proc.pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(is_alive(pid) for pid in victims):
        time.sleep(0.2)
    for pid in victims:
        if is_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _first_error_line(log_path: Path) -> str:
    """The first line of a SuperLink log that reports an error, without its timestamp and level ("" if none)."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in (re.sub(r"\x1b\[[0-9;]*m", "", raw) for raw in lines):   # Flower colours its levels
        if "ERROR" in line:
            return line.split("]", 1)[-1].strip() if "[uvicorn" in line else line.split("ERROR", 1)[-1].strip(" :")
    return ""


def _wait_healthy(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            reason = _first_error_line(log_path)
            raise SimulationError(f"SuperLink exited with code {proc.returncode}{': ' + reason if reason else ''}; "
                                  f"see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise SimulationError(f"SuperLink did not become healthy on 127.0.0.1:{port} within {timeout:.0f} s; see {log_path}")


def write_school_policies(cfg: Mapping[str, Any], run_dir: Path, data_root: Path,
                          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Each simulated school's own privacy policy, ``<state dir>/policy.json``, written before Flower
    starts, by the generator `fedfer deploy add-school` uses: unit, δ, budget (``privacy.school_budgets``
    or ``privacy.budget``) and per-round cap from this config, the declared size from the school's data
    rounded to two significant figures. The simulated node reads it from there, so the run-config Flower
    carries can never weaken it. A policy already in a persistent state dir is kept, never replaced."""
    import json

    from client.node import simulated_state_dir
    from privacy.policy import (declared_size_bucket, policy_from_defaults, read_policy_file,
                                requested_budget, write_policy_file)

    counts = json.loads((data_root / "manifest.json").read_text(encoding="utf-8"))["counts"]
    policies: dict[str, Any] = {}
    for index in range(int(cfg["federation.schools"])):
        school = f"school-{index:02d}"
        state_dir = simulated_state_dir(cfg, run_dir, school)
        units = counts[school]["students" if cfg["privacy.unit"] == "student" else "frames"]
        budget = requested_budget(cfg, school)[0]
        policy = policy_from_defaults(cfg, declared_size_bucket(int(units)), budget=budget, source=f"{school} policy")
        existing = read_policy_file(state_dir)
        if existing is not None:
            if existing != policy:
                echo(f"{school}: keeping the policy already in {state_dir} ({existing.to_mapping()})")
            policy = existing
        else:
            write_policy_file(state_dir, policy)
        policies[school] = policy
    return policies


class Federation:
    """One simulated federation's Flower processes, run on a background thread: `start()` returns at once,
    `result()` waits for the end (the number of nodes, or SimulationError), `stop()` ends it early.

    `fedfer simulate` starts it while it is still pre-training: Flower's own start (SuperLink, `flwr run`,
    the simulation process, Ray's actors: ~15 s) then overlaps the pre-training, and the ServerApp waits
    for the run directory's preparation gate (server/run_dir.py) before it reads the pre-trained model."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, echo: Callable[[str], None] = print) -> None:
        self.cfg, self.run_dir, self.echo = cfg, run_dir, echo
        self.nodes = int(cfg["federation.schools"]) + (1 if cfg["federation.evaluator"] else 0)
        self._processes: list[subprocess.Popen] = []
        self._guard = threading.Lock()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fedfer-federation", daemon=True)

    def start(self) -> "Federation":
        self._thread.start()
        return self

    def result(self) -> int:
        try:
            self._thread.join()
        except KeyboardInterrupt:
            self.stop()
            raise
        if self._error is not None:
            raise self._error
        return self.nodes

    def stop(self) -> None:
        """Stop every process started so far (and start no more); wait for the thread to end."""
        self.stop_processes()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def stop_processes(self) -> None:
        """Stop every process started so far and start no more (the thread itself ends on its own)."""
        with self._guard:
            self._stopping = True
            processes = list(self._processes)
        for proc in reversed(processes):   # the runner before the SuperLink (and the Ray it started)
            if proc.poll() is None:
                stop_process_tree(proc)

    def launch(self, start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        with self._guard:
            if self._stopping:
                raise SimulationError("stopped before Flower had started")
            proc = start()
            self._processes.append(proc)
            return proc

    def _run(self) -> None:
        try:
            _federate(self)
        except BaseException as exc:  # noqa: BLE001 - handed to result() on the caller's thread
            self._error = exc


def ray_session_dir(pid: int) -> Path:
    """Where the simulation of the process `pid` keeps Ray's session files; below /tmp because Ray's
    socket paths must stay short. Removed after a run that finished."""
    return Path("/tmp") / f"fedfer-ray-{pid}"


def _federate(fed: Federation) -> None:
    """SuperLink, then `flwr run --stream` with the resolved config, followed to the end; everything stopped
    however it ends."""
    cfg, run_dir = fed.cfg, fed.run_dir
    flwr_home = run_dir / ".flower"
    flwr_home.mkdir(parents=True, exist_ok=True)
    run_config = run_dir / ".flower" / "run-config.toml"
    run_config.write_text(to_toml(cfg), encoding="utf-8")
    env = offline_env(flwr_home)
    env["FEDFER_WORKDIR"] = str(Path.cwd())
    ray_tmp = ray_session_dir(os.getpid())
    env["RAY_TMPDIR"] = str(ray_tmp)
    env.pop("RAY_ADDRESS", None)   # the config decides (`fedfer simulate` copies a RAY_ADDRESS of the shell into it)
    env.update(ray_cluster_env(cfg))

    superlink_log = run_dir / "superlink.log"
    service = _school_service(cfg)
    finished = False
    flower_log = run_dir / "flower.log"
    try:
        _start_healthy_superlink(fed, flwr_home, env, run_dir, superlink_log)
        cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(APP_DIR), CONNECTION, "--stream",
               "--run-config", str(run_config),
               "--federation-config",
               f"num-supernodes={fed.nodes} client-resources-num-cpus={int(cfg['federation.cpus_per_school'])}"]
        returncode, failed_line = _run_and_follow(fed, cmd, env, flower_log)
        if returncode != 0:
            raise SimulationError(f"flwr run exited with {returncode}: {failed_line or 'see ' + str(flower_log)}")
        if failed_line and "failed" in failed_line.lower():
            raise SimulationError(f"{failed_line} (full log: {flower_log})")
        finished = True
    finally:
        fed.stop_processes()
        if finished:   # Ray's session files (sockets, its own logs); kept after a failure, where they may help
            shutil.rmtree(ray_tmp, ignore_errors=True)
        if service is not None:
            service.stop()
            if service.built:
                fed.echo(service.describe())


def ray_cluster_env(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The variables that put the simulation on an existing Ray cluster (`federation.ray_address`).

    Flower 1.41's Ray backend calls `ray.init` with its own init arguments only when Ray is not yet
    initialised in the simulation process, and `ray.init` without an address follows RAY_ADDRESS: set in
    the SuperLink's environment, it reaches the `flwr-simulation` process the SuperLink starts, whose
    driver then attaches to that cluster instead of starting a private Ray. Every simulated school
    becomes a Ray actor reserving `federation.cpus_per_school` CPUs on whichever node Ray places it."""
    address = str(cfg["federation.ray_address"]).strip()
    return {"RAY_ADDRESS": address} if address else {}


def _school_service(cfg: Mapping[str, Any]):
    """With data.generate=on-demand: the generator service for the run's schools, started (else None)."""
    if str(cfg.get("data.generate", "")) != "on-demand":
        return None
    from simulations.school_service import SchoolService
    from simulations.synth import params_from_config

    service = SchoolService(Path(str(cfg["data.root"])), params_from_config(cfg), workers=os.cpu_count() or 1)
    service.start()
    return service


def _start_healthy_superlink(fed: Federation, flwr_home: Path, env: dict[str, str], run_dir: Path, log: Path,
                             attempts: int = 3) -> int:
    """A healthy SuperLink on a free port, which `flwr run` finds through `flwr_home/config.toml`; its port.
    A port can be taken between choosing it and the SuperLink binding it: then another port, up to `attempts`."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        log_start = log.stat().st_size if log.exists() else 0
        superlink = fed.launch(lambda: _start_superlink(port, flwr_home, env, run_dir, log))
        try:
            _wait_healthy(port, superlink, log)
            return port
        except SimulationError:
            with open(log, "rb") as handle:
                handle.seek(log_start)
                port_taken = b"address already in use" in handle.read()
            if not port_taken or attempt == attempts:
                raise
            fed.echo(f"  port {port} was taken before the SuperLink bound it; starting it on another port")
    raise AssertionError("unreachable")


def _start_superlink(port: int, flwr_home: Path, env: dict[str, str], run_dir: Path, log: Path) -> subprocess.Popen:
    """A simulation-mode SuperLink on loopback, in its own session (so stopping it reaches Ray too)."""
    bin_dir = Path(sys.executable).parent
    return subprocess.Popen(
        [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
         "--database", str(flwr_home / "state.db"), "--disable-runtime-dependency-installation"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=str(run_dir),
        start_new_session=True, preexec_fn=stop_with_parent,   # a `fedfer simulate` killed alone takes it along
    )


def _run_and_follow(fed: Federation, cmd: list[str], env: dict[str, str], flower_log: Path) -> tuple[int, str]:
    """Run `flwr run --stream`, copy its output to `flower_log`, echo fedfer's progress lines; returns
    the exit code and the first line that reported a failure ("" if none). The runner and what it
    started are stopped however this ends."""
    with open(flower_log, "a", encoding="utf-8") as log_file:
        runner = fed.launch(lambda: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                                      cwd=str(APP_DIR), text=True, bufsize=1, start_new_session=True,
                                                      preexec_fn=stop_with_parent))
        try:
            assert runner.stdout is not None
            # lines the ServerApp writes for `flwr run` users that `fedfer simulate` already printed itself
            said = {f"run directory {fed.run_dir}", restart_message(fed.run_dir)}
            failed_line = _follow(runner.stdout, log_file, fed.echo, already_said=said)
            runner.wait()
        finally:
            stop_process_tree(runner)
    return runner.returncode, failed_line


def _follow(lines: Iterable[str], log_file: TextIO, echo: Callable[[str], None],
            already_said: Collection[str] = ()) -> str:
    """Log every line; echo each `[fedfer]` message once (none of `already_said`, which the caller printed
    itself); remember the first error or failed-run line."""
    failed_line, last_echo = "", ""
    for line in lines:
        log_file.write(line)
        log_file.flush()
        text = line.rstrip()
        if "[fedfer]" in text:
            message = text.split("[fedfer]", 1)[1].strip()
            if message != last_echo and message not in already_said:  # Flower logs every line in two formats
                echo(message)
            last_echo = message
        elif ("ERROR" in text or "Traceback" in text or "Exception" in text) and not failed_line:
            failed_line = text.strip()
        if "Run finished" in text or "finished:failed" in text:
            if "failed" in text:
                failed_line = failed_line or text.strip()
    return failed_line
