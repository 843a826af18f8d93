"""The on-disk layout of a deployment directory (`fedfer deploy init` creates it) and the exact
commands that start its SuperLink and each node.

    deploy/
      deployment.json          manifest: coordinator address, port, SANs, every node (role,
                               registered Flower node id, key fingerprint, runtime port, node-config)
      ca/ca.crt ca/ca.key      the federation's CA (keep ca.key offline once nodes are issued)
      coordinator/             what the coordinator machine needs to run the SuperLink
        ca.crt superlink.crt superlink.key start-superlink.sh  (+ superlink.db, superlink.log at run time)
      keys/<school>.pub        ledger verification keys (Ed25519 PEM); the server checks ledger
                               signatures against these
      nodes/<name>/            one folder per school / evaluator — hand it to that site
        ca.crt supernode supernode.pub superexec.secret node-config.toml start.sh
        state/                 the school's state-dir (ledger signing key, accountant, ledger)

The start commands are built here once and used both for the generated shell scripts and for
starting the processes from Python (tests, benchmark), so what is tested is what schools run.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from server.deploy.credentials import write_public
from shared_models.config import SCHOOL_ID

MANIFEST = "deployment.json"
MANIFEST_VERSION = 1
DEFAULT_PORT = 9093
DEFAULT_RUNTIME_PORT = 9101
DEFAULT_CONNECTION = "fedfer"
NODE_NAME = SCHOOL_ID   # a school node's name becomes its school-id: one rule for both (shared_models/config.py)
CONNECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")   # a TOML table name in Flower's config.toml
WILDCARD_BINDS = ("0.0.0.0", "::", "")   # a SuperLink bound to these listens on every interface
HERE = "$HERE"   # placeholder for the script's own directory in generated scripts
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def port_problem(port: Any) -> str | None:
    """Why `port` is not a TCP port number (None when it is one)."""
    if isinstance(port, bool) or not isinstance(port, int):
        return f"must be an integer, got {port!r:.40}"
    if not 1 <= port <= 65535:
        return f"must be in 1..65535, got {port}"
    return None


class LayoutError(ValueError):
    """The deployment directory or its manifest is missing, malformed or inconsistent."""


@dataclass
class NodeEntry:
    name: str
    role: str                          # school | evaluator
    runtime_port: int
    node_config: dict[str, Any]
    node_id: int | None = None         # Flower's id once registered with the SuperLink
    fingerprint: str = ""              # SHA256 of the SuperNode auth public key
    auth_key: str = ""                 # the private key's path on the school's machine when the school made it
                                       # (`fedfer deploy school-key`); "": `supernode` in the node folder, made here
    status: str = "created"            # created | registered | revoked
    revoked: list[dict[str, Any]] = field(default_factory=list)   # earlier keys: node_id, fingerprint, at


@dataclass
class Deployment:
    root: Path
    coordinator: str
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    sans: list[str] = field(default_factory=list)
    connection: str = DEFAULT_CONNECTION
    insecure: bool = False
    executor: str = "warm"            # warm | flower (Flower's one-process-per-message default)
    idle_poll: float = 0.5            # SuperNode poll via client/runtime/supernode.py; 0: Flower's own 3 s / 0.5 s
    reply_poll: float = 0.05          # the SuperNode checks its own state for the reply: no request
    pull_hold: float = 2.0            # SuperLink via server/held_pulls.py: an empty pull waits for a message; 0: Flower's
    nodes: dict[str, NodeEntry] = field(default_factory=dict)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def coordinator_dir(self) -> Path:
        return self.root / "coordinator"

    @property
    def superlink_cert(self) -> Path:
        return self.coordinator_dir / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.coordinator_dir / "superlink.key"

    @property
    def keyring(self) -> Path:
        return self.root / "keys"

    def node_dir(self, name: str) -> Path:
        return self.root / "nodes" / name

    @property
    def superlink_address(self) -> str:
        """What SuperNodes dial (host:port; IPv6 literals bracketed)."""
        host = f"[{self.coordinator}]" if ":" in self.coordinator else self.coordinator
        return f"{host}:{self.port}"

    @property
    def local_host(self) -> str:
        """The address the coordinator's own tools dial: loopback (which the certificate always covers)
        when the SuperLink listens on every interface or on loopback; else the one address it is bound
        to (`init --bind ADDRESS`, which `init` adds to the certificate's names)."""
        if self.bind == "::1":
            return "::1"
        if self.bind in WILDCARD_BINDS or self.bind in ("127.0.0.1", "localhost"):
            return "127.0.0.1"
        return self.bind

    @property
    def local_address(self) -> str:
        """What the coordinator's own Flower CLI dials (host:port; IPv6 literals bracketed)."""
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        return f"{host}:{self.port}"

    # -- manifest --------------------------------------------------------------------------------
    def save(self) -> None:
        data = {"version": MANIFEST_VERSION, **{k: v for k, v in asdict(self).items() if k not in ("root", "nodes")},
                "nodes": {name: asdict(entry) for name, entry in sorted(self.nodes.items())}}
        write_public(self.root / MANIFEST, (json.dumps(data, indent=2) + "\n").encode())

    @classmethod
    def load(cls, root: Path) -> "Deployment":
        root = Path(root)
        path = root / MANIFEST
        if root.exists() and not root.is_dir():
            raise LayoutError(f"{root}: not a directory (--dir names the deployment directory)")
        try:
            if path.exists() and not path.is_file():
                raise LayoutError(f"{path}: not a regular file")
            raw = path.read_bytes()[: MAX_MANIFEST_BYTES + 1]
        except FileNotFoundError:
            raise LayoutError(f"{path}: no deployment here; run `fedfer deploy init --coordinator HOST --dir {root}` first") from None
        except OSError as exc:
            raise LayoutError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise LayoutError(f"{path}: larger than {MAX_MANIFEST_BYTES // 1024 // 1024} MiB; not a deployment manifest")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise LayoutError(f"{path}: not UTF-8 text (byte {exc.start}); not a deployment manifest") from None
        except json.JSONDecodeError as exc:
            raise LayoutError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
        except RecursionError:
            raise LayoutError(f"{path}: nested too deeply; not a deployment manifest") from None
        if not isinstance(data, dict):
            raise LayoutError(f"{path}: expected a JSON object, got {type(data).__name__}")
        if data.get("version") != MANIFEST_VERSION:
            raise LayoutError(f"{path}: field 'version' is {data.get('version')!r:.40}, expected {MANIFEST_VERSION}")
        nodes_data = data.pop("nodes", {})
        if not isinstance(nodes_data, dict):
            raise LayoutError(f"{path}: field 'nodes' must be an object of node name -> entry")
        try:
            nodes = {name: NodeEntry(**entry) for name, entry in nodes_data.items()}
            data.pop("version")
            dep = cls(root=root, nodes=nodes, **data)
        except TypeError as exc:
            raise LayoutError(f"{path}: unexpected or missing field ({exc})") from None
        problem = dep.problem()
        if problem:
            raise LayoutError(f"{path}: {problem}")
        return dep

    def problem(self) -> str | None:
        """The first field of the manifest with a wrong type or value (None: all fine)."""
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v: Any) -> bool:
            return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

        if not isinstance(self.coordinator, str) or not self.coordinator:
            return "field 'coordinator' must be a host name"
        if port_problem(self.port):
            return f"field 'port': {port_problem(self.port)}"
        if not isinstance(self.bind, str) or not isinstance(self.connection, str) or not CONNECTION.match(self.connection):
            return "fields 'bind' and 'connection' must be strings (connection: letters, digits, '_', '-')"
        if not isinstance(self.sans, list) or not all(isinstance(n, str) for n in self.sans):
            return "field 'sans' must be a list of host names"
        if not isinstance(self.insecure, bool):
            return "field 'insecure' must be true or false"
        if self.executor not in ("warm", "flower"):
            return f"field 'executor' must be 'warm' or 'flower', got {self.executor!r:.40}"
        for key in ("idle_poll", "reply_poll", "pull_hold"):
            if not is_number(getattr(self, key)) or getattr(self, key) < 0:
                return f"field '{key}' must be a finite number >= 0"
        for name, entry in self.nodes.items():
            where = f"node {name!r:.70}"
            if not NODE_NAME.match(name) or entry.name != name:
                return f"{where}: a node name must match its entry's 'name' (1-64 letters, digits, '.', '_', '-')"
            if entry.role not in ("school", "evaluator"):
                return f"{where}: field 'role' must be 'school' or 'evaluator'"
            if port_problem(entry.runtime_port):
                return f"{where}: field 'runtime_port': {port_problem(entry.runtime_port)}"
            if not isinstance(entry.node_config, dict) or not all(
                    isinstance(k, str) and (isinstance(v, (str, bool)) or is_number(v)) for k, v in entry.node_config.items()):
                return f"{where}: field 'node_config' must map keys to strings, booleans or finite numbers"
            if entry.node_id is not None and not is_int(entry.node_id):
                return f"{where}: field 'node_id' must be an integer or null"
            if not isinstance(entry.fingerprint, str) or entry.status not in ("created", "registered", "revoked"):
                return f"{where}: fields 'fingerprint' (string) and 'status' (created|registered|revoked) are malformed"
            if not isinstance(entry.auth_key, str) or (entry.auth_key and not Path(entry.auth_key).is_absolute()):
                return f"{where}: field 'auth_key' must be an absolute path or empty"
            if not isinstance(entry.revoked, list) or not all(isinstance(r, dict) for r in entry.revoked):
                return f"{where}: field 'revoked' must be a list of objects"
        return None

    def next_runtime_port(self) -> int:
        used = {entry.runtime_port for entry in self.nodes.values()}
        port = DEFAULT_RUNTIME_PORT
        while port in used or port == self.port:
            port += 1
        return port

    def node(self, name: str) -> NodeEntry:
        if name not in self.nodes:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise LayoutError(f"no node named {name!r} in {self.root / MANIFEST} (known: {known})")
        return self.nodes[name]


