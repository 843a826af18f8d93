"""A loopback deployment made with `fedfer deploy` (TLS + node authentication, three schools and an
evaluation node on synthetic data), shared by the deployment end-to-end and fault tests (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

from server.deploy import commands as deploy_cli
from server.deploy.layout import Deployment
from server.deploy.local import LocalFederation
from server.processes import free_ports

ROOT = Path(__file__).resolve().parent.parent
SCHOOLS = 3
TINY = {
    "federation.rounds": 2, "federation.min_train_schools": 2, "federation.round_timeout": 300,
    "data.students_per_school": 6, "data.frames_per_student": 6, "data.public_students": 6, "data.image_size": 32,
    "data.public_train_students": 0, "data.heldout_students": 0,
    "train.local_epochs": 1, "train.batch_size": 3, "evaluation.bootstrap": 50, "evaluation.benchmarks": "synthetic-fer2013",
    "model.pretrain": "", "data.school_size_spread": 30,   # from scratch, sizes as before
}


def _run_config(values: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _synthetic_data(root: Path, schools: int = SCHOOLS) -> None:
    from shared_models.config import load_config
    from simulations import synth

    cfg = load_config(None, [f"{k}={v}" for k, v in TINY.items()] + [f"federation.schools={schools}"])
    params = synth.params_from_config(cfg)
    for i in range(schools):
        synth.ensure_school(root, params, i)
    synth.ensure_public(root, params)


def make_deployment(tmp_path: Path, monkeypatch) -> tuple[Deployment, Path, Path, list[int]]:
    """Synthetic data for SCHOOLS schools + public split, and a loopback TLS + node-auth deployment
    (3 schools, 1 evaluator) made with `fedfer deploy`, school-00 with keys it made itself. Returns (deployment, CLI home, data, spare ports)."""
    for key, value in {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
                       "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_HOME": str(tmp_path / "cli_home")}.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "cli_home"
    data = tmp_path / "data"
    _synthetic_data(data)
    port, *node_ports = free_ports(2 + SCHOOLS + 1)
    root = tmp_path / "deploy"
    deploy_cli.init_deployment(root, "localhost", port=port, flwr_home=home)
    # school-00 makes its own ledger and SuperNode keys (`fedfer deploy school-key`): the coordinator gets
    # only their public halves; the others' keys are made by `add-school` in their node folders
    own = tmp_path / "school-00-machine" / "state"
    keys = deploy_cli.make_school_keys(own)
    for i in range(SCHOOLS):
        school_made = dict(state_dir=own, ledger_key=keys.ledger_public, node_key=keys.node_public) if i == 0 else {}
        deploy_cli.add_node(root, f"school-{i:02d}", "school", data_dir=data / "schools" / f"school-{i:02d}",
                            runtime_port=node_ports[i], flwr_home=home, **school_made)
    deploy_cli.add_node(root, "evaluator", "evaluator", benchmarks=["synthetic-fer2013"], data_dir=data,
                        runtime_port=node_ports[SCHOOLS], flwr_home=home)
    return Deployment.load(root), home, data, node_ports[SCHOOLS + 1:]


def start_all(fed: LocalFederation, home: Path) -> Deployment:
    """SuperLink up, every node registered (`fedfer deploy register`) and connected."""
    root = fed.dep.root
    fed.start_superlink()
    for name in fed.dep.nodes:
        assert "registered as node" in deploy_cli.register_pending(root, name, home)
    fed.dep = Deployment.load(root)
    fed.start_nodes(list(fed.dep.nodes))
    return fed.dep


def run_config(dep: Deployment, data: Path, runs: Path, **extra) -> str:
    return _run_config({**TINY, "run.root": str(runs), "run.name": "e2e", "data.root": str(data),
                        "privacy.keyring": str(dep.keyring), **extra})


def dump_logs(fed: LocalFederation) -> None:
    for proc in fed.supervisor.processes:   # the logs explain a failure better than a timeout
        print(f"----- {proc.name} (exit {proc.popen.poll()})\n{proc.log_text(3000)}")
