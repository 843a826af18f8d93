"""Check a node before its SuperNode starts: every file it needs, and its node-config read as strictly as the
ClientApp will read it (client/node.py). One line naming the file, key or path, exit 2; nothing to retry.

Why: Flower reads these only when it needs them — a misspelt node-config key or a bad value reached the
ClientApp at the first round (the coordinator logged "node … did not answer the role query"), invalid TOML
gave a tomli traceback without the file name, a missing `ca.crt` Flower's "Path argument
`--root-certificates` does not point to a file." without the path — and the launcher retried each for two
minutes as if the key were still being registered.

Usage (the first line of the start script `fedfer deploy add-school` writes; the launcher
client/runtime/supernode.py runs it too unless the script already did):
    python -m client.runtime.preflight -- <flower-supernode arguments>
"""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from shared_models.start_files import option, read_start_file, run_start_check

if TYPE_CHECKING:
    from client.node import NodeIdentity


class NodeStartError(Exception):
    """Why this node cannot start, as one line naming the file, key or path."""


def readable_file(path: Path, what: str) -> bytes:
    """The bytes of a file the node needs, or NodeStartError naming the path and what it is."""
    return read_start_file(path, what, NodeStartError)


def check_certificate(path: Path) -> None:
    from cryptography import x509

    data = readable_file(path, "the federation's CA certificate, to verify the coordinator")
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise NodeStartError(f"{path}: not a PEM certificate (the federation's CA certificate, ca.crt)") from None


