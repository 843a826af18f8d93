"""A deployment directory's SuperLink and nodes started on this machine, with the same commands the
generated start scripts run: the deployment tests, the deployment benchmark and `fedfer deploy up`."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from server.processes import DeploymentError, ManagedProcess, Supervisor, flower_env, process_tree, tls_handshake_ok


class LocalFederation:
    """A deployment directory's SuperLink and nodes, started on this machine with the same commands
    the generated start scripts run (tests, benchmark, `fedfer deploy up`). Stops everything on exit."""

    def __init__(self, dep: "object", log_dir: Path, flwr_home: Path | None = None) -> None:
        self.dep = dep
        self.flwr_home = flwr_home
        self.supervisor = Supervisor(log_dir)
        self.superlink: ManagedProcess | None = None
        self.nodes: dict[str, list[ManagedProcess]] = {}

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.supervisor.stop_all()

    def start_superlink(self, timeout: float = 90.0) -> ManagedProcess:
        from server.deploy.layout import flower_args, superlink_command
        from server.deploy.preflight import SuperLinkStartError, check_superlink

        dep = self.dep
        argv = superlink_command(dep)
        try:   # the start script's first check: a missing file named by its path, not by Flower's option
            check_superlink(flower_args(argv))
        except SuperLinkStartError as exc:
            raise DeploymentError(f"superlink: {exc}") from None
        proc = self.supervisor.start("superlink", argv,
                                     env=flower_env(dep.coordinator_dir / "flwr_home"), cwd=dep.coordinator_dir)
        host = dep.local_host
        self.supervisor.wait_port(proc, host, dep.port, timeout)
        if not dep.insecure:
            deadline = time.monotonic() + timeout
            while not tls_handshake_ok(host, dep.port, dep.ca_cert, "localhost" if host == "127.0.0.1" else host):
                if time.monotonic() > deadline or not proc.alive():
                    raise DeploymentError(f"superlink: TLS on {dep.local_address} does not verify against "
                                          f"{dep.ca_cert}\n{proc.log_text()}")
                time.sleep(0.2)
        self.superlink = proc
        return proc

    def start_node(self, name: str, *, superlink: str | None = None, wait: bool = True,
                   timeout: float = 90.0) -> list[ManagedProcess]:
        """Start one node's SuperNode (+ warm executor). wait: until the SuperLink accepted it."""
        from server.deploy.layout import node_commands

        dep = self.dep
        folder = dep.node_dir(name)
        env = flower_env(folder / "flwr_home")
        commands = node_commands(dep, name, None, superlink or dep.local_address)
        node = self.supervisor.start(f"{name}-supernode", commands[0], env=env, cwd=folder)
        procs = [node]
        if len(commands) > 1:
            self.supervisor.wait_port(node, "127.0.0.1", dep.node(name).runtime_port, timeout)
            procs.append(self.supervisor.start(f"{name}-executor", commands[1], env=env, cwd=folder))
        self.nodes[name] = procs
        if wait:
            self.supervisor.wait_log(node, "SuperNode ID", timeout)
        return procs

    def start_nodes(self, names: Sequence[str], *, superlink: str | None = None, timeout: float = 120.0) -> None:
        """Start several nodes at once, then wait until the SuperLink accepted every one."""
        for name in names:
            self.start_node(name, superlink=superlink, wait=False, timeout=timeout)
        for name in names:
            self.supervisor.wait_log(self.nodes[name][0], "SuperNode ID", timeout)

    def start_all(self, names: Sequence[str] | None = None) -> None:
        """SuperLink first; then register every node created while it was down (TLS deployments), and
        start the nodes (`names`, default: every node not revoked) and wait until each is accepted."""
        from server.deploy.commands import register_pending
        from server.deploy.layout import Deployment

        self.start_superlink()
        dep = self.dep
        if not dep.insecure:
            for name, entry in dep.nodes.items():
                if entry.status == "created":
                    register_pending(dep.root, name, self.flwr_home)
            self.dep = dep = Deployment.load(dep.root)
        self.start_nodes(list(names) if names is not None else [n for n in dep.nodes if dep.nodes[n].status != "revoked"],
                         superlink=dep.local_address)

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of a node at once — a crashed school machine (fault tests)."""
        self.supervisor.refresh()
        pids = [pid for proc in self.nodes.get(name, []) for pid in process_tree(proc.pid)]
        Supervisor._signal(pids, signal.SIGKILL)
        for proc in self.nodes.get(name, []):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
