"""`fedfer deploy` without a running federation: credentials, files and modes, the node-config
contract with the ClientApp, generated commands, the process supervisor, the Flower tuning hooks.

The live federation (TLS, node authentication, 2 rounds with the real apps) is tests/test_deploy_e2e.py.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from server.deploy import credentials as cred
from server.deploy import commands as deploy_cli
from server.deploy.layout import Deployment, LayoutError, node_commands
from server.processes import Supervisor, _proc_stat, format_node_config

FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def fedfer(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "fedfer", "deploy", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True)
def _flower_env(monkeypatch, tmp_path):
    for key, value in FLWR_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))


# ------------------------------------------------------------------------------------ credentials
def test_superlink_certificate_has_sans_and_chains_to_the_ca():
    ca_key, ca = cred.create_ca()
    key, cert = cred.issue_server_certificate(ca_key, ca, ["fl.district.example", "10.0.0.5", "FL2.example"])
    cred.verify_issued_by(cert, ca)
    assert cred.certificate_sans(cert) == ["fl.district.example", "fl2.example", "localhost", "10.0.0.5", "127.0.0.1", "::1"]
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    other_key, other_ca = cred.create_ca("someone else")
    with pytest.raises(cred.CredentialError, match="not signed by the CA"):
        cred.verify_issued_by(cert, other_ca)


@pytest.mark.parametrize("bad", ["bad name", "-x.example", "a..b", "1.2.3.999", ""])
def test_bad_certificate_names_are_refused_by_name(bad):
    with pytest.raises(cred.CredentialError, match="neither a host name nor an IP address"):
        cred.san_names([bad])


def _tls_server(cert_file: Path, key_file: Path):
    """A one-connection TLS server on 127.0.0.1 with the SuperLink certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(10)

    def serve():
        for _ in range(4):
            try:
                conn, _ = sock.accept()
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


def test_tls_handshake_verifies_for_every_san_and_fails_for_a_foreign_ca(tmp_path):
    ca_key, ca = cred.create_ca()
    key, cert = cred.issue_server_certificate(ca_key, ca, ["coordinator.example"])
    cred.write_public(tmp_path / "ca.crt", cred.pem_certificate(ca))
    cred.write_public(tmp_path / "s.crt", cred.pem_certificate(cert))
    cred.write_private(tmp_path / "s.key", cred.pem_private_key(key))
    _, foreign = cred.create_ca("foreign")
    cred.write_public(tmp_path / "foreign.crt", cred.pem_certificate(foreign))
    sock, thread = _tls_server(tmp_path / "s.crt", tmp_path / "s.key")
    port = sock.getsockname()[1]
    results = {}
    for name, ca_file in (("localhost", "ca.crt"), ("127.0.0.1", "ca.crt"), ("coordinator.example", "ca.crt"),
                          ("localhost-foreign", "foreign.crt")):
        ctx = ssl.create_default_context(cafile=str(tmp_path / ca_file))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=name.replace("-foreign", "")) as tls:
                    tls.send(b"x")
            results[name] = True
        except ssl.SSLCertVerificationError:
            results[name] = False
    sock.close()
    thread.join(5)
    assert results == {"localhost": True, "127.0.0.1": True, "coordinator.example": True, "localhost-foreign": False}


def test_private_files_are_0600_even_when_they_existed_wider(tmp_path):
    path = tmp_path / "k"
    path.write_text("old")
    os.chmod(path, 0o644)
    old_umask = os.umask(0)
    try:
        cred.write_private(path, b"secret")
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600 and path.read_bytes() == b"secret"
    assert cred.private_file_problem(path) is None
    os.chmod(path, 0o640)
    assert "readable by group/others" in cred.private_file_problem(path)
    assert not list(tmp_path.glob(".k.tmp*"))