def check_auth_key(path: Path) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = readable_file(path, "the node's authentication key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:   # whoever reads it can connect as this school (Flower itself does not check)
        raise NodeStartError(f"{path}: permissions {oct(mode)} let others read the node's authentication key; chmod 600 it")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise NodeStartError(f"{path}: not an unencrypted OpenSSH private key (the node's authentication key)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeStartError(f"{path}: is a {type(key).__name__}, Flower needs an EC key (the node's authentication key)")


def read_node_config(value: str) -> tuple[dict[str, Any], str]:
    """The node-config as Flower will read it (`--node-config`: a .toml file, or 'k=v …') and its name."""
    from flwr.common.config import flatten_dict, parse_config_args

    if value.endswith(".toml"):
        path = Path(value).expanduser()
        data = readable_file(path, "the node-config")
        try:
            return flatten_dict(tomllib.loads(data.decode("utf-8"))), str(path)
        except UnicodeDecodeError as exc:
            raise NodeStartError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:   # its message ends "(at line L, column C)"
            raise NodeStartError(f"{path}: invalid TOML: {' '.join(str(exc).split())}") from None
    import click

    try:
        return parse_config_args([value]), "--node-config"
    except (click.ClickException, ValueError) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        raise NodeStartError(f"--node-config: {' '.join(message.split())}") from None


def check_directory(path_text: str, key: str, source: str) -> Path:
    path = Path(path_text)
    hint = " ('~' is not expanded here: write the full path)" if path_text.startswith("~") else ""
    if not path.is_dir():
        state = "not a directory" if path.exists() else "no such directory"
        raise NodeStartError(f"{source}: key '{key}': {path}: {state}{hint}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise NodeStartError(f"{source}: key '{key}': {path}: not readable by this user")
    return path


def check_school_folders(values: dict[str, Any], source: str) -> None:
    """The school's data folder, and its state folder with the ledger signing key the coordinator knows."""
    from privacy.signing import SIGNING_KEY_FILE
    from privacy.state_folder import LedgerLostError, check_ledger_not_lost

    check_directory(str(values["data-dir"]), "data-dir", source)
    state = check_directory(str(values["state-dir"]), "state-dir", source)
    if not os.access(state, os.W_OK):
        raise NodeStartError(f"{source}: key 'state-dir': {state}: not writable by this user (the ledger is kept there)")
    try:   # a ledger lost from a folder that shows earlier rounds: the node would restart the school's ε at 0
        check_ledger_not_lost(state, str(values.get("school-id") or "") or None)
        check_ledger_not_behind(state)
    except LedgerLostError as exc:
        raise NodeStartError(str(exc)) from None
    key = state / SIGNING_KEY_FILE
    if not key.is_file():
        # a ledger beside it was signed with it: if the key is lost for good, a key recovery carries the ledger on
        lost = (f"; if it is lost, continue the ledger under a new key: `fedfer deploy school-key --state-dir {state} "
                f"--recover-ledger-key`" if (state / "ledger.jsonl").is_file() else "")
        raise NodeStartError(f"{key}: missing (the school's ledger signing key, made at the school by `fedfer deploy "
                             f"school-key`, or by `add-school` in the node folder's state/; the coordinator verifies the "
                             f"ledger against its public half): "
                             f"copy it there or correct 'state-dir' in {source}{lost}")
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & 0o077:
        raise NodeStartError(f"{key}: permissions {oct(mode)} let others read the signing key; chmod 600 it")


def check_ledger_not_behind(state: Path) -> None:
    """LedgerLostError when the state folder's ledger.jsonl lacks the entry ``signing_key.has-ledger`` records as the
    last one this folder signed: an old backup put back (with its accountant, which agrees with it), or its tail
    cut off. The node would start, and every round would be declined ledger-lost; here it stops at start instead,
    naming the file. A ledger that cannot be read is left to the node, which names the line it refuses."""
    from privacy.ledger import LEDGER_FILE, LedgerError, read_ledger_file
    from privacy.state_folder import check_ledger_reaches_head, recorded_ledger_head

    ledger = state / LEDGER_FILE
    if recorded_ledger_head(state) is None or not ledger.is_file():
        return
    try:
        entries = read_ledger_file(ledger)
    except LedgerError:
        return
    check_ledger_reaches_head(state, [e.get("hash") if isinstance(e, dict) else None for e in entries], str(ledger))


def check_node(flower_args: Sequence[str]) -> "NodeIdentity":
    """Everything the node reads at start (Flower's options, then the node-config and the folders it names);
    the node's identity, or NodeStartError for the first problem."""
    from client.node import NodeConfigError, read_deployed

    node_config = option(flower_args, "--node-config")
    insecure = "--insecure" in flower_args
    root = option(flower_args, "--root-certificates")
    if root is not None:
        check_certificate(Path(root))
    elif not insecure:
        raise NodeStartError("--root-certificates is missing: a TLS node needs the federation's CA certificate (ca.crt)")
    if (key := option(flower_args, "--auth-supernode-private-key")) is not None:
        check_auth_key(Path(key).expanduser())
    if (secret := option(flower_args, "--superexec-auth-secret-file")) is not None:
        readable_file(Path(secret).expanduser(), "the secret the SuperNode shares with its warm executor")
    if (trusted := option(flower_args, "--trusted-entities")) is not None:
        readable_file(Path(trusted).expanduser(), "the trusted entities")
    if node_config is None:
        raise NodeStartError("--node-config is missing: a fedfer node needs its node-config.toml")
    values, source = read_node_config(node_config)
    try:
        node = read_deployed(values, source)
    except NodeConfigError as exc:
        raise NodeStartError(str(exc)) from None
    if node.role == "school":
        check_school_folders(values, source)
        check_runtime_port(flower_args)
        return node
    if values.get("data-dir"):
        check_directory(str(values["data-dir"]), "data-dir", source)
    for spec in (s.strip() for s in node.benchmarks.split(",")):
        name, sep, path = spec.partition("=")
        if sep and path.strip() and not Path(path.strip()).expanduser().exists():
            raise NodeStartError(f"{source}: key 'benchmarks': {path.strip()}: not found (benchmark {name.strip()})")
    check_runtime_port(flower_args)
    return node


def check_runtime_port(flower_args: Sequence[str]) -> None:
    """The SuperNode's local Runtime API port (`--host`/`--port`, the node's runtime port) must be free: taken
    by another program or another node on this machine, Flower stopped with a traceback ending in "SuperNode
    Runtime HTTP API failed to start." that named no port. (A check, then Flower's bind: a port taken in
    between still gets Flower's error.)"""
    import errno
    import socket

    host, port = option(flower_args, "--host") or "127.0.0.1", option(flower_args, "--port")
    if port is None:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise NodeStartError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
            raise NodeStartError(f"{host}:{port}, this node's local Runtime API port, is in use by another process "
                                 f"(another node on this machine, or this node started twice): stop it, or give the "
                                 f"node another port (`fedfer deploy add-school … --runtime-port`)") from None


def main(argv: Sequence[str] | None = None) -> int:
    return run_start_check(check_node, NodeStartError, argv)


if __name__ == "__main__":
    sys.exit(main())
