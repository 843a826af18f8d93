"""`fedfer deploy` refuses bad input in one line and writes nothing; the documented node-config strings
are strings Flower's own parser accepts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from server.deploy import credentials as cred
from fedfer.commands import deploy as deploy_command
from server.deploy import commands as deploy_cli
from server.deploy.layout import LayoutError, write_node_config

ROOT = Path(__file__).resolve().parent.parent


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file (content) and folder below `roots`: what "nothing written" compares."""
    seen: dict[str, bytes | None] = {}
    for root in roots:
        if root.is_file():
            seen[str(root)] = root.read_bytes()
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            seen[str(path)] = path.read_bytes() if path.is_file() else None
    return seen


def fedfer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_HOME": str(cwd / "flwr-home")}
    return subprocess.run([sys.executable, "-m", "fedfer", "deploy", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dep")
    dep = deploy_cli.init_deployment(tmp / "deploy", "localhost", port=19093, flwr_home=tmp / "home")
    return dep, tmp / "home"


# -- init ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["dir-is-file", "dir-below-file", "home-is-file", "port-negative", "port-big",
                                  "bad-connection", "bad-bind"])
def test_init_refuses_without_writing(tmp_path, case):
    (tmp_path / "afile").write_text("keep me")
    home = tmp_path / "home"
    args = {"root": tmp_path / "deploy", "coordinator": "localhost", "flwr_home": home}
    if case == "dir-is-file":
        args["root"] = tmp_path / "afile"
    elif case == "dir-below-file":
        args["root"] = tmp_path / "afile" / "deploy"
    elif case == "home-is-file":
        args["flwr_home"] = tmp_path / "afile"
    elif case == "port-negative":
        args["port"] = -1
    elif case == "port-big":
        args["port"] = 70000
    elif case == "bad-connection":
        args["connection"] = "a.b c"
    elif case == "bad-bind":
        args["bind"] = "0.0.0.0; rm -rf /"
    before = snapshot(tmp_path)
    with pytest.raises((deploy_cli.DeployError, cred.CredentialError)) as err:
        deploy_cli.init_deployment(args.pop("root"), args.pop("coordinator"), **args)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


def test_init_with_a_114_character_host_name(tmp_path):
    host = ".".join(["a" * 37, "b" * 37, "c" * 38])
    assert len(host) == 114
    dep = deploy_cli.init_deployment(tmp_path / "deploy", host, flwr_home=tmp_path / "home")
    cert = cred.load_certificate(dep.superlink_cert)
    assert host in cred.certificate_sans(cert)
    cred.verify_issued_by(cert, cred.load_certificate(dep.ca_cert))


def test_a_second_deployment_never_takes_over_the_first_ones_cli_connection(tmp_path):
    home = tmp_path / "home"
    first = deploy_cli.init_deployment(tmp_path / "first", "localhost", flwr_home=home)
    with pytest.raises(deploy_cli.DeployError, match=r"connection 'fedfer' belongs to another deployment.*--connection"):
        deploy_cli.init_deployment(tmp_path / "second", "localhost", flwr_home=home)
    assert not (tmp_path / "second").exists()   # refused before the first write
    connections = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert Path(connections["fedfer"]["root-certificates"]) == first.ca_cert.resolve()
    # its own name, or --force, is the admin's choice
    second = deploy_cli.init_deployment(tmp_path / "second", "localhost", port=9094, connection="trial", flwr_home=home)
    connections = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert Path(connections["trial"]["root-certificates"]) == second.ca_cert.resolve()
    assert Path(connections["fedfer"]["root-certificates"]) == first.ca_cert.resolve()
    deploy_cli.init_deployment(tmp_path / "third", "localhost", flwr_home=home, force=True)


def test_init_command_dir_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    one_line_error(fedfer("init", "--coordinator", "localhost", "--dir", "afile", cwd=tmp_path), "afile")
    assert snapshot(tmp_path) == before


