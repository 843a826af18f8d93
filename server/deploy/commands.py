"""The work behind `fedfer deploy …` (fedfer/commands/deploy.py parses arguments and prints): make
the CA and certificates, add, register, revoke and rotate nodes, report status. Functions, so tests
and the deployment benchmark call them directly. Secure by default: TLS (own CA, EC P-384) and
SuperNode authentication (ECDSA P-384 node keys registered with `flwr supernode register`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from shared_models.wording import one_line

if TYPE_CHECKING:   # cryptography is imported where a key is handled: `fedfer deploy --help` stays fast
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

INSECURE_WARNING = ("WARNING: --insecure: no TLS and no SuperNode authentication. Model updates travel in clear "
                    "text and any machine that reaches the SuperLink can join the federation. Use only on a "
                    "closed test network.")


class DeployError(RuntimeError):
    """A deploy command cannot proceed; the message names the file, node or command."""


# ------------------------------------------------------------------------------------ helpers
def check_target_dir(path: Path, what: str) -> None:
    """`path` will be created or written into: refuse it, before anything is written, if it (or the
    nearest existing folder above it) is not a writable directory."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise DeployError(f"{what} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise DeployError(f"{what} {path}: not writable")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DeployError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DeployError(f"{what} {path}: {parent} is not writable")


def check_port(port: int | None, what: str) -> None:
    from server.deploy.layout import port_problem

    if port is not None and (problem := port_problem(port)):
        raise DeployError(f"{what} {problem}")


def check_flwr_home(flwr_home: Path) -> None:
    """Flower's CLI home must be a directory whose config.toml (if any) is a TOML file Flower can extend."""
    import tomllib

    check_target_dir(flwr_home, "--flwr-home")
    config = Path(flwr_home) / "config.toml"
    if config.exists():
        if not config.is_file():
            raise DeployError(f"{config}: not a regular file")
        try:
            tomllib.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise DeployError(f"{config}: not a readable TOML file ({' '.join(str(exc).split())[:120]})") from None


def check_connection_free(flwr_home: Path, connection: str, root: Path) -> None:
    """A Flower CLI connection of that name that trusts another deployment's CA belongs to that deployment:
    repointing it in silence would send the other deployment's `register`, `status` and `flwr run` here."""
    import tomllib

    config = Path(flwr_home) / "config.toml"
    if not config.is_file():
        return
    entry = tomllib.loads(config.read_text(encoding="utf-8")).get("superlink", {}).get(connection)
    if not isinstance(entry, dict):
        return
    trusted = entry.get("root-certificates")
    if trusted and Path(str(trusted)).resolve() != (root / "ca" / "ca.crt").resolve():
        raise DeployError(f"{config}: Flower CLI connection '{connection}' belongs to another deployment (it trusts "
                          f"{trusted}); name this one with --connection NAME, or pass --force to repoint it")


def check_text(value: str, what: str) -> None:
    """A name or path that ends up in TOML, a shell script and one-line messages: printable, valid UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DeployError(f"{what} {value!r:.80}: not valid UTF-8") from None
    if not value.isprintable() or len(value) > 4096:
        raise DeployError(f"{what} {value!r:.80}: contains a control character or is too long")


def default_flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def write_cli_connection(dep: "Deployment", flwr_home: Path) -> Path:
    """Add `[superlink.<connection>]` to `<flwr_home>/config.toml` with Flower's own writer."""
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    conn = (SuperLinkConnection(dep.connection, address=dep.local_address, insecure=True) if dep.insecure else
            SuperLinkConnection(dep.connection, address=dep.local_address, root_certificates=str(dep.ca_cert.resolve())))
    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)   # Flower resolves its config file from FLWR_HOME
    try:
        flwr_home.mkdir(parents=True, exist_ok=True)
        write_superlink_connection(conn)
    finally:
        if previous is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = previous
    return flwr_home / "config.toml"


def superlink_running(dep: "Deployment") -> bool:
    from server.processes import port_open

    return port_open(dep.local_host, dep.port)


def _flwr_json(result: Any, what: str) -> dict[str, Any]:
    text = result.stdout
    start, end = text.find("{"), text.rfind("}")
    if result.returncode != 0 or start < 0:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raise DeployError(f"{what} failed (exit {result.returncode}): {lines[-1] if lines else 'no output'}")
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        raise DeployError(f"{what}: unexpected output: {text[-300:]}") from None


def register_command(dep: "Deployment", public_key: Path) -> list[str]:
    return ["flwr", "supernode", "register", str(public_key.resolve()), dep.connection]


def register_key(dep: "Deployment", public_key: Path, flwr_home: Path) -> int:
    """`flwr supernode register <pub> <connection>` → the node id Flower assigned."""
    from server.processes import run_flwr

    result = run_flwr(["supernode", "register", str(public_key.resolve()), dep.connection, "--format", "json"],
                      flwr_home=flwr_home, timeout=60)
    data = _flwr_json(result, f"flwr supernode register {public_key}")
    if not data.get("success") or "node-id" not in data:   # Flower's reason is the last line of its message
        lines = [line.strip() for line in str(data.get("error-message") or data).splitlines() if line.strip()]
        raise DeployError(f"flwr supernode register {public_key}: {lines[-1] if lines else data}")
    return int(data["node-id"])


def unregister_node(dep: "Deployment", node_id: int, flwr_home: Path) -> None:
    from server.processes import run_flwr

    result = run_flwr(["supernode", "unregister", str(node_id), dep.connection, "--format", "json"],
                      flwr_home=flwr_home, timeout=60)
    _flwr_json(result, f"flwr supernode unregister {node_id}")


def list_nodes(dep: "Deployment", flwr_home: Path) -> dict[int, dict[str, Any]]:
    """Flower's view of the registered nodes: node id → {status: online|offline|registered|…}."""
    from server.processes import run_flwr

    result = run_flwr(["supernode", "list", dep.connection, "--format", "json"], flwr_home=flwr_home, timeout=60)
    data = _flwr_json(result, "flwr supernode list")
    return {int(n["node-id"]): n for n in data.get("nodes", [])}