def check_node_name(name: str) -> str:
    if not NODE_NAME.match(name):
        raise LayoutError(f"node name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


# ------------------------------------------------------------------------------------ node-config
def school_node_config(name: str, data_dir: Path, state_dir: Path, policy: Any) -> dict[str, Any]:
    """The node-config contract with client/app.py (client/node.py:identify): identity, folders and the
    school's privacy policy (privacy/policy.py: unit, delta, budget, max-round-epsilon, declared size)."""
    config: dict[str, Any] = {"role": "school", "school-id": name, "data-dir": str(data_dir), "state-dir": str(state_dir)}
    config.update(policy.to_mapping())
    return config


def evaluator_node_config(benchmarks: Iterable[str], data_dir: Path | None = None) -> dict[str, Any]:
    specs = [b.strip() for b in benchmarks if b.strip()]
    if not specs:
        raise LayoutError("evaluator: give at least one --benchmark NAME=PATH (or NAME for a built-in synthetic one)")
    for spec in specs:
        if "," in spec or " " in spec.split("=", 1)[0]:
            raise LayoutError(f"evaluator: benchmark spec {spec!r} must be NAME or NAME=PATH, one per --benchmark")
    config: dict[str, Any] = {"role": "evaluator", "benchmarks": ",".join(specs)}
    if data_dir is not None:
        config["data-dir"] = str(data_dir)
    return config


def write_node_config(path: Path, config: dict[str, Any]) -> None:
    """node-config.toml: Flower reads a single .toml path given to --node-config."""
    lines = ["# SuperNode node-config, read by fedfer's ClientApp (client/node.py). Generated by `fedfer deploy`;",
             "# edit data-dir / state-dir if this folder moves to another path on the school's machine."]
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):   # json.dumps would write Infinity/NaN: not TOML
            raise LayoutError(f"{path}: node-config '{key}' must be a finite number, got {value}")
        if not re.match(r"^[A-Za-z0-9_-]+$", key):
            raise LayoutError(f"{path}: node-config key {key!r} is not a TOML bare key")
        if isinstance(value, str) and (not value.isprintable() or not _utf8(value)):
            raise LayoutError(f"{path}: node-config '{key}' contains a control or undecodable character")
        lines.append(f"{key} = {json.dumps(value)}")   # JSON strings/finite numbers are valid TOML values
    text = "\n".join(lines) + "\n"
    import tomllib

    if tomllib.loads(text) != config:   # what the SuperNode will read back, checked before it is written
        raise LayoutError(f"{path}: node-config would not read back as written")
    write_public(path, text.encode())


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ------------------------------------------------------------------------------------ commands
def superlink_command(dep: Deployment, here: str | None = None) -> list[str]:
    """flower-superlink for this deployment. here=HERE: for the script; None: real paths."""
    from server.processes import superlink_argv

    base = dep.coordinator_dir
    p = (lambda rel: Path(f"{HERE}/{rel}")) if here == HERE else (lambda rel: base / rel)  # noqa: E731
    return superlink_argv(host=dep.bind, port=dep.port, database=p("superlink.db"), ca_cert=p("ca.crt"),
                          cert=p("superlink.crt"), key=p("superlink.key"), insecure=dep.insecure, node_auth=True,
                          log_file=p("superlink.log"), hold=dep.pull_hold)