# -- add-school ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needle", [
    ({"budget": float("inf")}, "--budget must be a finite ε > 0"),
    ({"budget": float("nan")}, "--budget must be a finite ε > 0"),
    ({"budget": -1.0}, "--budget must be a finite ε > 0"),
    ({"budget": 1e300}, "--budget must be an ε of at most 1000"),
    ({"runtime_port": -1}, "--runtime-port must be in 1..65535"),
    ({"runtime_port": 70000}, "--runtime-port must be in 1..65535"),
    ({"runtime_port": 19093}, "the SuperLink's port"),
    ({"state_dir": "FILE"}, "--state-dir"),
    ({"data_dir": Path("/srv/a\nb")}, "control character"),
])
def test_add_school_refuses_without_writing(deployment, tmp_path, kwargs, needle):
    dep, home = deployment
    if kwargs.get("state_dir") == "FILE":
        (tmp_path / "state").write_text("x")
        kwargs = {"state_dir": tmp_path / "state"}
    kwargs = {"data_dir": Path("/srv/fer/x"), **kwargs}
    before = snapshot(dep.root, home, tmp_path)
    with pytest.raises((deploy_cli.DeployError, LayoutError)) as err:
        deploy_cli.add_node(dep.root, "x", "school", flwr_home=home, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert snapshot(dep.root, home, tmp_path) == before


def test_add_school_without_ca_certificate(tmp_path):
    dep = deploy_cli.init_deployment(tmp_path / "deploy", "localhost", flwr_home=tmp_path / "home")
    dep.ca_cert.unlink()
    before = snapshot(tmp_path)
    with pytest.raises(cred.CredentialError, match="ca.crt: certificate file missing"):
        deploy_cli.add_node(dep.root, "x", "school", data_dir=Path("/srv/x"), declared=300, flwr_home=tmp_path / "home")
    assert snapshot(tmp_path) == before


@pytest.mark.timeout(120)   # a pipe that is waited on fails here instead of hanging the suite
@pytest.mark.parametrize("credential", ["ca_cert", "ca_key"])
def test_add_school_refuses_a_ca_file_that_is_a_named_pipe(tmp_path, credential):
    """A ca.crt that was a named pipe hung `fedfer deploy add-school` (read_bytes waits for a writer)."""
    dep = deploy_cli.init_deployment(tmp_path / "deploy", "localhost", flwr_home=tmp_path / "home")
    path = getattr(dep, credential)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(cred.CredentialError, match=f"{path.name}: cannot read the .*named pipe"):
        cred.load_certificate(path) if credential == "ca_cert" else cred.load_ec_private_key(path)


@pytest.mark.parametrize("content, needle", [
    (b"[]", "expected a JSON object"),
    (os.urandom(64) + b"\xff", "not UTF-8"),
    (b'{"version": 1, "coordinator": "h", "port": 70000}', "field 'port'"),
    (b'{"version": 1, "coordinator": "h", "nodes": []}', "field 'nodes'"),
    (b'{"version": 1, "coordinator": "h", "nodes": {"a": {"name": "a", "role": "x", "runtime_port": 1, '
     b'"node_config": {}}}}', "field 'role'"),
    (b"[" * 100000, "deployment.json"),
])
def test_broken_manifest_is_one_line(tmp_path, content, needle):
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "deployment.json").write_bytes(content)
    before = snapshot(tmp_path)
    proc = fedfer("add-school", "x", "--data-dir", "/srv/x", "--dir", "deploy", cwd=tmp_path)
    one_line_error(proc, needle)
    assert snapshot(tmp_path) == before


def test_node_config_toml_is_never_invalid(tmp_path):
    with pytest.raises(LayoutError, match="finite"):
        write_node_config(tmp_path / "n.toml", {"role": "school", "budget": float("inf")})
    assert not (tmp_path / "n.toml").exists()
    write_node_config(tmp_path / "n.toml", {"role": "school", "data-dir": 'C:\\odd "path" é', "budget": 4.5})
    assert tomllib.loads((tmp_path / "n.toml").read_text()) == {"role": "school", "data-dir": 'C:\\odd "path" é',
                                                                 "budget": 4.5}


# -- documented strings ----------------------------------------------------------------------------
def documented_config_strings() -> list[tuple[str, str]]:
    """(file, string) for every node-config example (a backticked string with `role=`) and every
    `-c '...'` run-config example in README.md and docs/deployment.md."""
    found = []
    for name in ("README.md", "docs/deployment.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        found += [(name, m) for m in re.findall(r"`([^`\n]*\brole=[^`\n]*)`", text)]
        found += [(name, m) for m in re.findall(r"-c '([^'\n]+)'", text)]
    return found


def test_documentation_has_config_examples():
    files = {name for name, _ in documented_config_strings()}
    assert files == {"README.md", "docs/deployment.md"}
    assert any("role=" in text for _, text in documented_config_strings())


@pytest.mark.parametrize("source, text", documented_config_strings())
def test_documented_config_strings_parse_with_flowers_parser(source, text):
    parsed = parse_config_args([text])
    keys = re.findall(r"(\S+?)=", text)
    assert set(parsed) == set(keys), f"{source}: Flower dropped part of {text!r}"
    if "role" in parsed:
        assert parsed["role"] in ("school", "evaluator")
        if parsed["role"] == "school":
            assert isinstance(parsed["school-id"], str) and isinstance(parsed["budget"], float)


def test_printed_node_config_line_parses(deployment, capsys):
    dep, home = deployment
    dep, _ = deploy_cli.add_node(dep.root, "printed", "school", data_dir=Path("/srv/fer/p q"), budget=4.0, declared=300,
                                 flwr_home=home)
    deploy_command._print_node(dep, "printed", "")
    line = next(l for l in capsys.readouterr().out.splitlines() if "node-config" in l)
    text = line.split(".toml: ", 1)[1]
    assert parse_config_args([text]) == dep.nodes["printed"].node_config
    json.dumps(dep.nodes["printed"].node_config)


@pytest.mark.parametrize("bom", [False, True])
def test_the_proposed_declared_size_counts_labels_csv_as_the_school_reads_it(tmp_path, bom):
    """Without --declared-students the policy declares the school's student count (two significant figures),
    counted from labels.csv by the school folder's own reader: still frames only, blank ids not counted, and a
    spreadsheet's byte-order mark before a first column `student_id` read as the school reads it (the deploy
    command had its own reader, which did not strip the mark and so found no student_id column)."""
    students = [f"s{i:03d}" for i in range(123)]
    rows = [f"{s},img/{s}.png,happy," for s in students] + ["s999,img/clip.png,happy,clip-1", ",img/x.png,sad,"]
    text = "student_id,path,label,clip_id\n" + "\n".join(rows) + "\n"
    (tmp_path / "labels.csv").write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    policy = deploy_cli.school_policy("lincoln-high", tmp_path)
    assert policy.declared_units == 120   # 123 students, two significant figures; the clip's and the blank id not counted