# ------------------------------------------------------------------------------------ operations
def init_deployment(root: Path, coordinator: str, sans: Iterable[str] = (), *, port: int | None = None,
                    bind: str | None = None, connection: str | None = None, insecure: bool = False,
                    executor: str = "warm", flwr_home: Path | None = None, force: bool = False) -> "Deployment":
    """Create the CA, the SuperLink certificate, the coordinator start script and the CLI connection."""
    from server.deploy import credentials as cred
    from server.deploy.layout import (CONNECTION, DEFAULT_CONNECTION, DEFAULT_PORT, MANIFEST, Deployment,
                                      superlink_script, write_script)

    root = Path(root).resolve()
    # every check comes before the first write: a refused init leaves the disk as it was
    check_target_dir(root, "--dir")
    if (root / MANIFEST).exists() and not force:
        raise DeployError(f"{root / MANIFEST} exists; a new CA would invalidate every school's folder "
                          "(use --force to start over)")
    from server.deploy.layout import WILDCARD_BINDS

    # validates every name, adds loopback; a SuperLink bound to one address is dialled there by this
    # machine's own tools too, so the certificate names it
    names = cred.san_names([coordinator, *sans, *([bind] if bind and bind not in WILDCARD_BINDS else [])])
    if executor not in ("warm", "flower"):
        raise DeployError(f"--executor must be 'warm' or 'flower', got {executor!r}")
    check_port(port, "--port")
    if bind is not None:
        cred.classify_name(bind)                          # an address or host name, nothing a shell would read
    if connection is not None and not CONNECTION.match(connection):
        raise DeployError(f"--connection {connection!r:.80}: use 1-64 letters, digits, '_' or '-'")
    for sub in ("ca", "coordinator", "keys", "nodes"):
        check_target_dir(root / sub, "--dir")
    check_flwr_home(flwr_home or default_flwr_home())
    if not force:
        check_connection_free(flwr_home or default_flwr_home(), connection or DEFAULT_CONNECTION, root)
    loopback = coordinator in ("localhost", "127.0.0.1", "::1")
    dep = Deployment(root=root, coordinator=coordinator, port=port or DEFAULT_PORT,
                     bind=bind or ("127.0.0.1" if loopback else "0.0.0.0"), sans=names,
                     connection=connection or DEFAULT_CONNECTION, insecure=insecure, executor=executor)
    for sub in ("ca", "coordinator", "keys", "nodes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if not insecure:
        ca_key, ca_cert = cred.create_ca(f"fedfer CA for {coordinator}")
        cred.write_private(dep.ca_key, cred.pem_private_key(ca_key))
        cred.write_public(dep.ca_cert, cred.pem_certificate(ca_cert))
        key, cert = cred.issue_server_certificate(ca_key, ca_cert, names)
        cred.write_private(dep.superlink_key, cred.pem_private_key(key))
        cred.write_public(dep.superlink_cert, cred.pem_certificate(cert))
        cred.write_public(dep.coordinator_dir / "ca.crt", cred.pem_certificate(ca_cert))
    dep.save()
    write_script(dep.coordinator_dir / "start-superlink.sh", superlink_script(dep))
    write_cli_connection(dep, flwr_home or default_flwr_home())
    return dep


def renew_certificate(root: Path, extra_sans: Iterable[str] = ()) -> "Deployment":
    """A new SuperLink certificate from the existing CA (more names, or before expiry); the nodes keep
    trusting it because they trust the CA. Restart the SuperLink afterwards."""
    from server.deploy import credentials as cred
    from server.deploy.layout import Deployment

    dep = Deployment.load(Path(root).resolve())
    if dep.insecure:
        raise DeployError("insecure deployment: there is no certificate")
    if problem := cred.private_file_problem(dep.ca_key):
        raise DeployError(f"the CA key is needed to renew: {problem}")
    ca_key, ca_cert = cred.load_ec_private_key(dep.ca_key), cred.load_certificate(dep.ca_cert)
    dep.sans = cred.san_names([*dep.sans, *extra_sans])
    key, cert = cred.issue_server_certificate(ca_key, ca_cert, dep.sans)
    cred.write_private(dep.superlink_key, cred.pem_private_key(key))
    cred.write_public(dep.superlink_cert, cred.pem_certificate(cert))
    dep.save()
    return dep


def _try_register(dep: "Deployment", entry: "NodeEntry", public_key: Path, flwr_home: Path | None) -> str:
    """Register now if the SuperLink answers; otherwise say how to do it later."""
    if dep.insecure:
        entry.status = "created"
        return "insecure deployment: no node registration (any SuperNode may connect)"
    if flwr_home is not None and superlink_running(dep):
        entry.node_id = register_key(dep, public_key, flwr_home)
        entry.status = "registered"
        return f"registered with the SuperLink as node {entry.node_id}"
    entry.status = "created"
    # the one-machine trial never runs `register`: say that `up` does it, or a new admin stops here to do it by hand
    return ("the SuperLink is not running; `fedfer deploy up` registers this node when it starts it; with "
            "start-superlink.sh instead, once it runs:\n"
            f"    fedfer deploy register {entry.name} --dir {dep.root}\n"
            "  (which runs and records: " + shlex.join(register_command(dep, public_key)) + ")")


def _count_units(data_dir: Path, unit: str) -> int | None:
    """Students (or still frames) listed in a school's labels.csv, if the folder is on this machine and the
    school's own reader can read it (shared_models/datasets/school_folder.py)."""
    from shared_models.datasets.school_folder import SchoolDataError, still_frame_rows

    try:
        rows = still_frame_rows(data_dir)
    except (OSError, SchoolDataError):
        return None
    if unit == "student":
        return len({(r.get("student_id") or "").strip() for r in rows} - {""}) or None
    return len(rows) or None


def school_policy(name: str, data_dir: Path, *, unit: str | None = None, delta: float | None = None,
                  budget: float | None = None, max_round_epsilon: float | None = None,
                  declared: int | None = None) -> Any:
    """The school's privacy policy for its node-config: given values, else fedfer's defaults (privacy.*);
    the declared size, if not given, is the count in its labels.csv rounded to two significant figures."""
    from privacy.policy import PolicyError, declared_size_bucket, make_policy
    from shared_models.config import defaults

    base = defaults()
    unit = unit or str(base["privacy.unit"])
    if declared is None:
        count = _count_units(data_dir, unit)
        if count is None:
            flag = "--declared-students" if unit == "student" else "--declared-images"
            raise DeployError(f"school {name}: {flag} is required ({data_dir}/labels.csv is not readable here "
                              f"to propose one); it is the public size the school declares")
        declared = declared_size_bucket(count)
    try:
        return make_policy(unit=unit, delta=float(base["privacy.delta"] if delta is None else delta),
                           budget=float(base["privacy.budget"] if budget is None else budget),
                           max_round_epsilon=float(base["privacy.max_round_epsilon"] if max_round_epsilon is None
                                                   else max_round_epsilon),
                           declared_units=int(declared), source=f"school {name}")
    except PolicyError as exc:
        raise DeployError(str(exc)) from None


def add_node(root: Path, name: str, role: str, *, data_dir: Path | None = None, state_dir: Path | None = None,
             budget: float | None = None, benchmarks: Iterable[str] = (), runtime_port: int | None = None,
             flwr_home: Path | None = None, unit: str | None = None, delta: float | None = None,
             max_round_epsilon: float | None = None, declared: int | None = None,
             ledger_key: Path | None = None, node_key: Path | None = None) -> tuple["Deployment", str]:
    """Create a node folder (keys, node-config with the school's privacy policy, start script), keyring
    entry and registration. `ledger_key` / `node_key`: the public halves of the ledger signing key and the
    SuperNode key the school made itself (`fedfer deploy school-key`, both in its `state_dir`); without
    them the keys are made here, in the node folder, and the coordinator must delete that folder once it is
    copied to the school."""
    from server.deploy import credentials as cred
    from server.deploy.layout import Deployment, NodeEntry, node_script, write_script

    dep = Deployment.load(Path(root).resolve())
    # every check comes before the first write: a refused command leaves the deployment as it was
    _check_new_node(dep, name, budget=budget, runtime_port=runtime_port, paths=(data_dir, state_dir))
    ledger_pem, node_public = _schools_own_keys(dep, name, role, state_dir=state_dir, ledger_key=ledger_key,
                                                node_key=node_key)
    folder = dep.node_dir(name)
    config = _node_config(name, role, folder, data_dir=data_dir, state_dir=state_dir, benchmarks=benchmarks,
                          ledger_key_made_here=ledger_pem is None, unit=unit, delta=delta, budget=budget,
                          max_round_epsilon=max_round_epsilon, declared=declared)
    port = _free_runtime_port(dep, runtime_port)
    for path, what in ((folder, "node folder"), (dep.keyring, "keyring")):
        check_target_dir(path, what)
    ca_pem = b""
    if not dep.insecure:
        cred.load_certificate(dep.ca_cert)        # present and a certificate, before the node folder exists
        ca_pem = dep.ca_cert.read_bytes()

    entry = NodeEntry(name=name, role=role, runtime_port=port, node_config=config)
    made = _write_node_files(dep, entry, folder, ca_pem=ca_pem, node_public=node_public, state_dir=state_dir,
                             ledger_pem=ledger_pem)
    dep.nodes[name] = entry
    message = _register_or_remove(dep, entry, folder, flwr_home, made)
    dep.save()
    write_script(folder / "start.sh", node_script(dep, name))
    return dep, message


def _check_new_node(dep: "Deployment", name: str, *, budget: float | None, runtime_port: int | None,
                    paths: Iterable[Path | None]) -> None:
    """The node's name, budget, runtime port and folder paths, refused before anything is written."""
    from privacy.policy import epsilon_problem
    from server.deploy.layout import check_node_name

    check_node_name(name)
    if name in dep.nodes:
        raise DeployError(f"node {name!r} already exists in {dep.root}; use `fedfer deploy rotate {name}` for new keys")
    if budget is not None and (problem := epsilon_problem(budget)) is not None:
        raise DeployError(f"school {name}: --budget {problem}")
    check_port(runtime_port, f"{name}: --runtime-port")
    if runtime_port is not None and runtime_port == dep.port:
        raise DeployError(f"{name}: --runtime-port {runtime_port} is the SuperLink's port")
    for path in paths:
        if path is not None:
            check_text(str(path), f"{name}:")


def _schools_own_keys(dep: "Deployment", name: str, role: str, *, state_dir: Path | None,
                      ledger_key: Path | None, node_key: Path | None) -> tuple[str | None, str | None]:
    """The public halves of the keys a school made itself (`fedfer deploy school-key`), checked: its ledger
    key's PEM and its SuperNode key; None for a key fedfer is to make here."""
    ledger_pem = None
    if ledger_key is not None:
        if role != "school":
            raise DeployError(f"{name}: --ledger-key is a school's")
        if state_dir is None:
            raise DeployError(f"school {name}: --ledger-key needs --state-dir, the folder on the school's machine "
                              "that holds the signing key (`fedfer deploy school-key --state-dir DIR` made both)")
        if not Path(state_dir).expanduser().is_absolute():   # it is a path there: resolved here it names another folder
            raise DeployError(f"school {name}: --state-dir {state_dir}: give its absolute path on the school's machine "
                              "(`fedfer deploy school-key` prints it)")
        ledger_pem = _school_ledger_key(Path(ledger_key), name)
    node_public = None
    if node_key is not None:
        if role != "school":
            raise DeployError(f"{name}: --node-key is a school's (the evaluation node's key is made here)")
        if dep.insecure:
            raise DeployError(f"school {name}: --node-key: an insecure deployment has no node authentication")
        if state_dir is None or ledger_key is None:
            raise DeployError(f"school {name}: --node-key needs --ledger-key and --state-dir, the two public keys "
                              "`fedfer deploy school-key --state-dir DIR` made at the school and that folder")
        node_public = _school_node_key(Path(node_key), name)
    return ledger_pem, node_public


def _node_config(name: str, role: str, folder: Path, *, data_dir: Path | None, state_dir: Path | None,
                 benchmarks: Iterable[str], ledger_key_made_here: bool, **policy: Any) -> dict[str, Any]:
    """The node-config: a school's identity, folders and privacy policy (`school_policy`, given `policy`: its
    unit, delta, budget, max_round_epsilon and declared size), or the evaluation node's benchmarks."""
    from server.deploy.layout import evaluator_node_config, school_node_config

    if role != "school":
        return evaluator_node_config(benchmarks, Path(data_dir).expanduser().absolute() if data_dir else None)
    if data_dir is None:
        raise DeployError(f"school {name}: --data-dir is required")
    state = Path(state_dir) if state_dir else folder / "state"
    if ledger_key_made_here:   # its folder must be writable here
        check_target_dir(state.expanduser(), f"school {name}: --state-dir")
    school = school_policy(name, Path(data_dir).expanduser(), **policy)
    return school_node_config(name, Path(data_dir).expanduser().absolute(), state.expanduser().absolute(), school)


def _free_runtime_port(dep: "Deployment", runtime_port: int | None) -> int:
    """The port asked for, else the next one no node of the deployment uses; refused if another node has it."""
    port = runtime_port or dep.next_runtime_port()
    if any(e.runtime_port == port for e in dep.nodes.values()):
        raise DeployError(f"runtime port {port} is already used by another node of {dep.root}")
    return port


def _write_node_files(dep: "Deployment", entry: "NodeEntry", folder: Path, *, ca_pem: bytes, node_public: str | None,
                      state_dir: Path | None, ledger_pem: str | None) -> list[Path]:
    """The node folder (CA certificate, SuperNode key, SuperExec secret, node-config) and, for a school, its
    ledger key in the keyring. Returns what did not exist before, for `_register_or_remove` to undo."""
    from server.deploy import credentials as cred
    from server.deploy.layout import write_node_config

    made = [] if folder.exists() else [folder]
    folder.mkdir(parents=True, exist_ok=True)
    if not dep.insecure:
        cred.write_public(folder / "ca.crt", ca_pem)
        if node_public is not None:   # the school's own key: only its public half is here, for registration
            cred.write_public(folder / "supernode.pub", (node_public + "\n").encode())
            entry.fingerprint = cred.openssh_fingerprint(node_public)
            entry.auth_key = str((Path(str(state_dir)).expanduser() / cred.NODE_KEY_FILE).absolute())
        else:
            entry.fingerprint = cred.create_node_key(folder, cred.NODE_KEY_FILE, comment=f"fedfer-{entry.name}").fingerprint
    cred.write_private(folder / "superexec.secret", secrets.token_hex(32).encode())
    write_node_config(folder / "node-config.toml", entry.node_config)
    if entry.role == "school":
        pem = ledger_pem if ledger_pem is not None else cred.ledger_public_key_pem(Path(entry.node_config["state-dir"]))
        made += [] if (dep.keyring / f"{entry.name}.pub").exists() else [dep.keyring / f"{entry.name}.pub"]
        cred.write_public(dep.keyring / f"{entry.name}.pub", pem.encode())
    return made


def _register_or_remove(dep: "Deployment", entry: "NodeEntry", folder: Path, flwr_home: Path | None,
                        made: list[Path]) -> str:
    """Register the node (`_try_register`); if that fails, remove what `_write_node_files` made."""
    try:
        return _try_register(dep, entry, folder / "supernode.pub", flwr_home)
    except BaseException:   # e.g. the SuperLink refuses a key already in use: leave no node folder, and no ledger
        for path in made:   # key in the keyring (the server would trust it) for a node the manifest does not list
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        raise


def _school_ledger_key(path: Path, name: str) -> str:
    """The PEM of a school's own ledger verification key (an Ed25519 public key), checked."""
    from privacy.signing import SigningKeyError, load_public_key, public_key_pem

    if not path.is_file():
        raise DeployError(f"school {name}: --ledger-key {path}: not a file (the school's {path.name or 'signing_key.pub'} "
                          "from `fedfer deploy school-key`)")
    try:
        return public_key_pem(load_public_key(path))
    except SigningKeyError as exc:
        raise DeployError(f"school {name}: --ledger-key {' '.join(str(exc).split())}") from None


def _school_node_key(path: Path, name: str) -> str:
    """The one-line OpenSSH public half of a SuperNode key the school made itself, checked."""
    from server.deploy import credentials as cred

    if not path.is_file():
        raise DeployError(f"school {name}: --node-key {path}: not a file (the school's {cred.NODE_KEY_FILE}.pub "
                          "from `fedfer deploy school-key`)")
    try:
        return cred.load_node_public_key(path)
    except cred.CredentialError as exc:
        raise DeployError(f"school {name}: --node-key {' '.join(str(exc).split())}") from None


@dataclass(frozen=True)
class SchoolKeys:
    """What `fedfer deploy school-key` made (or found) at the school: the two public halves to send."""

    ledger_public: Path      # Ed25519: the coordinator verifies the school's ledger with it
    ledger_key_id: str
    node_public: Path        # ECDSA P-384 (OpenSSH): the SuperLink admits the school's SuperNode with it
    node_fingerprint: str
    new_node_key: bool       # the SuperNode key was made (or replaced) now


def make_school_keys(state_dir: Path, *, new_node_key: bool = False) -> SchoolKeys:
    """At the school: its ledger signing key and its SuperNode key in `state_dir` (each made once, 0600; existing
    ones are kept unless `new_node_key` asks for a new SuperNode key, for `fedfer deploy rotate --node-key`).
    Only the public halves leave the school: a coordinator holding the signing key could sign ledger entries
    in the school's name, and with the node key it could connect as the school."""
    from privacy.signing import PUBLIC_KEY_FILE, SigningKeyError, key_id, load_or_create_signing_key
    from server.deploy import credentials as cred

    state_dir = Path(state_dir).expanduser()
    check_target_dir(state_dir, "--state-dir")
    if not state_dir.exists():   # the school's keys, ledger and accountant: its own user's only
        state_dir.mkdir(parents=True, mode=0o700)
    try:
        key = load_or_create_signing_key(state_dir)
    except SigningKeyError as exc:
        raise DeployError(one_line(exc)) from None
    public = state_dir / PUBLIC_KEY_FILE   # load_or_create_signing_key wrote it again if it was missing
    node_private = state_dir / cred.NODE_KEY_FILE
    made = new_node_key or not node_private.exists()
    try:
        if made:
            for suffix in ("", ".pub"):   # the old key is kept until the coordinator has rotated: a node that
                old = state_dir / f"{cred.NODE_KEY_FILE}{suffix}"   # must restart before then still needs it
                if old.exists():
                    os.replace(old, state_dir / f"{cred.NODE_KEY_FILE}.old{suffix}")
            node = cred.create_node_key(state_dir, cred.NODE_KEY_FILE, comment="fedfer-school")
        else:
            node = cred.load_node_key(node_private)
            if not node.public_path.is_file():
                cred.write_public(node.public_path, (node.public_openssh + "\n").encode())
    except cred.CredentialError as exc:
        raise DeployError(one_line(exc)) from None
    return SchoolKeys(public, key_id(key), node.public_path, node.fingerprint, made)


def ledger_school_name(entries: Sequence[Mapping[str, Any]]) -> str:
    """The school's name as its ledger records it (its school-id, which is the coordinator's node NAME), for a
    command printed for the coordinator; "" with no ledger, or a name no node could have (it would not paste)."""
    from shared_models.config import SCHOOL_ID

    name = entries[0].get("school_id") if entries else None
    return name if isinstance(name, str) and SCHOOL_ID.fullmatch(name) else ""


@dataclass(frozen=True)
class LedgerKeyRotation:
    """What `fedfer deploy school-key --new-ledger-key` did at the school."""

    public: Path             # signing_key.pub, the new key's public half: the coordinator's keyring gets it
    old_key_id: str
    new_key_id: str
    transition_line: int     # the ledger line of the key transition (0: no ledger yet, the key was just replaced)
    school: str = ""         # the school's name as its ledger records it (the coordinator's NAME); "" with no ledger


def rotate_school_ledger_key(state_dir: Path) -> LedgerKeyRotation:
    """At the school: a new ledger signing key, handed the chain by a key transition the old key signs, so
    the ledger (and its lifetime ε) goes on under the new key. Order: the new key is written beside the old
    one, the transition appended, then the new key replaces the old. A crash at any point is finished by
    running it again (the staged key is reused; a ledger that already names it only needs the swap)."""
    from privacy.ledger import KEY_TRANSITION, LEDGER_FILE, LedgerError, SchoolLedger, read_ledger_file, verify_entries
    from privacy.signing import (NEW_PUBLIC_KEY_FILE, PUBLIC_KEY_FILE, SIGNING_KEY_FILE, SigningKeyError,
                                 install_new_signing_key, key_id, load_or_create_signing_key, retire_public_key,
                                 retired_public_keys, stage_new_signing_key)

    state_dir = Path(state_dir).expanduser()
    key_file = state_dir / SIGNING_KEY_FILE
    if os.path.lexists(key_file) and not key_file.is_file():
        raise DeployError(f"{key_file}: not a regular file (a directory, a pipe or a broken link): restore the "
                          f"school's signing key from a backup")
    if not key_file.is_file():
        raise DeployError(f"--state-dir {state_dir}: no {SIGNING_KEY_FILE} to rotate: only the key in force can hand "
                          f"the ledger to a new one (a school makes its first key with `fedfer deploy school-key "
                          f"--state-dir DIR`)")
    try:
        marker = state_dir / NEW_PUBLIC_KEY_FILE   # left by a rotation killed between its two swaps
        marked = marker.is_file()
        old = load_or_create_signing_key(state_dir)   # finishes such an install: the marker is gone if it named this key
        ledger_path = state_dir / LEDGER_FILE
        entries = read_ledger_file(ledger_path) if os.path.lexists(ledger_path) else []   # a broken link: refused
        # the key the ledger is in force under, trusting the school's own key: it is the school's ledger
        trusted = [old.public_key()] + retired_public_keys(state_dir / PUBLIC_KEY_FILE)   # its retired keys too
        keys = verify_entries(entries, trusted, source=str(ledger_path)) if entries else None
        if marked and not marker.exists() and entries and entries[-1]["event"] == KEY_TRANSITION \
                and entries[-1]["new_key_id"] == key_id(old):
            # asked again after a rotation killed between its swaps: it was complete but for signing_key.pub
            # (which the load above wrote); report it rather than hand the ledger to yet another key
            return LedgerKeyRotation(state_dir / PUBLIC_KEY_FILE, str(entries[-1]["key_id"]), key_id(old), len(entries),
                                     ledger_school_name(entries))
        new = stage_new_signing_key(state_dir)
        line = 0
        if keys is not None and keys.keys[-1] != key_id(new):   # not already handed over by an interrupted run
            ledger = SchoolLedger(state_dir, str(entries[0]["school_id"]), old)
            ledger.rotate_key(new)
            line = len(ledger.entries)
        elif keys is not None:
            line = keys.transitions[-1][0]
        if entries:   # its own ledger starts under it: SchoolLedger trusts it as retired
            retire_public_key(state_dir / PUBLIC_KEY_FILE, old)
        install_new_signing_key(state_dir)
    except (LedgerError, SigningKeyError) as exc:
        raise DeployError(one_line(exc)) from None
    return LedgerKeyRotation(state_dir / PUBLIC_KEY_FILE, key_id(old), key_id(new), line,
                             ledger_school_name(entries))


@dataclass(frozen=True)
class LedgerKeyRecovery:
    """What `fedfer deploy school-key --recover-ledger-key` did at the school."""

    public: Path             # signing_key.pub, the new key's public half: the coordinator approves it
    lost_key_id: str
    new_key_id: str
    recovery_line: int       # the ledger line of the key recovery
    epsilon: float           # the ε it carries on
    school: str              # the school's name as its ledger records it (the coordinator's NAME), or ""


def recover_school_ledger_key(state_dir: Path, lost_public: Path | None = None) -> LedgerKeyRecovery:
    """At the school whose ledger key is LOST: a new key continues its ledger by a key recovery the new key signs
    (the lost key cannot sign a transition), so the lifetime ε and the budget guard run on. Refused while the
    key is at hand (then rotation is the tool). `lost_public`: the lost key's public half (default the state
    folder's signing_key.pub). Order: every check first (bad input changes nothing), then the new key is staged,
    the lost key kept as retired and the new one as approved (the ledger verifies with them), the recovery
    appended and the new key installed. A crash at any point is finished by running it again."""
    from privacy.ledger import LEDGER_FILE, LedgerError, SchoolLedger, read_ledger_file, verify_entries
    from privacy.signing import (NEW_SIGNING_KEY_FILE, PUBLIC_KEY_FILE, SIGNING_KEY_FILE, SigningKeyError,
                                 approve_recovery_key, install_new_signing_key, key_id, load_or_create_signing_key,
                                 load_public_key, recovery_public_keys, retire_public_key, retired_public_keys,
                                 stage_new_signing_key)

    state_dir = Path(state_dir).expanduser()
    public_file = state_dir / PUBLIC_KEY_FILE
    key_file, ledger_path = state_dir / SIGNING_KEY_FILE, state_dir / LEDGER_FILE
    try:
        if key_file.exists():
            in_force = load_or_create_signing_key(state_dir)   # raises if it is unreadable: say so rather than guess
            finished = _interrupted_recovery(state_dir, in_force)
            if finished is not None:   # it crashed after the key swap: the recovery is done, say so again
                return finished
            raise DeployError(f"--state-dir {state_dir}: {key_file} is there and readable, so the key is not lost: "
                              f"hand the ledger to a new key with `fedfer deploy school-key --state-dir {state_dir} "
                              f"--new-ledger-key`")
        if os.path.lexists(ledger_path) and not ledger_path.is_file():   # said as "no ledger" before
            raise DeployError(f"--state-dir {state_dir}: {ledger_path} is not a regular file (a directory, a named "
                              f"pipe or a broken link): put the school's ledger.jsonl back there")
        if not ledger_path.is_file() or ledger_path.stat().st_size == 0:
            raise DeployError(f"--state-dir {state_dir}: no {LEDGER_FILE}, so no chain to continue (seeding one from "
                              f"the coordinator's run copies is not supported; a school that never trained makes a "
                              f"new key with `fedfer deploy school-key --state-dir {state_dir}`)")
        lost_file = Path(lost_public).expanduser() if lost_public else public_file
        if not lost_file.is_file():
            raise DeployError(f"--state-dir {state_dir}: no {lost_file.name}, the lost key's public half: give it with "
                              f"--lost-key PATH (the coordinator's keys/NAME.pub holds it)")
        lost = load_public_key(lost_file)
        entries = read_ledger_file(ledger_path)
        # a key that signed no entry, and that no key transition handed the ledger to, is the wrong file, not a
        # broken chain: say so before the chain check, whose message (a chain "never through the current key")
        # blamed the ledger for a wrong --lost-key. A key handed over to and lost before it signed anything is
        # the right one (the chain check below verifies the hand-over)
        signers = list(dict.fromkeys(str(e.get("key_id")) for e in entries if isinstance(e, dict)))
        handed_to = {str(e.get("new_key_id")) for e in entries if isinstance(e, dict) and "new_key_id" in e}
        if key_id(lost) not in signers and key_id(lost) not in handed_to:
            raise DeployError(f"{lost_file}: key {key_id(lost)} signed no entry of {ledger_path} (its entries are "
                              f"signed by {', '.join(signers[:4])}): it is not the lost key; give the lost key's "
                              f"public half with --lost-key PATH (the coordinator's keys/NAME.pub holds it)")
        # the school's own ledger, checked as it stands: under the lost key, or already recovered to the staged key
        keys = verify_entries(entries, [lost] + retired_public_keys(public_file), source=str(ledger_path),
                              recovery_keys=recovery_public_keys(public_file))
        staged = state_dir / NEW_SIGNING_KEY_FILE
        staged_id = key_id(stage_new_signing_key(state_dir)) if staged.exists() else None
        if keys.keys[-1] not in (key_id(lost), staged_id):
            raise DeployError(f"{ledger_path}: its chain ends under key {keys.keys[-1]}, not under the lost key "
                              f"{key_id(lost)} from {lost_file}: give the lost key's public half with --lost-key PATH")
        new = stage_new_signing_key(state_dir)
        if keys.keys[-1] == key_id(lost):   # not already recovered by an interrupted run
            retire_public_key(public_file, lost)   # the chain starts under it (or under a key it retired)
            approve_recovery_key(public_file, new)
            SchoolLedger.recover(state_dir, str(entries[0]["school_id"]), lost, new)
        install_new_signing_key(state_dir)
        entries = read_ledger_file(ledger_path)
    except (LedgerError, SigningKeyError) as exc:
        raise DeployError(one_line(exc)) from None
    line, recovery = next((n, e) for n, e in reversed(list(enumerate(entries, start=1)))
                          if e["event"] == "key-recovery")
    return LedgerKeyRecovery(public_file, key_id(lost), key_id(new), line,
                             float("inf") if recovery["epsilon"] == "inf" else float(recovery["epsilon"]),
                             ledger_school_name(entries))


def _interrupted_recovery(state_dir: Path, in_force: Ed25519PrivateKey) -> LedgerKeyRecovery | None:
    """The recovery a `--recover-ledger-key` killed after swapping the new key in had finished, or None.

    Its last step (privacy/signing.py install_new_signing_key) puts the new key in signing_key.pem; killed
    there, running the command again found a readable key and refused it as 'not lost'. It is this state
    only if the ledger ends with a key recovery to exactly the key in force and verifies with the school's
    kept keys; anything else (a key at hand, rounds trained since) is left to the refusal."""
    from privacy.ledger import KEY_RECOVERY, LEDGER_FILE, read_ledger_file, verify_entries
    from privacy.signing import PUBLIC_KEY_FILE, key_id, recovery_public_keys, retired_public_keys

    ledger_path, public_file = state_dir / LEDGER_FILE, state_dir / PUBLIC_KEY_FILE
    if not ledger_path.is_file():
        return None
    entries = read_ledger_file(ledger_path)
    last = entries[-1] if entries else {}
    if last.get("event") != KEY_RECOVERY or last.get("new_key_id") != key_id(in_force):
        return None
    verify_entries(entries, [in_force.public_key()] + retired_public_keys(public_file), source=str(ledger_path),
                   recovery_keys=recovery_public_keys(public_file))
    epsilon = float("inf") if last["epsilon"] == "inf" else float(last["epsilon"])
    return LedgerKeyRecovery(public_file, str(last["old_key_id"]), key_id(in_force), len(entries), epsilon,
                             ledger_school_name(entries))


def rotate_ledger_key(root: Path, name: str, ledger_key: Path, *, recovered: bool = False) -> str:
    """At the coordinator: the keyring (`keys/<school>.pub`) gets the school's new ledger key, and the one it
    replaces is kept as a retired key (`keys/<school>.retired/<key id>.pub`): the school's chain starts under
    it, and a verifier trusts only the start keys it holds (never one the ledger names). `recovered`: the school
    LOST the replaced key (`school-key --recover-ledger-key`); the admin approves the new key as its recovery
    key (`keys/<school>.recovered/<key id>.pub`), without which no verifier accepts its key recovery."""
    from privacy.signing import approve_recovery_key, key_id, load_public_key, retire_public_key, retired_dir
    from server.deploy import credentials as cred
    from server.deploy.layout import Deployment

    dep = Deployment.load(Path(root).resolve())
    entry = dep.node(name)
    if entry.role != "school":
        raise DeployError(f"{name} is the {entry.role} node: only a school has a ledger key")
    pem = _school_ledger_key(Path(ledger_key), name)
    path = dep.keyring / f"{name}.pub"
    # lexists: a keyring key that cannot be read (a pipe, a broken link) is refused, not replaced unretired
    old_key = load_public_key(path) if os.path.lexists(path) else None
    old = key_id(old_key) if old_key is not None else "none"
    if old == key_id(load_public_key(pem)) and recovered:   # a plain rotate came first: add only the approval
        approved = approve_recovery_key(path, load_public_key(pem))
        return (f"{name}: ledger key {old} is already current in {path}; now approved as its recovery key in "
                f"{approved.parent}: the server accepts the school's key recovery with its next reply")
    if old == key_id(load_public_key(pem)):
        raise DeployError(f"school {name}: --ledger-key {ledger_key} is already its ledger key ({old}) in {path}: "
                          f"send the signing_key.pub that `fedfer deploy school-key --new-ledger-key` printed")
    if recovered and old_key is None:
        raise DeployError(f"school {name}: --recovered: {path} holds no ledger key, so there is no chain to recover")
    if os.path.lexists(retired_dir(path)) and not retired_dir(path).is_dir():
        raise DeployError(f"{retired_dir(path)}: not a directory (it keeps the school's retired ledger keys)")
    if old_key is not None:
        retired = retire_public_key(path, old_key)
    if recovered:   # approved before the key is current: a crash in between leaves the old keyring working
        approved = approve_recovery_key(path, load_public_key(pem))
    cred.write_public(path, pem.encode())
    if recovered:
        return (f"{name}: ledger key {old} (lost) → {key_id(load_public_key(pem))} in {path}, approved as its "
                f"recovery key in {approved.parent}; the lost key is kept in {retired.parent}. The server accepts the "
                f"school's key recovery with its next reply if it continues the last entry the server verified; "
                f"`fedfer privacy audit --keys {dep.keyring}` follows it")
    kept = f"; the retired key is kept in {retired.parent}" if old != "none" else ""
    return (f"{name}: ledger key {old} → {key_id(load_public_key(pem))} in {path}{kept}. The server accepts the "
            f"school's key transition with its next reply; `fedfer privacy audit --keys {dep.keyring}` follows it")


def set_school_budget(root: Path, name: str, budget: float) -> str:
    """At the coordinator: record a school's new lifetime ε budget. The budget is the school's own policy: the
    node enforces the one in its node-config.toml (edited at the school, read at start); the coordinator keeps
    a copy in deployment.json, which the audit reads once the node folder has gone to the school. Without this
    the audit held a school that raised its budget to the old one (and called it over budget)."""
    from privacy.policy import PolicyError, SchoolPolicy
    from server.deploy.layout import Deployment, write_node_config

    dep = Deployment.load(Path(root).resolve())
    entry = dep.node(name)
    if entry.role != "school":
        raise DeployError(f"{name} is the {entry.role} node: only a school has a privacy budget")
    config = {**entry.node_config, "budget": float(budget)}
    try:   # the same checks the node makes at start (a finite budget > 0, …), before anything is written
        SchoolPolicy.from_mapping(config, f"school {name}: budget")
    except PolicyError as exc:
        raise DeployError(str(exc)) from None
    old = entry.node_config.get("budget")
    entry.node_config = config
    written = [str(dep.root / "deployment.json")]
    node_config = dep.node_dir(name) / "node-config.toml"
    if node_config.is_file():   # the node folder is still here (a one-machine trial, or not yet sent)
        write_node_config(node_config, config)
        written.append(str(node_config))
    dep.save()
    override = dep.keyring / f"{name}.policy.json"
    note = (f" NOTE: {override} overrides it for the audit: set its budget too." if override.is_file() else "")
    # the running node still enforces the old budget: a run asking for more is declined (policy-violation,
    # privacy.budget) until the node starts again, which a trial under `deploy up` otherwise learns the hard way
    if node_config.is_file():
        restart = (f"The node reads its policy at start: start {dep.node_dir(name) / 'start.sh'} again (under "
                   f"`fedfer deploy up`: stop it and start it again)")
    else:
        restart = (f"At the school: set budget = {float(budget):g} in its node-config.toml and start its start.sh "
                   f"again (the node reads its policy at start)")
    return (f"school {name}: budget {old:g} → {float(budget):g} in {', '.join(written)}. {restart}; until then it "
            f"declines a run asking for more than {old:g} (policy-violation, privacy.budget). A run keeps to the "
            f"tighter of the school's budget and its own privacy.budget (-c privacy.budget=…).{note}")


def rewrite_start_scripts(root: Path) -> tuple[list[Path], list[str]]:
    """Write the coordinator's start-superlink.sh and the start.sh of every node folder still here again, from
    deployment.json with the fedfer installed now. The scripts say "regenerate rather than edit", and a fix in
    them (e.g. the SuperLink now runs in its own folder) reaches a deployment made earlier only this way.
    Returns (the scripts written, the nodes whose folder is no longer here: they went to their schools)."""
    from server.deploy.layout import Deployment, node_script, superlink_script, write_script

    dep = Deployment.load(Path(root).resolve())
    written = [dep.coordinator_dir / "start-superlink.sh"]
    write_script(written[0], superlink_script(dep))
    gone = []
    for name in sorted(dep.nodes):
        folder = dep.node_dir(name)
        if folder.is_dir():
            write_script(folder / "start.sh", node_script(dep, name))
            written.append(folder / "start.sh")
        else:
            gone.append(name)
    return written, gone


def register_pending(root: Path, name: str, flwr_home: Path) -> str:
    """Register a node created while the SuperLink was down (status 'created')."""
    from server.deploy.layout import Deployment

    dep = Deployment.load(Path(root).resolve())
    entry = dep.node(name)
    if entry.status == "registered":
        return f"{name} is already registered as node {entry.node_id}"
    if entry.status == "revoked":
        raise DeployError(f"{name} is revoked; give it a new key with `fedfer deploy rotate {name}`")
    if dep.insecure:
        return "insecure deployment: no node registration"
    if not superlink_running(dep):
        raise DeployError(f"the SuperLink is not running on {dep.local_address}; start "
                          f"{dep.coordinator_dir / 'start-superlink.sh'} first")
    entry.node_id = register_key(dep, dep.node_dir(name) / "supernode.pub", flwr_home)
    entry.status = "registered"
    dep.save()
    return f"{name}: registered as node {entry.node_id}"


def revoke_node(root: Path, name: str, flwr_home: Path) -> str:
    """Unregister the node's key at the SuperLink; the SuperLink refuses it from then on."""
    from server.deploy.layout import Deployment

    dep = Deployment.load(Path(root).resolve())
    entry = dep.node(name)
    if dep.insecure:
        raise DeployError("insecure deployment: there is no node authentication to revoke (re-init without --insecure)")
    if entry.status == "revoked":
        return f"{name} is already revoked"
    if entry.node_id is None:
        raise DeployError(f"{name} was never registered (no node id in {dep.root / 'deployment.json'}); nothing to revoke")
    if not superlink_running(dep):
        raise DeployError(f"the SuperLink is not running on {dep.local_address}; start it, then retry "
                          f"(or run: flwr supernode unregister {entry.node_id} {dep.connection})")
    unregister_node(dep, entry.node_id, flwr_home)
    entry.revoked.append({"node_id": entry.node_id, "fingerprint": entry.fingerprint,
                          "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    entry.status, entry.node_id = "revoked", None
    dep.save()
    return f"{name}: node unregistered; the SuperLink refuses its key from now on"


def rotate_node(root: Path, name: str, flwr_home: Path, node_key: Path | None = None) -> str:
    """New SuperNode key: register the new one, then unregister the old one, then swap the files. `node_key`:
    the public half of the new key a school made itself (`fedfer deploy school-key --new-node-key`)."""
    from server.deploy import credentials as cred
    from server.deploy.layout import Deployment

    dep = Deployment.load(Path(root).resolve())
    entry = dep.node(name)
    if dep.insecure:
        raise DeployError("insecure deployment: nodes have no keys to rotate")
    if entry.auth_key and node_key is None:
        raise DeployError(f"{name}'s SuperNode key is the school's own ({entry.auth_key} on its machine): the school "
                          f"makes a new one with `fedfer deploy school-key --state-dir DIR --new-node-key` and sends "
                          f"its supernode.pub; then `fedfer deploy rotate {name} --node-key supernode.pub`")
    if node_key is not None and not entry.auth_key:
        raise DeployError(f"{name}'s SuperNode key was made here: rotate it without --node-key")
    new_public = _school_node_key(Path(node_key), name) if node_key is not None else None
    if not superlink_running(dep):
        raise DeployError(f"the SuperLink is not running on {dep.local_address}; rotation needs it (register new, unregister old)")
    folder = dep.node_dir(name)
    if new_public is not None:
        new = cred.NodeKey(folder / "supernode.new", folder / "supernode.new.pub", new_public,
                           cred.openssh_fingerprint(new_public))
        cred.write_public(new.public_path, (new_public + "\n").encode())
    else:
        new = cred.create_node_key(folder, "supernode.new", comment=f"fedfer-{name}")
    try:
        new_id = register_key(dep, new.public_path, flwr_home)
    except BaseException:
        new.private_path.unlink(missing_ok=True)
        new.public_path.unlink(missing_ok=True)
        raise
    old_id, old_fp = entry.node_id, entry.fingerprint
    if old_id is not None:
        unregister_node(dep, old_id, flwr_home)
        entry.revoked.append({"node_id": old_id, "fingerprint": old_fp,
                              "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    if new_public is None:
        os.replace(new.private_path, folder / cred.NODE_KEY_FILE)
    os.replace(new.public_path, folder / f"{cred.NODE_KEY_FILE}.pub")
    entry.node_id, entry.fingerprint, entry.status = new_id, new.fingerprint, "registered"
    dep.save()
    # nothing records how the node runs: at a site its start.sh starts it again, while in a one-machine trial
    # `fedfer deploy up` stops every process once the old key's SuperNode stops, so the trial starts again whole
    trial = (f"in a one-machine trial under `fedfer deploy up` start that again instead (`fedfer deploy up --dir "
             f"{dep.root}`: it starts every node)")
    after = (f"The school starts its start.sh again: it reads the new key from its state folder; {trial}." if new_public
             is not None else f"Copy {folder}/supernode to the site and start its start.sh again; {trial}.")
    return (f"{name}: new key {new.fingerprint} registered as node {new_id}"
            # the SuperLink refuses the old key from now on: a SuperNode still running with it stops
            + (f"; old node {old_id} unregistered (a node still running with its key stops now)"
               if old_id is not None else "")
            + f". {after}")


def deployment_status(root: Path, flwr_home: Path | None) -> dict[str, Any]:
    """Credentials checks (files, modes, certificate validity and SANs) and, if the SuperLink runs,
    Flower's online/offline view of every registered node."""
    from server.deploy import credentials as cred
    from server.deploy.layout import Deployment

    dep = Deployment.load(Path(root).resolve())
    problems: list[str] = []
    info: dict[str, Any] = {"dir": str(dep.root), "coordinator": dep.superlink_address, "connection": dep.connection,
                            "insecure": dep.insecure, "executor": dep.executor, "superlink_running": superlink_running(dep)}
    if not dep.insecure:
        held_here = [dep.node_dir(n) / cred.NODE_KEY_FILE for n, e in dep.nodes.items() if not e.auth_key]
        for path in (dep.superlink_key, *held_here):
            if problem := cred.private_file_problem(path):
                problems.append(problem)
        try:
            ca = cred.load_certificate(dep.ca_cert)
            cert = cred.load_certificate(dep.superlink_cert)
            cred.verify_issued_by(cert, ca)
            info["certificate"] = {"sans": cred.certificate_sans(cert),
                                   "expires": cert.not_valid_after_utc.date().isoformat()}
            missing = [n for n in dep.sans if n not in info["certificate"]["sans"]]
            if missing:
                problems.append(f"{dep.superlink_cert}: SANs lack {', '.join(missing)}")
            if cert.not_valid_after_utc - _dt.datetime.now(_dt.timezone.utc) < _dt.timedelta(days=30):
                problems.append(f"{dep.superlink_cert}: expires {cert.not_valid_after_utc:%Y-%m-%d}")
        except cred.CredentialError as exc:
            problems.append(str(exc))
    flower: dict[int, dict[str, Any]] = {}
    if info["superlink_running"] and flwr_home is not None and not dep.insecure:
        try:
            flower = list_nodes(dep, flwr_home)
        except DeployError as exc:
            problems.append(str(exc))
    nodes = []
    for name, entry in sorted(dep.nodes.items()):
        row = {"name": name, "role": entry.role, "status": entry.status, "node_id": entry.node_id,
               "fingerprint": entry.fingerprint, "runtime_port": entry.runtime_port,
               "node_key": "school's own" if entry.auth_key else "made here"}
        if entry.node_id is not None and flower:
            row["flower"] = flower.get(entry.node_id, {}).get("status", "unknown")
        if entry.role == "school" and not (dep.keyring / f"{name}.pub").exists():
            problems.append(f"{dep.keyring / (name + '.pub')}: ledger key missing for school {name}")
        nodes.append(row)
    info["nodes"] = nodes
    info["problems"] = problems
    return info