def node_commands(dep: Deployment, name: str, here: str | None = None, superlink: str | None = None) -> list[list[str]]:
    """The processes of one node: the SuperNode, and (executor=warm) its warm ClientApp executor."""
    from server.processes import supernode_argv, warm_executor_argv

    entry = dep.node(name)
    base = dep.node_dir(name)
    p = (lambda rel: Path(f"{HERE}/{rel}")) if here == HERE else (lambda rel: base / rel)  # noqa: E731
    warm = dep.executor == "warm"
    node = supernode_argv(
        superlink=superlink or dep.superlink_address, runtime_port=entry.runtime_port,
        node_config=p("node-config.toml"),
        root_certificates=None if dep.insecure else p("ca.crt"),
        auth_key=None if dep.insecure else Path(entry.auth_key) if entry.auth_key else p("supernode"),
        insecure=dep.insecure,
        isolation="process" if warm else "subprocess",
        poll=(dep.idle_poll, dep.reply_poll) if warm and dep.idle_poll > 0 else None,
        superexec_secret=p("superexec.secret") if warm else None)
    commands = [node]
    if warm:
        commands.append(warm_executor_argv(runtime_port=entry.runtime_port, superexec_secret=p("superexec.secret")))
    return commands


def _shell_word(word: str) -> str:
    if word.startswith(HERE):
        return '"' + word.replace('"', '\\"') + '"'
    if word == sys.executable:
        return '"$PYTHON"'
    return shlex.quote(word)