def test_node_key_is_flowers_openssh_p384_format(tmp_path):
    key = cred.create_node_key(tmp_path, "supernode", comment="fedfer-a")
    private = serialization.load_ssh_private_key(key.private_path.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert key.public_openssh.startswith("ecdsa-sha2-nistp384 ") and key.public_openssh.endswith(" fedfer-a")
    assert mode(key.private_path) == 0o600
    assert cred.load_node_public_key(key.public_path) == key.public_openssh
    assert cred.load_node_key(key.private_path).fingerprint == key.fingerprint
    # Flower's SuperNode derives the public key this way (flwr/supernode/start_client_internal.py)
    derived = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert key.public_openssh.startswith(derived.decode())


def test_wrong_node_keys_are_refused_with_the_file_name(tmp_path):
    ed = ed25519.Ed25519PrivateKey.generate()
    pub = tmp_path / "ed.pub"
    pub.write_bytes(ed.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(cred.CredentialError, match=r"ed\.pub: Flower SuperNode keys must be ecdsa-sha2-nistp384"):
        cred.load_node_public_key(pub)
    key = cred.create_node_key(tmp_path, "loose")
    os.chmod(key.private_path, 0o644)
    with pytest.raises(cred.CredentialError, match="loose: readable by group/others"):
        cred.load_node_key(key.private_path)


# ------------------------------------------------------------------------------------ deploy CLI
@pytest.fixture()
def deployment(tmp_path):
    home = tmp_path / "flwr_home"
    dep = deploy_cli.init_deployment(tmp_path / "deploy", "fl.district.example", ["10.0.0.5"], port=19093,
                                     flwr_home=home)
    return dep, home


def test_the_superlink_runs_in_the_coordinator_folder_wherever_its_script_is_started(deployment, tmp_path):
    """The ServerApp writes runs/ (and the anchors in runs/anchors/) relative to the SuperLink's folder: a
    start script run from the project folder once and from elsewhere the next time used to split them."""
    dep, _home = deployment
    seen = tmp_path / "cwd.txt"
    fake_python = tmp_path / "python"   # stands in for both of the script's commands: records where it ran
    fake_python.write_text(f'#!/usr/bin/env bash\npwd >> "{seen}"\n')
    fake_python.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(["bash", str(dep.coordinator_dir / "start-superlink.sh")], cwd=elsewhere,
                          env={**os.environ, "FEDFER_PYTHON": str(fake_python)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert seen.read_text().splitlines() == [str(dep.coordinator_dir.resolve())] * 2


def test_init_writes_ca_certificate_start_script_and_cli_connection(deployment):
    import tomllib

    dep, home = deployment
    for path in (dep.ca_key, dep.superlink_key):
        assert mode(path) == 0o600
    cert = cred.load_certificate(dep.superlink_cert)
    cred.verify_issued_by(cert, cred.load_certificate(dep.ca_cert))
    assert {"fl.district.example", "10.0.0.5", "localhost", "127.0.0.1"} <= set(cred.certificate_sans(cert))
    conn = tomllib.loads((home / "config.toml").read_text())["superlink"]["fedfer"]
    assert conn == {"address": "127.0.0.1:19093", "root-certificates": str(dep.ca_cert)}
    script = (dep.coordinator_dir / "start-superlink.sh").read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--database", "--host 0.0.0.0", "--port 19093"):
        assert flag in script
    assert "--insecure" not in script
    # Flower's SuperLink through the held-pull launcher (default 2 s); pull_hold 0: plain flower-superlink
    assert '"$PYTHON" -m server.held_pulls --hold 2.0 -- --host 0.0.0.0' in script.replace(" \\\n    ", " ")
    assert subprocess.run(["bash", "-n", str(dep.coordinator_dir / "start-superlink.sh")]).returncode == 0
    assert Deployment.load(dep.root).sans == dep.sans
    from server.deploy.layout import superlink_command, superlink_script

    dep.pull_hold = 0.0
    assert superlink_command(dep)[0].endswith("flower-superlink") and "server.held_pulls" not in superlink_script(dep)


def test_renew_cert_adds_names_and_keeps_the_ca(deployment):
    dep, home = deployment
    ca_before = dep.ca_cert.read_bytes()
    dep2 = deploy_cli.renew_certificate(dep.root, ["fl-backup.example"])
    cert = cred.load_certificate(dep2.superlink_cert)
    cred.verify_issued_by(cert, cred.load_certificate(dep.ca_cert))
    assert "fl-backup.example" in cred.certificate_sans(cert) and "fl.district.example" in cred.certificate_sans(cert)
    assert dep.ca_cert.read_bytes() == ca_before and mode(dep.superlink_key) == 0o600


def test_second_init_needs_force_and_errors_are_one_line(tmp_path, deployment):
    dep, home = deployment
    result = fedfer("init", "--coordinator", "x.example", "--dir", str(dep.root), cwd=tmp_path, home=home)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "deployment.json exists" in result.stderr
    result = fedfer("init", "--coordinator", "bad name", "--dir", str(tmp_path / "d2"), cwd=tmp_path, home=home)
    assert result.returncode == 2 and "'bad name' is neither a host name nor an IP address" in result.stderr


def test_add_school_matches_the_clientapp_node_config_contract(deployment, tmp_path):
    from flwr.common.config import parse_config_args

    from client.node import identify
    from privacy.signing import load_or_create_signing_key, public_key_pem
    from shared_models.config import load_config

    dep, home = deployment
    dep, message = deploy_cli.add_node(dep.root, "lincoln-high", "school", data_dir=tmp_path / "data" / "lincoln",
                                       budget=6.5, declared=1200, flwr_home=home)
    folder = dep.node_dir("lincoln-high")
    assert "SuperLink is not running" in message and "fedfer deploy register lincoln-high" in message
    assert "`fedfer deploy up` registers this node when it starts it" in message   # the trial runs no `register`
    assert f"flwr supernode register {folder / 'supernode.pub'} fedfer" in message
    # Flower reads the .toml given to --node-config; the ClientApp maps it to its identity
    node_config = parse_config_args([str(folder / "node-config.toml")])
    assert node_config == {"role": "school", "school-id": "lincoln-high", "data-dir": str(tmp_path / "data" / "lincoln"),
                           "state-dir": str(folder / "state"), "budget": 6.5, "unit": "student", "delta": 1e-5,
                           "max-round-epsilon": 8.0, "declared-students": 1200}
    ident = identify(node_config, load_config(None, []))
    assert (ident.role, ident.school_id, ident.policy.budget) == ("school", "lincoln-high", 6.5)
    assert (ident.policy.unit, ident.policy.delta, ident.policy.declared_units) == ("student", 1e-5, 1200)
    assert ident.state_dir == folder / "state" and not ident.simulated
    # ledger key: the coordinator's keyring holds the public half of the key the ClientApp signs with
    assert (dep.keyring / "lincoln-high.pub").read_text() == public_key_pem(load_or_create_signing_key(folder / "state"))
    assert mode(folder / "supernode") == 0o600 and mode(folder / "superexec.secret") == 0o600
    entry = dep.nodes["lincoln-high"]
    assert entry.status == "created" and entry.node_id is None and entry.fingerprint.startswith("SHA256:")
    script = (folder / "start.sh").read_text()
    for flag in ('--auth-supernode-private-key "$HERE/supernode"', '--root-certificates "$HERE/ca.crt"',
                 '--node-config "$HERE/node-config.toml"', "--isolation process", "--superlink fl.district.example:19093",
                 "-m client.runtime.warm_executor", "--runtime-api-address 127.0.0.1:9101", 'FLWR_HOME="$HERE/flwr_home"'):
        assert flag in script, flag
    assert subprocess.run(["bash", "-n", str(folder / "start.sh")]).returncode == 0


def test_a_school_can_keep_its_keys_to_itself(deployment, tmp_path, capsys, monkeypatch):
    """`fedfer deploy school-key` at the school, then `add-school --ledger-key --node-key`: the coordinator gets
    only the public halves; no private key of the school exists anywhere under the deployment (a coordinator
    holding the signing key could sign ledger entries in the school's name; with the SuperNode key it could
    connect as the school). The node's start script points at the key on the school's machine."""
    from client.runtime.preflight import check_auth_key
    from fedfer.cli import main
    from privacy.signing import load_or_create_signing_key, public_key_pem

    dep, home = deployment
    school_state = tmp_path / "school-machine" / "state"
    assert main(["deploy", "school-key", "--state-dir", str(school_state)]) == 0
    out = capsys.readouterr().out
    assert f"send {school_state / 'signing_key.pub'} and {school_state / 'supernode.pub'} to the coordinator" in out
    assert mode(school_state / "signing_key.pem") == 0o600 and mode(school_state / "supernode") == 0o600
    assert mode(school_state) == 0o700
    node_key = cred.load_node_key(school_state / "supernode")
    assert main(["deploy", "school-key", "--state-dir", str(school_state)]) == 0   # again: the same keys, kept
    assert "kept)" in capsys.readouterr().out
    assert cred.load_node_key(school_state / "supernode").fingerprint == node_key.fingerprint
    key = load_or_create_signing_key(school_state)
    assert main(["deploy", "add-school", "lincoln-high", "--data-dir", str(tmp_path / "data"), "--declared-students", "900",
                 "--ledger-key", str(school_state / "signing_key.pub"), "--node-key", str(school_state / "supernode.pub"),
                 "--state-dir", str(school_state), "--dir", str(dep.root), "--flwr-home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "signing key   the school's own" in out and f"node key      the school's own, {school_state / 'supernode'}" in out
    assert (dep.keyring / "lincoln-high.pub").read_text() == public_key_pem(key)
    assert not list(dep.root.rglob("signing_key.pem")) and not list(dep.root.rglob("supernode"))
    dep = Deployment.load(dep.root)
    entry = dep.node("lincoln-high")
    assert entry.fingerprint == node_key.fingerprint and entry.auth_key == str(school_state / "supernode")
    assert cred.load_node_public_key(dep.node_dir("lincoln-high") / "supernode.pub").split()[:2] == \
        node_key.public_openssh.split()[:2]
    argv = node_commands(dep, "lincoln-high")[0]
    auth = argv[argv.index("--auth-supernode-private-key") + 1]
    assert auth == str(school_state / "supernode")
    check_auth_key(Path(auth))                                   # what the node's start checks: present, 0600
    script = (dep.node_dir("lincoln-high") / "start.sh").read_text()
    assert f"--auth-supernode-private-key {school_state / 'supernode'}" in script
    info = deploy_cli.deployment_status(dep.root, None)
    assert info["problems"] == [] and info["nodes"][0]["node_key"] == "school's own"
    # rotation: a school-held key is rotated with the school's new public half, never made here
    with pytest.raises(deploy_cli.DeployError, match="the school's own .* --new-node-key"):
        deploy_cli.rotate_node(dep.root, "lincoln-high", home)
    assert main(["deploy", "school-key", "--state-dir", str(school_state), "--new-node-key"]) == 0
    out = capsys.readouterr().out
    assert "rotate NAME --node-key supernode.pub" in out and "start this node's start.sh again" in out
    assert "or in a one-machine trial `fedfer deploy up`" in " ".join(out.split()), out
    assert f"send {school_state / 'supernode.pub'} to the coordinator" in out and "signing_key.pub" not in out
    new_key = cred.load_node_key(school_state / "supernode")
    assert new_key.fingerprint != node_key.fingerprint
    # the old key stays until the coordinator has rotated (a node restarted before then still needs it)
    assert f"the previous key is kept as {school_state / 'supernode.old'}" in out
    assert cred.load_node_key(school_state / "supernode.old").fingerprint == node_key.fingerprint
    assert mode(school_state / "supernode.old") == 0o600 and (school_state / "supernode.old.pub").is_file()
    with pytest.raises(deploy_cli.DeployError, match="SuperLink is not running"):
        deploy_cli.rotate_node(dep.root, "lincoln-high", home, school_state / "supernode.pub")
    assert not list(dep.node_dir("lincoln-high").glob("supernode.new*"))
    # with the SuperLink up: the new public half registered, the old node unregistered, which stops a SuperNode
    # still running on the old key (Flower's 401): the message says so, and that the school starts it again
    monkeypatch.setattr(deploy_cli, "superlink_running", lambda _dep: True)
    monkeypatch.setattr(deploy_cli, "register_key", lambda _dep, public, _home: 4242)
    unregistered = []
    monkeypatch.setattr(deploy_cli, "unregister_node", lambda _dep, node_id, _home: unregistered.append(node_id))
    dep.nodes["lincoln-high"].node_id = 17   # as if registered at add-school
    dep.save()
    message = deploy_cli.rotate_node(dep.root, "lincoln-high", home, school_state / "supernode.pub")
    assert unregistered == [17]
    assert "old node 17 unregistered (a node still running with its key stops now)" in message
    assert "starts its start.sh again: it reads the new key from its state folder" in message
    # under `fedfer deploy up` the old key's stop ended the whole trial: the same line says to start that again
    assert f"`fedfer deploy up --dir {dep.root}`" in message and "\n" not in message, message
    entry = Deployment.load(dep.root).node("lincoln-high")
    assert (entry.node_id, entry.fingerprint, entry.auth_key) == (4242, new_key.fingerprint, str(school_state / "supernode"))
    assert not list(dep.root.rglob("supernode")) and not list(dep.node_dir("lincoln-high").glob("supernode.new*"))
    # a registration the SuperLink refuses (here: the key is already in use) leaves nothing behind: no node folder,
    # no ledger key in the keyring for a school the manifest does not list
    def refuse(_dep, public, _home):
        raise deploy_cli.DeployError(f"flwr supernode register {public}: [code: 23] Public key already in use.")

    monkeypatch.setattr(deploy_cli, "register_key", refuse)
    with pytest.raises(deploy_cli.DeployError, match="already in use"):
        deploy_cli.add_node(dep.root, "copycat", "school", data_dir=Path("/d/c"), declared=100, flwr_home=home,
                            state_dir=school_state, ledger_key=school_state / "signing_key.pub",
                            node_key=school_state / "supernode.pub")
    assert not dep.node_dir("copycat").exists() and not (dep.keyring / "copycat.pub").exists()
    assert "copycat" not in Deployment.load(dep.root).nodes
    monkeypatch.undo()
    # refused in one line: no --state-dir, a file that is not a key of the right kind, a missing file
    ledger = ["--ledger-key", str(school_state / "signing_key.pub"), "--state-dir", "/s"]
    (tmp_path / "junk.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    for extra, needle in ((["--ledger-key", str(school_state / "signing_key.pub")], "--ledger-key needs --state-dir"),
                          (["--ledger-key", str(school_state / "signing_key.pub"), "--state-dir", "state"],
                           "--state-dir state: give its absolute path on the school's machine"),
                          (["--ledger-key", str(tmp_path / "junk.pub"), "--state-dir", "/s"], "not a PEM public key"),
                          (["--ledger-key", str(tmp_path / "nope.pub"), "--state-dir", "/s"], "nope.pub: not a file"),
                          (["--node-key", str(school_state / "supernode.pub"), "--state-dir", "/s"],
                           "--node-key needs --ledger-key and --state-dir"),
                          (["--node-key", str(tmp_path / "junk.pub"), *ledger], "not an OpenSSH public key"),
                          (["--node-key", str(school_state / "signing_key.pub"), *ledger], "not an OpenSSH"),
                          (["--node-key", str(tmp_path / "nope.pub"), *ledger], "nope.pub: not a file")):
        assert main(["deploy", "add-school", "other", "--data-dir", "/d", "--declared-students", "100", *extra,
                     "--dir", str(dep.root), "--flwr-home", str(home)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not (dep.keyring / "other.pub").exists() and not dep.node_dir("other").exists()
    # a key made here is rotated here: --node-key is refused for it
    deploy_cli.add_node(dep.root, "a", "school", data_dir=Path("/d/a"), declared=100, flwr_home=home)
    with pytest.raises(deploy_cli.DeployError, match="made here: rotate it without --node-key"):
        deploy_cli.rotate_node(dep.root, "a", home, school_state / "supernode.pub")


def test_set_budget_records_a_schools_new_budget_where_the_audit_reads_it(deployment, capsys):
    """A school that raised its budget (its node-config.toml, at the school) was audited against the one in
    deployment.json once its node folder had gone to the school: "OVER BUDGET" for spending its own policy
    allows. `fedfer deploy set-budget` records the new one there (and in the node folder, while it is here)."""
    import shutil
    import tomllib

    from fedfer.cli import main
    from privacy.audit import school_policy

    dep, home = deployment
    deploy_cli.add_node(dep.root, "lincoln-high", "school", data_dir=Path("/d/l"), declared=100, budget=8.0,
                        flwr_home=home)
    folder = dep.node_dir("lincoln-high")
    assert main(["deploy", "set-budget", "lincoln-high", "24", "--dir", str(dep.root), "--flwr-home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "budget 8 → 24 in" in out and "node-config.toml" in out, out
    assert tomllib.loads((folder / "node-config.toml").read_text())["budget"] == 24.0
    shutil.rmtree(folder)   # the folder went to the school, as docs/deployment.md says
    policy, where = school_policy(dep.keyring, "lincoln-high")
    assert policy["budget"] == 24.0 and where.endswith("deployment.json (node lincoln-high)")
    # the node's own checks, in one line, and nothing written
    for bad, needle in (("0", "key 'budget' must be a finite ε > 0"), ("inf", "key 'budget' must be a finite ε > 0"),
                        ("1e300", "key 'budget' must be an ε of at most 1000")):
        assert main(["deploy", "set-budget", "lincoln-high", bad, "--dir", str(dep.root)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert school_policy(dep.keyring, "lincoln-high")[0]["budget"] == 24.0
    assert main(["deploy", "set-budget", "nobody", "24", "--dir", str(dep.root)]) == 2
    assert "no node named 'nobody'" in capsys.readouterr().err


def test_scripts_writes_the_start_scripts_again_with_this_fedfer(deployment, capsys):
    """The scripts say "regenerate rather than edit": `fedfer deploy scripts` does it, for the coordinator and
    every node folder still here, and names the nodes whose folder has gone to the school."""
    import shutil

    from fedfer.cli import main
    from server.deploy.layout import node_script, superlink_script

    dep, home = deployment
    for name in ("a", "b"):
        deploy_cli.add_node(dep.root, name, "school", data_dir=Path(f"/d/{name}"), declared=100, flwr_home=home)
    shutil.rmtree(dep.node_dir("b"))   # sent to its school
    superlink_sh, node_sh = dep.coordinator_dir / "start-superlink.sh", dep.node_dir("a") / "start.sh"
    for path in (superlink_sh, node_sh):
        path.write_text("#!/usr/bin/env bash\n# written by an earlier fedfer\n")
    assert main(["deploy", "scripts", "--dir", str(dep.root)]) == 0
    out = capsys.readouterr().out
    loaded = Deployment.load(dep.root)
    assert superlink_sh.read_text() == superlink_script(loaded) and node_sh.read_text() == node_script(loaded, "a")
    assert os.access(node_sh, os.X_OK) and not (dep.node_dir("b") / "start.sh").exists()
    assert f"wrote {node_sh}" in out and "not here (their folders went to the schools): b;" in out, out


def test_scripts_names_a_folder_in_a_scripts_place_not_its_temp_file(deployment, capsys):
    """Fuzzer (session 23): a folder where start.sh goes was refused as '…/.start.sh.x8k2.tmp: Is a directory',
    a temp file that no longer exists (shared_models/atomic_files.py named os.replace's source)."""
    from fedfer.cli import main

    dep, home = deployment
    deploy_cli.add_node(dep.root, "a", "school", data_dir=Path("/d/a"), declared=100, flwr_home=home)
    node_sh = dep.node_dir("a") / "start.sh"
    node_sh.unlink()
    node_sh.mkdir()
    (node_sh / "keep").write_text("keep")
    assert main(["deploy", "scripts", "--dir", str(dep.root)]) == 2
    err = capsys.readouterr().err
    assert err == f"fedfer deploy: {node_sh}: Is a directory\n", err
    assert [p.name for p in dep.node_dir("a").iterdir() if p.name.endswith(".tmp")] == []


def test_evaluator_node_config(deployment, tmp_path):
    from client.node import identify
    from flwr.common.config import parse_config_args
    from shared_models.config import load_config

    dep, home = deployment
    dep, _ = deploy_cli.add_node(dep.root, "evaluator", "evaluator", benchmarks=["fer2013=/srv/fer2013.csv", "rafdb=/srv/raf"],
                                 data_dir=tmp_path / "pub", flwr_home=home)
    config = parse_config_args([str(dep.node_dir("evaluator") / "node-config.toml")])
    assert config == {"role": "evaluator", "benchmarks": "fer2013=/srv/fer2013.csv,rafdb=/srv/raf", "data-dir": str(tmp_path / "pub")}
    ident = identify(config, load_config(None, []))
    assert ident.role == "evaluator" and ident.benchmarks == "fer2013=/srv/fer2013.csv,rafdb=/srv/raf"
    assert not (dep.keyring / "evaluator.pub").exists()
    assert dep.nodes["evaluator"].runtime_port == 9101


def test_adding_the_evaluator_says_how_to_declare_its_benchmarks_public(deployment, capsys):
    """Only benchmarks listed in evaluation.public_benchmarks choose the best round: the command that gives the
    evaluation node its benchmarks says so, with the run-config to use (names as the config spells them)."""
    from fedfer.cli import main

    dep, home = deployment
    assert main(["deploy", "evaluator", "--benchmark", "fer2013=/srv/fer2013.csv", "--benchmark", "RAF-DB:test=/srv/raf",
                 "--dir", str(dep.root), "--flwr-home", str(home)]) == 0
    assert ("  best round    only benchmarks declared public choose checkpoints/best.pt: if these hold public data only "
            "(never a school's faces), run with -c 'evaluation.public_benchmarks=\"fer2013,rafdb\"'\n") in capsys.readouterr().out


@pytest.mark.parametrize("name, kwargs, message", [
    ("bad/name", {"data_dir": Path("/d")}, "node name 'bad/name'"),
    ("ok", {}, "school ok: --data-dir is required"),
    ("ok", {"data_dir": Path("/d"), "budget": 0.0}, "school ok: --budget must be a finite ε > 0"),
    ("ok", {"data_dir": Path("/d")}, "school ok: --declared-students is required"),
    ("ok", {"data_dir": Path("/d"), "budget": float("inf"), "declared": 100}, "school ok: --budget must be a finite ε > 0"),
    ("ok", {"data_dir": Path("/d"), "budget": float("nan"), "declared": 100}, "school ok: --budget must be a finite ε > 0"),
    ("ok", {"data_dir": Path("/d"), "budget": 1e300, "declared": 100}, "school ok: --budget must be an ε of at most 1000"),
    ("ok", {"data_dir": Path("/d"), "max_round_epsilon": 1e4, "declared": 100},
     "school ok: key 'max-round-epsilon' must be an ε of at most 1000"),
    ("ok", {"data_dir": Path("/d"), "delta": 0.02, "declared": 100}, r"school ok: key 'delta' must be < 1/declared-students"),
    ("ok", {"data_dir": Path("/d"), "max_round_epsilon": -1.0, "declared": 100}, "school ok: key 'max-round-epsilon'"),
])
def test_add_school_rejects_bad_input(deployment, name, kwargs, message):
    dep, home = deployment
    with pytest.raises((deploy_cli.DeployError, LayoutError), match=message):
        deploy_cli.add_node(dep.root, name, "school", flwr_home=home, **kwargs)


def test_duplicate_names_and_ports_are_refused(deployment):
    dep, home = deployment
    deploy_cli.add_node(dep.root, "a", "school", data_dir=Path("/d/a"), declared=100, flwr_home=home)
    with pytest.raises(deploy_cli.DeployError, match="node 'a' already exists"):
        deploy_cli.add_node(dep.root, "a", "school", data_dir=Path("/d/a"), declared=100, flwr_home=home)
    with pytest.raises(deploy_cli.DeployError, match="runtime port 9101 is already used"):
        deploy_cli.add_node(dep.root, "b", "school", data_dir=Path("/d/b"), declared=100, runtime_port=9101, flwr_home=home)
    with pytest.raises(LayoutError, match="no node named 'zzz'.*known: a"):
        deploy_cli.revoke_node(dep.root, "zzz", home)


def test_insecure_is_explicit_and_loud(tmp_path):
    home = tmp_path / "home"
    result = fedfer("init", "--coordinator", "localhost", "--insecure", "--dir", "d", cwd=tmp_path, home=home)
    assert result.returncode == 0 and "WARNING: --insecure" in result.stderr
    dep = Deployment.load(tmp_path / "d")
    assert dep.insecure and not dep.ca_cert.exists() and dep.bind == "127.0.0.1"
    script = (dep.coordinator_dir / "start-superlink.sh").read_text()
    assert "--insecure" in script and "--enable-supernode-auth" not in script and "--ssl-" not in script
    dep, message = deploy_cli.add_node(dep.root, "s", "school", data_dir=tmp_path / "s", declared=100, flwr_home=home)
    assert "insecure deployment" in message
    node_argv = node_commands(dep, "s")[0]
    assert "--insecure" in node_argv and "--auth-supernode-private-key" not in node_argv
    assert "insecure = true" in (home / "config.toml").read_text()


def test_status_flags_loose_key_permissions(tmp_path, deployment):
    dep, home = deployment
    deploy_cli.add_node(dep.root, "a", "school", data_dir=Path("/d/a"), declared=100, flwr_home=home)
    result = fedfer("status", "--dir", str(dep.root), cwd=tmp_path, home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not running" in result.stdout and "created" in result.stdout
    os.chmod(dep.node_dir("a") / "supernode", 0o644)
    result = fedfer("status", "--dir", str(dep.root), "--json", cwd=tmp_path, home=home)
    info = json.loads(result.stdout)
    assert result.returncode == 1
    assert any("supernode: readable by group/others" in p for p in info["problems"])


def test_a_refused_registration_is_flowers_reason_in_one_line(deployment, monkeypatch):
    import types

    import server.processes

    dep, home = deployment
    out = json.dumps({"success": False, "error-message": "Using SuperLink: fedfer (127.0.0.1:9093)\n\n"
                                                         "[code: 23] Public key already in use."})
    monkeypatch.setattr(server.processes, "run_flwr", lambda *a, **k: types.SimpleNamespace(returncode=0, stdout=out))
    with pytest.raises(deploy_cli.DeployError) as caught:
        deploy_cli.register_key(dep, Path("/site/supernode.pub"), home)
    assert str(caught.value) == "flwr supernode register /site/supernode.pub: [code: 23] Public key already in use."


def test_revoke_and_rotate_need_a_registration_and_a_running_superlink(deployment):
    dep, home = deployment
    deploy_cli.add_node(dep.root, "a", "school", data_dir=Path("/d/a"), declared=100, flwr_home=home)
    with pytest.raises(deploy_cli.DeployError, match="a was never registered"):
        deploy_cli.revoke_node(dep.root, "a", home)
    with pytest.raises(deploy_cli.DeployError, match="SuperLink is not running on 127.0.0.1:19093"):
        deploy_cli.rotate_node(dep.root, "a", home)
    assert not list(dep.node_dir("a").glob("supernode.new*"))


def test_rotate_says_how_to_restart_at_a_site_and_in_a_deploy_up_trial(deployment, monkeypatch):
    """The message said only "start its start.sh again"; in a one-machine trial the rotation's stop of the old
    SuperNode ends all of `fedfer deploy up`, which is what starts again. Nothing records how a node runs, so
    the one line names both."""
    dep, home = deployment
    deploy_cli.add_node(dep.root, "a", "school", data_dir=Path("/d/a"), declared=100, flwr_home=home)
    dep = Deployment.load(dep.root)
    dep.nodes["a"].node_id = 17   # as if registered at add-school
    dep.save()
    monkeypatch.setattr(deploy_cli, "superlink_running", lambda _dep: True)
    monkeypatch.setattr(deploy_cli, "register_key", lambda _dep, public, _home: 4242)
    monkeypatch.setattr(deploy_cli, "unregister_node", lambda _dep, node_id, _home: None)
    message = deploy_cli.rotate_node(dep.root, "a", home)
    assert f"Copy {dep.node_dir('a')}/supernode to the site and start its start.sh again" in message, message
    assert f"under `fedfer deploy up` start that again instead (`fedfer deploy up --dir {dep.root}`" in message
    assert "\n" not in message


@pytest.mark.parametrize("app", ["server.app", "client.app"])
def test_flower_log_records_print_once_beside_opacus(app):
    """Opacus calls logging.basicConfig() when imported; the apps keep Flower's records out of that root handler."""
    code = f"import {app}, opacus.utils.module_utils; from flwr.common.logger import log; log(20, 'one-line-only')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("one-line-only") == 1, result.stdout + result.stderr


def test_node_config_string_quotes_values():
    assert format_node_config({"role": "school", "budget": 8.0, "n": 3, "on": True, "p": 'a "b"'}) == \
        'role="school" budget=8.0 n=3 on=true p="a \\"b\\""'


# ------------------------------------------------------------------------------------ supervisor
def test_supervisor_stops_children_grandchildren_and_detached_sessions(tmp_path):
    script = ("import os, subprocess, sys, time\n"
              "subprocess.Popen(['sleep', '300'])\n"
              "subprocess.Popen(['sleep', '301'], start_new_session=True)\n"   # like Flower's detached SuperExec
              "print('ready', flush=True)\n"
              "time.sleep(300)\n")
    with Supervisor(tmp_path / "logs") as sup:
        proc = sup.start("tree", [sys.executable, "-c", script])
        sup.wait_log(proc, "ready", timeout=30)
        pids = sup.owned_pids()
        assert len(pids) == 3
    assert all(_proc_stat(pid) is None for pid in pids)


def test_supervisor_reports_a_process_that_dies_at_start(tmp_path):
    from server.processes import DeploymentError

    with Supervisor(tmp_path / "logs") as sup:
        proc = sup.start("dies", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
        with pytest.raises(DeploymentError, match="(?s)dies exited with code 3 before opening 127.0.0.1:1.*boom"):
            sup.wait_port(proc, "127.0.0.1", 1, timeout=30)


# ------------------------------------------------------------------------------------ Flower tuning
def test_supernode_poll_patch_shortens_only_the_two_poll_sleeps(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    from client.runtime import supernode

    slept = []
    monkeypatch.setattr(supernode._time, "sleep", slept.append)
    monkeypatch.setattr(loop, "time", supernode._time)
    assert supernode.patch_poll_intervals(idle=0.4, reply=0.1)
    loop.time.sleep(3)
    loop.time.sleep(0.5)
    loop.time.sleep(0.01)
    assert slept[0] == pytest.approx(0.4, abs=0.05) and slept[1:] == [0.1, 0.01]   # idle: minus the (instant) pull
    assert loop.time.monotonic is supernode._time.monotonic


def test_supernode_polls_faster_only_in_the_window_after_a_message(supernode_clock):
    from client.runtime import supernode

    now, slept = supernode_clock
    clock = supernode._PollClock(idle=0.5, reply=0.1, busy=0.1, window=5.05, clock=lambda: now[0])
    clock.sleep(3)                     # idle, no message handled yet: the idle poll
    clock.sleep(0.5)                   # waiting for a ClientApp's reply: a message is being handled
    for _ in range(60):                # idle again: the busy poll for ~5 s, then the idle poll
        clock.sleep(3)
    assert slept[:2] == [0.5, 0.1]
    assert slept[2:] == [0.1] * 50 + [0.5] * 10
    now[0] += 30.0                     # the loop was away (pulled and answered a message without waiting)
    clock.sleep(3)                     # the interval since the last pull began is long over: ask at once,
    clock.sleep(3)                     # then the busy poll of the window after a message
    assert slept[-2:] == [0.0, 0.1]
    slow = supernode._PollClock(idle=0.5, reply=0.1, busy=2.0, window=5.0, clock=lambda: now[0])
    slow.sleep(0.5)
    slow.sleep(3)                      # a busy poll is never slower than the idle poll
    assert slept[-1] == 0.5


def test_warm_executor_polls_faster_after_a_task_ended(monkeypatch):
    from flwr.proto.runtime_pb2 import AcquireTaskResponse  # pylint: disable=no-name-in-module

    from client.runtime import warm_executor as we

    now = [50.0]
    slept: list[float] = []

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return now[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds

    class NoTasks:
        calls = 0

        def AcquireTask(self, _request):  # noqa: N802 - Flower's method name
            NoTasks.calls += 1
            if NoTasks.calls > 4:
                raise we._Stop()
            return AcquireTaskResponse()

    monkeypatch.setattr(we, "time", FakeTime)
    executor = we.ForkExecutor()
    executor.last_finished = now[0] - 1.0          # a task ended a second ago
    with pytest.raises(we._Stop):
        we._acquire_loop(NoTasks(), None, executor, poll=0.2, max_tasks=None, busy=(0.05, 1.08))
    assert slept == [0.05, 0.05, 0.2, 0.2]           # busy until 1.08 s after the task, then the poll


def test_object_pull_backoff_defaults_are_shortened(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils as pulls

    from shared_models.wire import shorten_object_pull_backoff

    for fn in (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))
    assert pulls.pull_objects.__kwdefaults__["initial_backoff"] == 1
    assert shorten_object_pull_backoff(0.05, 0.5)
    for fn in (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree):
        assert (fn.__kwdefaults__["initial_backoff"], fn.__kwdefaults__["backoff_cap"]) == (0.05, 0.5)


class _FakeGrid:
    """Replies to message i after `delays[i]` pulls."""

    def __init__(self, delays):
        self.delays = delays
        self.pulls = 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        from types import SimpleNamespace

        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if self.pulls > self.delays[int(i[1:])]]


def test_polling_grid_collects_every_reply_and_honours_the_timeout(monkeypatch):
    from server.transport import PollingGrid

    fake = _FakeGrid([0, 3, 1])
    grid = PollingGrid.__new__(PollingGrid)   # skip __init__: it tunes Flower's pull backoff process-wide
    grid._grid, grid.interval = fake, 0.01
    batches: list[list] = []
    grid.on_replies = batches.append   # told about each batch as it arrives, in arrival order
    replies = grid.send_and_receive(["a", "b", "c"], timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert fake.pulls == 4
    assert [r for batch in batches for r in batch] == list(replies) and all(batches)
    grid.on_replies = None
    never = _FakeGrid([0, 10**9])
    grid._grid = never
    start = time.monotonic()
    replies = grid.send_and_receive(["a", "b"], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and time.monotonic() - start < 5
    with pytest.raises(ValueError, match="interval must be between"):
        PollingGrid(fake, interval=0)


# ------------------------------------------------------------------------------------ packing
def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "conv.bias": rng.standard_normal(4).astype(np.float32),
            "gn.weight": rng.standard_normal(4).astype(np.float32),
            "steps": np.array(seed + 7, dtype=np.int64),
            "head.weight": rng.standard_normal((7, 4)).astype(np.float32)}


def test_pack_roundtrip_is_exact_and_one_array_per_dtype():
    from shared_models.wire import pack, unpack

    state = _state(1)
    arrays, layout = pack(state)
    assert sorted(arrays.keys()) == ["packed-float32", "packed-int64"]
    back = unpack(arrays, layout)
    assert list(back) == list(state)
    for name in state:
        assert back[name].dtype == state[name].dtype and back[name].shape == state[name].shape
        np.testing.assert_array_equal(back[name], state[name])


def test_fedavg_of_packed_replies_equals_fedavg_of_tensors():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from shared_models.wire import pack, unpack

    states, weights = [_state(s) for s in (1, 2, 3)], [10.0, 30.0, 60.0]
    floats = [{k: v for k, v in s.items() if v.dtype == np.float32} for s in states]

    def reply(arrays, w):
        return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": w})})

    plain = aggregate_arrayrecords([reply(ArrayRecord({k: Array(v) for k, v in f.items()}), w) for f, w in zip(floats, weights)], "num-examples")
    packed = [pack(f) for f in floats]
    avg = aggregate_arrayrecords([reply(a, w) for (a, _), w in zip(packed, weights)], "num-examples")
    got = unpack(avg, packed[0][1])
    for name, arr in plain.items():
        np.testing.assert_allclose(got[name], arr.numpy(), rtol=1e-6, atol=1e-7)


def test_unpack_rejects_a_layout_that_does_not_match():
    from flwr.app import ConfigRecord

    from shared_models.wire import PackingError, pack, unpack

    arrays, layout = pack(_state(1))
    entries = json.loads(layout["layout"])
    with pytest.raises(PackingError, match="1 values the layout does not name"):
        unpack(arrays, ConfigRecord({"layout": json.dumps([e for e in entries if e[0] != "steps"])}))
    with pytest.raises(PackingError, match="'conv.weight': packed array 'packed-float32' is too short"):
        unpack(arrays, ConfigRecord({"layout": json.dumps([["conv.weight", "<f4", [10000]]])}))
    with pytest.raises(PackingError, match="missing or malformed 'layout'"):
        unpack(arrays, ConfigRecord({}))


def test_warm_executor_stops_promptly_while_its_supernode_is_gone(tmp_path):
    """SIGTERM must stop it even inside Flower's connection-retry backoff (start.sh relies on it)."""
    from server.processes import flower_env, free_port, warm_executor_argv

    argv = warm_executor_argv(runtime_port=free_port()) + ["--preload", ""]
    with Supervisor(tmp_path / "logs") as sup:
        # Flower logs each failed connection attempt at DEBUG: wait for one, so the signal lands inside
        # the retry backoff against the closed port
        proc = sup.start("executor", argv, env=flower_env(tmp_path / "home", {"FLWR_LOG_LEVEL": "DEBUG"}), cwd=tmp_path)
        sup.wait_log(proc, "serving ClientApp tasks", timeout=120)
        sup.wait_log(proc, "Connection attempt failed", timeout=60)
        proc.popen.send_signal(15)
        assert proc.popen.wait(timeout=20) == 0
        assert "stop signal received" in proc.log_text()


class FakeClock:
    """monotonic() only moves when the code under test sleeps: retry counts no longer depend on load."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_supernode_launcher_retries_a_refused_start_then_gives_up(tmp_path, capsys, monkeypatch):
    from client.runtime import supernode
    from client.runtime.supernode import supervise

    monkeypatch.setattr(supernode, "_time", FakeClock())

    counter = tmp_path / "attempts"
    say_refused = "sys.stderr.write('Failed to initialize the connection to the SuperLink.\\n[code: 2004] Failed to activate SuperNode.\\n')"
    flaky = [sys.executable, "-c", f"import pathlib, sys; p = pathlib.Path({str(counter)!r}); "
             "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1)); "
             f"{say_refused} if n < 2 else None; sys.exit(3 if n >= 2 else 1)"]
    # the third start is not refused (it stops later, exit 3, for a reason of its own: not retried). Not exit 0: a
    # SuperNode stops with 0 untold only when the SuperLink turned it away (test_node_start_errors.py)
    assert supervise(flaky, retry_for=30, retry_every=0.05) == 3
    assert counter.read_text() == "xxx"
    counter.unlink()
    refused = [sys.executable, "-c", f"import pathlib, sys; p = pathlib.Path({str(counter)!r}); "
               f"p.write_text((p.read_text() if p.exists() else '') + 'x'); {say_refused}; raise SystemExit(1)"]
    # tries at t = 0, 0.125, 0.25, 0.375, 0.5; the next would start after the 0.5 s deadline
    assert supervise(refused, retry_for=0.5, retry_every=0.125) == 1
    assert len(counter.read_text()) == 5
    assert "[code: 2004]" in capsys.readouterr().err


def test_deploy_up_says_it_is_starting_and_what_it_stopped(deployment, monkeypatch, capsys):
    """`fedfer deploy up &` printed nothing for the 20-60 s its processes took to start, and nothing when Ctrl-C
    or `kill %1` stopped them: the trial's user could not tell starting from hung, or stopped from still running."""
    import argparse

    from fedfer.commands import deploy as deploy_command
    from server.deploy import local

    dep, home = deployment
    deploy_cli.add_node(dep.root, "evaluator", "evaluator", benchmarks=["synthetic-fer2013"], flwr_home=home)
    stopped = []

    class Stopping:   # a process that is Ctrl-C'd at the first look
        name = "superlink"

        def alive(self) -> bool:
            raise KeyboardInterrupt

    class FakeFederation:   # LocalFederation without processes: the trial's shape, nothing started
        def __init__(self, dep, log_dir, flwr_home=None) -> None:
            self.nodes, self.supervisor = {}, argparse.Namespace(processes=[Stopping()])

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            stopped.append(True)
            print("(stopping them)")

        def start_all(self) -> None:
            print("(starting)")
            self.nodes = {"evaluator": []}

    monkeypatch.setattr(local, "LocalFederation", FakeFederation)
    monkeypatch.setattr("signal.signal", lambda *a: None)   # keep pytest's own handlers
    args = argparse.Namespace(dir=str(dep.root), flwr_home=str(home))
    assert deploy_command._cmd_up(args) == 0 and stopped == [True]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("starting: SuperLink 127.0.0.1:19093 + 1 node(s)") and lines[1] == "(starting)", lines
    assert lines[-1] == f"stopped: the SuperLink and 1 node(s) of {dep.root}", lines
    # stopping takes 10-20 s (each process gets its grace period): said when the Ctrl-C arrives, not only after
    assert lines[-3].startswith("stopping: the SuperLink and 1 node(s)") and lines[-2] == "(stopping them)", lines


def test_set_budget_says_how_the_running_node_learns_the_new_budget(deployment, capsys):
    """In the one-machine trial the node folder is here, so set-budget already wrote its node-config.toml; it used
    to tell the admin to "set budget = 24 in its node-config.toml" anyway, and not that the running node keeps the
    old budget (declining the next run with policy-violation) until it starts again."""
    import shutil

    from fedfer.cli import main

    dep, home = deployment
    deploy_cli.add_node(dep.root, "lincoln-high", "school", data_dir=Path("/d/l"), declared=100, budget=8.0,
                        flwr_home=home)
    assert main(["deploy", "set-budget", "lincoln-high", "24", "--dir", str(dep.root)]) == 0
    here = " ".join(capsys.readouterr().out.split())
    assert "At the school: set budget" not in here and "start.sh again" in here and "fedfer deploy up" in here, here
    assert "declines a run asking for more than 8 (policy-violation, privacy.budget)" in here, here
    shutil.rmtree(dep.node_dir("lincoln-high"))   # the folder went to the school
    assert main(["deploy", "set-budget", "lincoln-high", "30", "--dir", str(dep.root)]) == 0
    there = " ".join(capsys.readouterr().out.split())
    assert "At the school: set budget = 30 in its node-config.toml" in there and "more than 24" in there, there
