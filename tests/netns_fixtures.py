"""Network namespaces made by a test and removed by it (tests only): a Ray cluster kept on loopback,
and a coordinator and schools on separate "hosts" joined by a bridge in a private test subnet.

Every namespace, veth and bridge is created here with a name unique to this process and lives only
inside the namespaces: nothing is added to the machine's own network. `Namespaces.close()` kills every
process still inside them (by PID, from `ip netns pids`) and deletes them, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=check)


def netns_unavailable() -> str | None:
    """Why this machine cannot host the test's namespaces (None: it can). Tried, not guessed."""
    if not Path(IP).exists():
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (`ip netns add`)"
    probe = f"ffprobe{os.getpid()}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here: {result.stderr.strip()[:200]}"
    try:
        pair = _ip("-n", probe, "link", "add", "ffp0", "type", "veth", "peer", "name", "ffp1", check=False)
        if pair.returncode != 0:
            return f"veth pairs cannot be created here: {pair.stderr.strip()[:200]}"
        return None
    finally:
        _ip("netns", "del", probe, check=False)


class Namespaces:
    """The namespaces of one test. Names: `ff<pid><tag>` (interfaces at most 15 characters)."""

    def __init__(self) -> None:
        self.prefix = f"ff{os.getpid() % 100000}"
        self.names: list[str] = []

    def __enter__(self) -> "Namespaces":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, tag: str) -> str:
        """A new namespace with only its loopback interface up."""
        name = f"{self.prefix}{tag}"
        _ip("netns", "add", name)
        self.names.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def bridge(self, hub: str, address: str) -> str:
        """A bridge inside namespace `hub`, holding `address` (CIDR) — the hub's address on the subnet."""
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", address, "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        return "br0"

    def attach(self, hub: str, member: str, address: str) -> None:
        """Join namespace `member` to the hub's bridge with a veth pair; `address` (CIDR) on its end.
        The pair is created inside `hub`, then one end moves into `member`."""
        index = self.names.index(member)
        hub_end, member_end = f"fh{index}", f"fm{index}"
        _ip("-n", hub, "link", "add", hub_end, "type", "veth", "peer", "name", member_end)
        _ip("-n", hub, "link", "set", member_end, "netns", member)
        _ip("-n", hub, "link", "set", hub_end, "master", "br0")
        _ip("-n", hub, "link", "set", hub_end, "up")
        _ip("-n", member, "addr", "add", address, "dev", member_end)
        _ip("-n", member, "link", "set", member_end, "up")

    @staticmethod
    def argv(name: str, command: Sequence[str]) -> list[str]:
        """`command` run inside namespace `name` (`ip netns exec` execs it: the PID stays the command's)."""
        return [IP, "netns", "exec", name, *command]

    @staticmethod
    def pids(name: str) -> list[int]:
        result = _ip("netns", "pids", name, check=False)
        return [int(word) for word in result.stdout.split() if word.isdigit()]

    def close(self, grace: float = 10.0) -> list[int]:
        """Kill what is left inside the namespaces (SIGTERM, then SIGKILL), delete them; returns the PIDs
        that were still running when close began."""
        left = [pid for name in self.names for pid in self.pids(name)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in [pid for name in self.names for pid in self.pids(name)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(self.pids(name) for name in self.names):
                time.sleep(0.1)
        for name in reversed(self.names):
            _ip("netns", "del", name, check=False)
        self.names.clear()
        return left