def _shell_line(argv: list[str]) -> str:
    """One option (with its value) per line, for a readable script."""
    groups: list[str] = []
    i = 0
    while i < len(argv):
        word = _shell_word(argv[i])
        if argv[i].startswith("-") and argv[i] != "--" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            word += " " + _shell_word(argv[i + 1])
            i += 1
        groups.append(word)
        i += 1
    return " \\\n    ".join(groups)


_SCRIPT_HEAD = """#!/usr/bin/env bash
# {title}
# Generated by `fedfer deploy`; regenerate (`fedfer deploy scripts`) rather than edit. Paths are relative to this folder.
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
PYTHON="${{FEDFER_PYTHON:-{python}}}"          # the Python environment with fedfer installed
export PATH="$(dirname "$PYTHON"):$PATH"
export FLWR_HOME="$HERE/flwr_home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \\
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
{malloc}
"""


def _head(title: str) -> str:
    from server.processes import MALLOC_ENV

    malloc = ("# glibc: keep DP-SGD's per-sample buffers instead of unmapping them every step\nexport "
              + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()))
    return _SCRIPT_HEAD.format(title=title, python=sys.executable, malloc=malloc)


def flower_args(argv: list[str]) -> list[str]:
    """The arguments Flower itself gets from a start command: after `--` when a fedfer launcher wraps it."""
    return argv[argv.index("--") + 1:] if argv[0] == sys.executable and "--" in argv else argv[1:]


def _preflight(module: str, argv: list[str], what: str) -> str:
    """The script's first command: check what the process needs before anything starts (exit 2 with one line
    naming the file or key; `set -e` then stops the script)."""
    return f"# {what}\n" + _shell_line([sys.executable, "-m", module, "--", *flower_args(argv)]) + "\n"


def superlink_script(dep: Deployment) -> str:
    argv = superlink_command(dep, HERE)
    check = _preflight("server.deploy.preflight", argv, "Check the certificate and key files first (one line naming a "
                       "missing or unusable one).")
    if argv[0].endswith("flower-superlink"):
        argv[0] = "flower-superlink"
    # The ServerApp writes its runs (run.root, default runs/) and the anchors in runs/anchors/ relative to the
    # SuperLink's working folder: always this one, as under `fedfer deploy up`, so that a start from another
    # folder cannot split the anchors between two places.
    return _head("fedfer coordinator: the Flower SuperLink") + 'cd "$HERE"\n' + check + (
        "exec " + _shell_line(argv) + "\n")


def node_script(dep: Deployment, name: str) -> str:
    entry = dep.node(name)
    commands = node_commands(dep, name, HERE)
    head = _head(f"fedfer {entry.role} node '{name}': its Flower SuperNode") + _preflight(
        "client.runtime.preflight", commands[0], "Check the certificate, keys, node-config.toml and the folders it "
        "names before anything starts (one line naming the file or key).")
    if len(commands) == 1:
        argv = commands[0]
        if argv[0].endswith("flower-supernode"):
            argv[0] = "flower-supernode"
        return head + "exec " + _shell_line(argv) + "\n"
    node, executor = commands
    if node[0] == sys.executable and "client.runtime.supernode" in node:   # checked just above: not again
        node.insert(node.index("client.runtime.supernode") + 1, "--checked")
    return head + (
        "# The SuperNode (Flower, shorter poll) and the warm executor that runs its ClientApp tasks.\n"
        + _shell_line(node) + " &\nNODE=$!\n"
        + _shell_line(executor) + " &\nEXEC=$!\n"
        + "trap 'kill $NODE $EXEC 2>/dev/null || true; wait' INT TERM EXIT\n"
        + "wait -n $NODE $EXEC   # when either stops, stop the other (the trap)\n")


def write_script(path: Path, text: str) -> None:
    write_public(path, text.encode(), mode=0o755)

