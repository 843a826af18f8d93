"""Malformed input through the `fedfer` command surfaces that read configs, run directories, checkpoints,
deployment folders and report folders: every case in its own subprocess with a timeout.

    python -m simulations.fuzz_inputs [--code-root DIR] [--timeout 60] [--only config,resume,...,privacy,cli] [--out F.json]

Per case it records the exit code and classifies the outcome:

    traceback   a Python traceback reached the user (stderr)
    internal    `fedfer: internal error: ...` (fedfer's last-resort line for a bug; counted as a crash)
    hang        the command did not finish within --timeout seconds
    damaged     a file that existed before the command was changed or removed (when the command failed,
                or when it succeeded but the file is not one the command is meant to rewrite)
    wrote       the command failed but left new files behind ("nothing written on refusal" broken)
    accepted    the case must be refused and the command exited 0 (or refused it for another reason:
                the message does not name what the case broke)
    executed    a crafted checkpoint's payload ran (its marker file exists)
    multiline   refused, but the message is more than one line (argparse's usage + error is allowed)
    refused-valid  a valid input (e.g. a 114-character host name) was refused
    wrong-result   accepted, but what it wrote is not what it must be (the case's own check says why)
    not-json    a command asked for --json did not print exactly one JSON object on stdout with the exit
                code it ended with (`privacy audit --json`: every outcome, usage errors included)
    ok          refused in one line naming the problem, or accepted where acceptance is right

--code-root runs the same cases against another checkout (e.g. the main branch before the change) to
get a before/after table. Prints a table and writes JSON with the command, the per-case outcomes and
the counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent.parent
OUTCOMES = ("traceback", "internal", "hang", "damaged", "wrote", "accepted", "executed", "multiline", "not-json",
            "refused-valid", "wrong-result", "ok")


@dataclass
class Case:
    surface: str
    name: str
    argv: list[str]                          # after `python -m fedfer`
    setup: Callable[[Path], None] | None = None
    expect: str = "refuse"                   # refuse | accept | any
    needle: str = ""                         # a refusal must mention this (the key, file or field)
    may_rewrite: tuple[str, ...] = ()        # pre-existing files a successful run may rewrite (glob, relative)
    marker: str = ""                         # relative path whose existence means code ran
    report: bool = False                     # the command reports its findings on stdout (the audit's table):
                                             # the needle is looked for there, and its length is not a fault
    json_stdout: bool = False                # stdout must be one JSON object whose exit_code is the exit code
    check: Callable[[Path], str] | None = None   # after an accepted run: what is wrong with the case folder, or ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ fixtures
def python_code(root: Path, code: str) -> None:
    """Run `code` with the checkout under test (used to build valid artefacts to break)."""
    env = {**os.environ, "PYTHONPATH": str(CODE_ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, capture_output=True, timeout=300)


BUILD_RUN = """
import sys
from pathlib import Path
import torch
from shared_models.config import load_config
from shared_models.models import registry
from server.run_dir import RunDirectory
cfg = load_config(None, ["run.root=" + str(Path('runs').resolve()), "run.name=r1"])
run = RunDirectory.create(cfg)
model = registry.build("hafnet", num_classes=7, preset="dp")
run.save_checkpoint(1, model.state_dict(), {"name": "hafnet", "preset": "dp", "num_classes": 7}, cfg,
                    {"exhausted": [], "momentum": None})
"""


BUILD_ROTATED = """
import sys
from pathlib import Path
sys.path.insert(0, str(Path(%r) / "tests"))
from test_ledger_key_rotation import _rotated_federation, _rotated_keyring
from privacy.signing import retire_public_key
school, first, second, old = _rotated_federation(Path('.').resolve())
_rotated_keyring(Path('.').resolve(), school, old)
retire_public_key(school.state / "signing_key.pub", old)
"""   # school-a: run-1 under its first key, a key transition, run-2; the retired key kept where the commands keep it


class Templates:
    """Valid artefacts built once per fuzz run, copied into each case's folder and then broken."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.run = work / "template-run"
        self.run.mkdir()
        python_code(self.run, BUILD_RUN)
        self.run_dir = self.run / "runs" / "r1"
        self.deploy = work / "template-deploy"
        self.deploy.mkdir()
        env_home = self.deploy / "flwr-home"
        python_code(self.deploy, "from pathlib import Path\nfrom server.deploy import commands as deploy_cli\n"
                                 f"deploy_cli.init_deployment(Path('deploy'), 'localhost', port=19093, "
                                 f"flwr_home=Path({str(env_home)!r}))")
        self.school_deploy = work / "template-school-deploy"   # the deployment above plus school s1 with its key
        shutil.copytree(self.deploy, self.school_deploy)
        write_ledger_key(self.school_deploy / "k.pub")
        python_code(self.school_deploy, "from fedfer.cli import main\n"
                                        "assert main(['deploy', 'add-school', 's1', '--data-dir', '/srv/s1', "
                                        "'--declared-students', '100', '--state-dir', '/srv/state', '--ledger-key', "
                                        "'k.pub', '--dir', 'deploy', '--flwr-home', 'flwr-home']) == 0")
        self.report = work / "template-report"
        self.report.mkdir()
        sys.path.insert(0, str(HERE / "tests"))
        from test_report import write_run   # the report tests' synthetic run directory

        write_run(self.report / "run", [1, 2], planned=2)
        self.rotated = work / "template-rotated"
        self.rotated.mkdir()
        python_code(self.rotated, BUILD_ROTATED % str(CODE_ROOT))


def copy_run(t: Templates, case_dir: Path) -> Path:
    shutil.copytree(t.run_dir, case_dir / "run")
    return case_dir / "run"


def copy_deploy(t: Templates, case_dir: Path) -> None:
    shutil.copytree(t.deploy / "deploy", case_dir / "deploy")
    shutil.copytree(t.deploy / "flwr-home", case_dir / "flwr-home")


def copy_school_deploy(t: Templates, case_dir: Path) -> None:
    shutil.copytree(t.school_deploy / "deploy", case_dir / "deploy")
    shutil.copytree(t.school_deploy / "flwr-home", case_dir / "flwr-home")


def copy_report(t: Templates, case_dir: Path) -> Path:
    shutil.copytree(t.report / "run", case_dir / "run")
    return case_dir / "run"


def checkpoint_bytes(t: Templates) -> bytes:
    return (t.run_dir / "checkpoints" / "round-0001.pt").read_bytes()


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_checkpoint(path: Path, marker: Path) -> None:
    """A pickle (torch's legacy format is plain pickle) whose loading creates `marker`."""
    with path.open("wb") as handle:
        pickle.dump({"round": 1, "model": {"name": "hafnet", "preset": "dp", "num_classes": 7},
                     "payload": _Marker(str(marker))}, handle, protocol=2)


def edit_checkpoint(t: Templates, target: Path, change: Callable[[dict], None]) -> None:
    import torch

    checkpoint = torch.load(t.run_dir / "checkpoints" / "round-0001.pt", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, target)


# ------------------------------------------------------------------------------------ cases
NOWHERE = "/nonexistent-fuzz-resume"   # keeps a config that passes from starting a federation


def config_cases() -> list[Case]:
    return config_file_cases() + config_unreadable_cases() + override_cases()


def config_file_cases() -> list[Case]:
    """A config file whose text is broken: YAML tricks, wrong types, values out of range."""
    files = {
        "duplicate-key": ("train:\n  lr: 1.0\n  lr: 2.0\n", "duplicate"),
        "inf": ("train:\n  lr: .inf\n", "c.yaml"), "nan": ("privacy:\n  delta: .nan\n", "c.yaml"),
        "overflow-float": ("train:\n  lr: 1e999\n", "train.lr"),
        "recursive-alias": ("a: &a [*a]\n", "c.yaml"),
        "laughs": ("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
                   "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
                   "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n", "c.yaml"),
        "deep-list": ("x: " + "[" * 100000 + "]" * 100000 + "\n", "c.yaml"),
        "deep-map": ("".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n", "c.yaml"),
        "huge-int": ("run:\n  seed: " + "9" * 5000 + "\n", "c.yaml"),
        "python-tag": ("a: !!python/object/apply:os.system ['true']\n", "c.yaml"),
        "list-top": ("- 1\n- 2\n", "c.yaml"), "scalar-top": ("hello\n", "c.yaml"),
        "unknown-model": ("model:\n  name: resnet9000\n", "model.name"),
        "unknown-preset": ("model:\n  preset: giant\n", "model.preset"),
        "unknown-bench": ("evaluation:\n  benchmarks: fer2031\n", "evaluation.benchmarks"),
        "bench-no-path": ("evaluation:\n  benchmarks: rafdb\n", "evaluation.benchmarks"),
        "run-name-escape": ("run:\n  name: ../../escaped\n", "run.name"),
        "section-scalar": ("train: 5\n", "train"),
        "list-value": ("train:\n  lr: [1, 2]\n", "train.lr"),
        "date-value": ("train:\n  lr: 2024-01-01\n", "train.lr"),
        "nested-dotted-clash": ("train:\n  lr: 1.0\ntrain.lr: 2.0\n", "twice"),
        "momentum-negative": ("train:\n  momentum: -0.5\n", "train.momentum"),
        "delta-zero": ("privacy:\n  delta: 0\n", "privacy.delta"),
        "budget-neg": ("privacy:\n  budget: -1\n", "privacy.budget"),
        "tab-in-path": ("data:\n  root: \"a\\tb\"\n", "data.root"),
        "nul-in-path": ("data:\n  root: \"a\\0b\"\n", "data.root"),
        "bool-for-int": ("federation:\n  rounds: true\n", "federation.rounds"),
        "float-for-int": ("federation:\n  rounds: 2.5\n", "federation.rounds"),
        "empty-key": ("? ''\n: 1\n", "c.yaml"),
        "complex-key": ("? [a, b]\n: 1\n", "c.yaml"),
    }
    cases = []
    for name, (text, needle) in files.items():
        def setup(d: Path, text: str = text) -> None:
            (d / "c.yaml").write_text(text, encoding="utf-8")
        cases.append(Case("config", name, ["simulate", "--config", "c.yaml", f"run.resume={NOWHERE}"], setup,
                          needle=needle))
    return cases


def config_unreadable_cases() -> list[Case]:
    """A config file that is not UTF-8 text, or not a file at all."""
    cases = []
    binary = {"latin1": "train:\n  optimizer: s\xe9d\n".encode("latin-1"), "random": bytes(range(256)) * 4,
              "utf16": "train:\n  lr: 1.0\n".encode("utf-16")}
    for name, data in binary.items():
        def setup(d: Path, data: bytes = data) -> None:
            (d / "c.yaml").write_bytes(data)
        cases.append(Case("config", f"bytes-{name}", ["simulate", "--config", "c.yaml", f"run.resume={NOWHERE}"],
                          setup, needle="c.yaml"))
    cases.append(Case("config", "config-is-dir", ["simulate", "--config", ".", f"run.resume={NOWHERE}"], needle="."))
    cases.append(Case("config", "config-fifo", ["simulate", "--config", "c.yaml", f"run.resume={NOWHERE}"],
                      lambda d: os.mkfifo(d / "c.yaml"), needle="c.yaml"))
    return cases


def override_cases() -> list[Case]:
    """A bad `key=value` override on the command line."""
    cases = []
    overrides = {
        "train.lr=nan": "train.lr", "train.lr=inf": "train.lr", "train.lr=-1": "train.lr", "train.lr=0": "train.lr",
        "train.momentum=-1": "train.momentum", "train.weight_decay=-0.1": "train.weight_decay",
        "privacy.budget=nan": "privacy.budget", "privacy.budget=inf": "privacy.budget", "privacy.budget=0": "privacy.budget",
        "privacy.delta=0": "privacy.delta", "privacy.delta=1": "privacy.delta", "privacy.delta=nan": "privacy.delta",
        "privacy.target_epsilon=0": "privacy.target_epsilon", "privacy.target_epsilon=inf": "privacy.target_epsilon",
        "privacy.target_epsilon=nan": "privacy.target_epsilon",
        "federation.max_update_norm=nan": "federation.max_update_norm",
        "federation.max_update_norm=inf": "federation.max_update_norm",
        "federation.max_update_norm=0": "federation.max_update_norm",
        "federation.rounds=0": "federation.rounds", "federation.rounds=1e9": "federation.rounds",
        "federation.rounds=" + "9" * 5000: "federation.rounds",
        "federation.fraction_train=0": "federation.fraction_train", "federation.schools=-3": "federation.schools",
        "model.name=resnet": "model.name", "model.preset=huge": "model.preset",
        "evaluation.benchmarks=nope": "evaluation.benchmarks", "evaluation.benchmarks=": "evaluation.benchmarks",
        "run.name=../../x": "run.name", "run.name=/abs": "run.name", "run.name=a/b": "run.name",
        "run.seed=-1": "run.seed", "data.seed=99999999999": "data.seed", "train.threads=-1": "train.threads",
        "pretrain.seed=-1": "pretrain.seed", "pretrain.seed=" + "9" * 30: "pretrain.seed",
        "privacy.school_budgets=s1=inf": "privacy.school_budgets", "privacy.school_budgets=s1": "privacy.school_budgets",
        "privacy.max_grad_norm=0": "privacy.max_grad_norm", "data.image_size=4": "data.image_size",
        "federation.round_timeout=0": "federation.round_timeout", "privacy.accountant=magic": "privacy.accountant",
        "evaluation.public_benchmarks=synthetic-indomain": "evaluation.public_benchmarks",
        "evaluation.public_benchmarks=fer2013=/x.csv": "evaluation.public_benchmarks",
        "evaluation.public_benchmarks=lincoln-faces": "evaluation.public_benchmarks",
        "federation.offline_wait=-1": "federation.offline_wait", "federation.offline_wait=nan": "federation.offline_wait",
        "federation.first_round_wait=-1": "federation.first_round_wait",
        "federation.first_round_wait=inf": "federation.first_round_wait",
        "federation.roundz=3": "federation.roundz", "noequals": "noequals",
    }
    for item, needle in overrides.items():
        cases.append(Case("override", item[:60], ["simulate", item, f"run.resume={NOWHERE}"], needle=needle))
    return cases


def resume_cases(t: Templates) -> list[Case]:
    cases = []

    def add(name: str, setup: Callable[[Path], None], needle: str, marker: str = "") -> None:
        cases.append(Case("resume", name, ["simulate", "run.resume=run", "run.root=runs-new", "federation.rounds=1"],
                          setup, needle=needle, marker=marker))

    add("missing-dir", lambda d: None, "run")
    add("is-file", lambda d: (d / "run").write_text("x"), "run")
    add("empty-dir", lambda d: (d / "run").mkdir(), "latest.json")

    def latest(text: str) -> Callable[[Path], None]:
        def setup(d: Path) -> None:
            (copy_run(t, d) / "checkpoints" / "latest.json").write_text(text)
        return setup

    add("latest-garbage", latest("{not json"), "latest.json")
    add("latest-list", latest("[]"), "latest.json")
    add("latest-traversal", latest('{"round": 1, "file": "../../../etc/passwd"}'), "latest.json")
    add("latest-round-str", latest('{"round": "1", "file": "round-0001.pt"}'), "latest.json")
    add("latest-missing-file", latest('{"round": 1, "file": "round-0007.pt"}'), "round-0007.pt")
    add("latest-deep", latest("[" * 100000), "latest.json")

    def ckpt(data: Callable[[], bytes]) -> Callable[[Path], None]:
        def setup(d: Path) -> None:
            (copy_run(t, d) / "checkpoints" / "round-0001.pt").write_bytes(data())
        return setup

    add("ckpt-random", ckpt(lambda: os.urandom(8192)), "round-0001.pt")
    add("ckpt-text", ckpt(lambda: b"hello\n" * 100), "round-0001.pt")
    add("ckpt-empty", ckpt(lambda: b""), "round-0001.pt")
    add("ckpt-truncated", ckpt(lambda: checkpoint_bytes(t)[:5000]), "round-0001.pt")

    def edited(change: Callable[[dict], None]) -> Callable[[Path], None]:
        def setup(d: Path) -> None:
            edit_checkpoint(t, copy_run(t, d) / "checkpoints" / "round-0001.pt", change)
        return setup

    add("classes-abc", edited(lambda c: c["model"].__setitem__("num_classes", "abc")), "num_classes")
    add("classes-1e9", edited(lambda c: c["model"].__setitem__("num_classes", 10**9)), "num_classes")
    add("model-unknown", edited(lambda c: c["model"].__setitem__("name", "resnet")), "model.name")
    add("no-config", edited(lambda c: c.pop("config")), "config")
    add("config-nan", edited(lambda c: c["config"].__setitem__("train.lr", float("nan"))), "train.lr")
    add("config-escape", edited(lambda c: c["config"].__setitem__("run.name", "../../x")), "run.name")
    add("wrong-weights", edited(lambda c: c.__setitem__("state_dict", {"x": __import__("torch").zeros(2)})),
        "round-0001.pt")
    add("round-mismatch", edited(lambda c: c.__setitem__("round", 5)), "round")
    add("strategy-junk", edited(lambda c: c.__setitem__("strategy", {"exhausted": "all"})), "strategy")

    def evil(d: Path) -> None:
        run = copy_run(t, d)
        malicious_checkpoint(run / "checkpoints" / "round-0001.pt", d / "EXECUTED")
    add("pickle-payload", evil, "round-0001.pt", marker="EXECUTED")
    return cases


def checkpoint_cases(t: Templates) -> list[Case]:
    cases = []

    def add(name: str, setup: Callable[[Path], None], needle: str = "ck.pt", marker: str = "") -> None:
        cases.append(Case("checkpoint", name, ["evaluate", "--checkpoint", "ck.pt", "--benchmark", "synthetic-fer2013",
                                               "--data-root", "nowhere"], setup, needle=needle, marker=marker))

    add("random", lambda d: (d / "ck.pt").write_bytes(os.urandom(4096)))
    add("text", lambda d: (d / "ck.pt").write_text("not a checkpoint"))
    add("truncated", lambda d: (d / "ck.pt").write_bytes(checkpoint_bytes(t)[:3000]))
    add("dir", lambda d: (d / "ck.pt").mkdir())
    add("fifo", lambda d: os.mkfifo(d / "ck.pt"))
    add("classes-abc", lambda d: edit_checkpoint(t, d / "ck.pt", lambda c: c["model"].__setitem__("num_classes", "abc")))
    add("classes-1e9", lambda d: edit_checkpoint(t, d / "ck.pt", lambda c: c["model"].__setitem__("num_classes", 10**9)))
    add("model-int", lambda d: edit_checkpoint(t, d / "ck.pt", lambda c: c.__setitem__("model", 3)))
    add("state-list", lambda d: edit_checkpoint(t, d / "ck.pt", lambda c: c.__setitem__("state_dict", [1, 2])))
    add("pickle-payload", lambda d: malicious_checkpoint(d / "ck.pt", d / "EXECUTED"), marker="EXECUTED")
    cases.append(Case("checkpoint", "input-size-negative",
                      ["evaluate", "--checkpoint", "ck.pt", "--benchmark", "synthetic-fer2013", "--input-size", "-5"],
                      lambda d: shutil.copy(t.run_dir / "checkpoints" / "round-0001.pt", d / "ck.pt"),
                      needle="--input-size"))
    cases.append(Case("checkpoint", "models-classes-1e9", ["models", "--classes", "1000000000"], needle="--classes"))
    return cases


DEPLOY_HOME = ["--flwr-home", "flwr-home"]


def deploy_cases(t: Templates) -> list[Case]:
    return (deploy_init_cases(t) + add_school_cases(t) + manifest_cases(t) + status_and_evaluator_cases(t)
            + recover_ledger_key_cases(t) + restore_ledger_cases(t) + rotate_recovered_cases(t) + set_budget_cases(t)
            + scripts_cases(t))


def init_case(name: str, args: list[str], setup: Callable[[Path], None] | None = None, needle: str = "",
              expect: str = "refuse") -> Case:
    own_home = [] if "--flwr-home" in args else DEPLOY_HOME
    return Case("deploy", f"init-{name}", ["deploy", "init", *args, *own_home], setup, needle=needle, expect=expect,
                may_rewrite=("flwr-home/config.toml",))


def add_school_case(t: Templates, name: str, args: list[str], setup: Callable[[Path], None] | None = None,
                    needle: str = "") -> Case:
    def full_setup(d: Path) -> None:
        copy_deploy(t, d)
        if setup:
            setup(d)
    return Case("deploy", f"add-school-{name}", ["deploy", "add-school", *args, "--dir", "deploy", *DEPLOY_HOME],
                full_setup, needle=needle, may_rewrite=("deploy/deployment.json",))


def deploy_init_cases(t: Templates) -> list[Case]:
    """`fedfer deploy init` with a bad folder, Flower home, port, host name or address."""
    cases = []

    def init(*args, **kwargs) -> None:
        cases.append(init_case(*args, **kwargs))

    init("dir-file", ["--coordinator", "localhost", "--dir", "afile"], lambda d: (d / "afile").write_text("keep"), "afile")
    init("dir-below-file", ["--coordinator", "localhost", "--dir", "afile/x"], lambda d: (d / "afile").write_text("k"),
         "afile")
    init("home-file", ["--coordinator", "localhost", "--dir", "dep", "--flwr-home", "hfile"],
         lambda d: (d / "hfile").write_text("keep"), "hfile")
    init("home-config-dir", ["--coordinator", "localhost", "--dir", "dep"],
         lambda d: (d / "flwr-home" / "config.toml").mkdir(parents=True), "config.toml")
    init("home-config-bad-toml", ["--coordinator", "localhost", "--dir", "dep"],
         lambda d: ((d / "flwr-home").mkdir(), (d / "flwr-home" / "config.toml").write_text("[[[")), "config.toml")
    init("port-neg", ["--coordinator", "localhost", "--dir", "dep", "--port", "-1"], needle="--port")
    init("port-big", ["--coordinator", "localhost", "--dir", "dep", "--port", "70000"], needle="--port")
    init("port-zero", ["--coordinator", "localhost", "--dir", "dep", "--port", "0"], needle="--port")
    init("host-114", ["--coordinator", ".".join(["a" * 37, "b" * 37, "c" * 38]), "--dir", "dep"], expect="accept")
    init("host-bad", ["--coordinator", "bad host!", "--dir", "dep"], needle="bad host!")
    init("host-empty", ["--coordinator", "", "--dir", "dep"], needle="''")
    init("host-label-64", ["--coordinator", "a" * 64 + ".example", "--dir", "dep"], needle="a" * 20)
    init("san-bad", ["--coordinator", "localhost", "--san", "x y", "--dir", "dep"], needle="x y")
    init("bind-shell", ["--coordinator", "localhost", "--bind", "0.0.0.0;reboot", "--dir", "dep"], needle="reboot")
    init("connection-dotted", ["--coordinator", "localhost", "--connection", "a.b", "--dir", "dep"], needle="a.b")
    init("exists-no-force", ["--coordinator", "localhost", "--dir", "deploy"],
         lambda d: copy_deploy(t, d), "deployment.json")
    return cases


def add_school_cases(t: Templates) -> list[Case]:
    """`fedfer deploy add-school` with a bad budget, port, name, folder or CA certificate."""
    cases = []

    def school(*args, **kwargs) -> None:
        cases.append(add_school_case(t, *args, **kwargs))

    school("budget-inf", ["s1", "--data-dir", "/srv/s1", "--budget", "inf"], needle="--budget")
    school("budget-nan", ["s1", "--data-dir", "/srv/s1", "--budget", "nan"], needle="--budget")
    school("budget-neg", ["s1", "--data-dir", "/srv/s1", "--budget", "-2"], needle="--budget")
    school("port-neg", ["s1", "--data-dir", "/srv/s1", "--runtime-port", "-1"], needle="--runtime-port")
    school("port-big", ["s1", "--data-dir", "/srv/s1", "--runtime-port", "70000"], needle="--runtime-port")
    school("port-superlink", ["s1", "--data-dir", "/srv/s1", "--runtime-port", "19093"], needle="19093")
    school("state-file", ["s1", "--data-dir", "/srv/s1", "--state-dir", "sfile"],
           lambda d: (d / "sfile").write_text("keep"), "sfile")
    school("name-slash", ["../x", "--data-dir", "/srv/s1"], needle="../x")
    school("name-long", ["a" * 200, "--data-dir", "/srv/s1"], needle="aaaa")
    school("data-dir-newline", ["s1", "--data-dir", "/srv/a\nb"], needle="s1")
    # --declared-students: otherwise the command stops at it (the data folder is not readable here) before the CA
    declared = ["--declared-students", "100"]
    school("no-ca", ["s1", "--data-dir", "/srv/s1", *declared], lambda d: (d / "deploy" / "ca" / "ca.crt").unlink(),
           "ca.crt")
    school("ca-garbage", ["s1", "--data-dir", "/srv/s1", *declared],
           lambda d: (d / "deploy" / "ca" / "ca.crt").write_text("x"), "ca.crt")
    school("ca-fifo", ["s1", "--data-dir", "/srv/s1", *declared],
           lambda d: ((d / "deploy" / "ca" / "ca.crt").unlink(), os.mkfifo(d / "deploy" / "ca" / "ca.crt")), "ca.crt")
    school("ca-dir", ["s1", "--data-dir", "/srv/s1", *declared],
           lambda d: ((d / "deploy" / "ca" / "ca.crt").unlink(), (d / "deploy" / "ca" / "ca.crt").mkdir()), "ca.crt")
    school("ledger-key-garbage", ["s1", "--data-dir", "/srv/s1", *declared, "--state-dir", "/srv/state",
                                  "--ledger-key", "k.pub"], lambda d: (d / "k.pub").write_text("not a key"), "k.pub")
    school("ledger-key-dir", ["s1", "--data-dir", "/srv/s1", *declared, "--state-dir", "/srv/state",
                              "--ledger-key", "kdir"], lambda d: (d / "kdir").mkdir(), "kdir")
    school("ledger-key-no-state", ["s1", "--data-dir", "/srv/s1", *declared, "--ledger-key", "k.pub"],
           lambda d: (d / "k.pub").write_text("x"), "--state-dir")
    school("node-key-binary", ["s1", "--data-dir", "/srv/s1", *declared, "--state-dir", "/srv/state",
                               "--ledger-key", "k.pub", "--node-key", "n.pub"],
           lambda d: ((d / "n.pub").write_bytes(bytes(range(256))), write_ledger_key(d / "k.pub")), "n.pub")
    school("node-key-dir", ["s1", "--data-dir", "/srv/s1", *declared, "--state-dir", "/srv/state",
                            "--ledger-key", "k.pub", "--node-key", "ndir"],
           lambda d: ((d / "ndir").mkdir(), write_ledger_key(d / "k.pub")), "ndir")
    school("node-key-pem", ["s1", "--data-dir", "/srv/s1", *declared, "--state-dir", "/srv/state",
                            "--ledger-key", "k.pub", "--node-key", "k.pub"], lambda d: write_ledger_key(d / "k.pub"), "k.pub")
    return cases


def write_ledger_key(path: Path) -> None:
    """A school's real ledger public key (Ed25519 PEM), for cases about the SuperNode key beside it."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from privacy.signing import public_key_pem

    path.write_text(public_key_pem(ed25519.Ed25519PrivateKey.generate()))


def manifest_cases(t: Templates) -> list[Case]:
    """A broken deployment.json, read by `add-school` and by `status`."""
    cases = []
    home = DEPLOY_HOME
    manifests = {"list": b"[]", "binary": bytes(range(256)), "empty": b"", "deep": b"[" * 100000,
                 "port-str": b'{"version": 1, "coordinator": "h", "port": "x"}',
                 "nodes-list": b'{"version": 1, "coordinator": "h", "nodes": [1]}',
                 "node-bad": b'{"version": 1, "coordinator": "h", "nodes": {"a": {"name": "a", "role": "school", '
                             b'"runtime_port": "x", "node_config": {}}}}',
                 "version-2": b'{"version": 2}', "extra-field": b'{"version": 1, "coordinator": "h", "evil": 1}'}
    for name, data in manifests.items():
        cases.append(add_school_case(t, f"manifest-{name}", ["s1", "--data-dir", "/srv/s1"],
                                     lambda d, data=data: (d / "deploy" / "deployment.json").write_bytes(data),
                                     "deployment.json"))
        cases.append(Case("deploy", f"status-manifest-{name}", ["deploy", "status", "--dir", "deploy", *home],
                          lambda d, data=data: (copy_deploy(t, d), (d / "deploy" / "deployment.json").write_bytes(data)),
                          needle="deployment.json"))
    return cases


def status_and_evaluator_cases(t: Templates) -> list[Case]:
    """`fedfer deploy status` on a file, `fedfer deploy evaluator` without a CA or with a bad benchmark."""
    cases = []
    home = DEPLOY_HOME
    cases.append(Case("deploy", "status-dir-file", ["deploy", "status", "--dir", "afile", *home],
                      lambda d: (d / "afile").write_text("keep"), needle="afile"))
    cases.append(Case("deploy", "evaluator-no-ca", ["deploy", "evaluator", "--benchmark", "synthetic-fer2013",
                                                    "--dir", "deploy", *home],
                      lambda d: (copy_deploy(t, d), (d / "deploy" / "ca" / "ca.crt").unlink()), needle="ca.crt"))
    cases.append(Case("deploy", "evaluator-bad-spec", ["deploy", "evaluator", "--benchmark", "a,b", "--dir", "deploy",
                                                       *home], lambda d: copy_deploy(t, d), needle="a,b"))
    return cases


def _replaced(relative: str, make: Callable[[Path, bytes], None]) -> Callable[[Path], None]:
    """A case's change: the file at `relative` (under the case's folder) replaced by what `make(path, its
    original bytes)` puts there (nothing, other bytes, a folder, a FIFO...)."""
    def change(d: Path) -> None:
        path = d / relative
        text = path.read_bytes()
        path.unlink()
        make(path, text)
    return change


def recover_ledger_key_cases(t: Templates) -> list[Case]:
    """`fedfer deploy school-key --recover-ledger-key` at a school whose signing_key.pem is lost (the rotated
    school's state folder without it): its ledger damaged, missing or not a file, or a bogus --lost-key.
    Refused before anything is written (the recovery stages a key only after every check)."""
    cases = []

    def add(name: str, change: Callable[[Path], None], needle: str, extra: list[str] = ()) -> None:
        def setup(d: Path, change: Callable[[Path], None] = change) -> None:
            shutil.copytree(t.rotated / "schools" / "school-a", d / "state")
            (d / "state" / "signing_key.pem").unlink()   # the key is lost
            change(d)
        cases.append(Case("deploy", f"recover-{name}", ["deploy", "school-key", "--state-dir", "state",
                                                        "--recover-ledger-key", *extra], setup, needle=needle))

    def ledger(make: Callable[[Path, bytes], None]) -> Callable[[Path], None]:
        return _replaced("state/ledger.jsonl", make)

    def edited_entry(path: Path, text: bytes) -> None:   # an entry's ε changed: its hash no longer matches
        lines = text.decode().splitlines()
        entry = json.loads(lines[0])
        entry["epsilon"] = 0.001
        lines[0] = json.dumps(entry)
        path.write_text("\n".join(lines) + "\n")

    add("ledger-missing", ledger(lambda p, text: None), "ledger.jsonl")
    add("ledger-empty", ledger(lambda p, text: p.write_bytes(b"")), "ledger.jsonl")
    add("ledger-binary", ledger(lambda p, text: p.write_bytes(bytes(range(256)) * 4)), "ledger.jsonl")
    add("ledger-truncated", ledger(lambda p, text: p.write_bytes(text[:len(text) - 40])), "ledger.jsonl")
    add("ledger-edited", ledger(edited_entry), "ledger.jsonl")
    add("ledger-deep", ledger(lambda p, text: p.write_text("[" * 100000 + "\n")), "ledger.jsonl")
    add("ledger-dir", ledger(lambda p, text: p.mkdir()), "ledger.jsonl")
    add("ledger-fifo", ledger(lambda p, text: os.mkfifo(p)), "ledger.jsonl")
    add("key-not-lost", lambda d: write_signing_key(d / "state" / "signing_key.pem"), "signing_key.pem")
    add("no-public-key", lambda d: (d / "state" / "signing_key.pub").unlink(), "signing_key.pub")
    lost = ["--lost-key", "lost.pub"]
    add("lost-key-missing", lambda d: None, "lost.pub", lost)
    add("lost-key-garbage", lambda d: (d / "lost.pub").write_text("not a key"), "lost.pub", lost)
    add("lost-key-binary", lambda d: (d / "lost.pub").write_bytes(bytes(range(256))), "lost.pub", lost)
    add("lost-key-dir", lambda d: (d / "lost.pub").mkdir(), "lost.pub", lost)
    add("lost-key-fifo", lambda d: os.mkfifo(d / "lost.pub"), "lost.pub", lost)
    add("lost-key-oversized", lambda d: (d / "lost.pub").write_bytes(b"A" * (1 << 20)), "lost.pub", lost)
    add("lost-key-private", lambda d: write_signing_key(d / "lost.pub"), "lost.pub", lost)
    add("lost-key-another", lambda d: write_ledger_key(d / "lost.pub"), "--lost-key", lost)   # not this chain's key
    cases.append(Case("deploy", "school-key-lost-key-alone", ["deploy", "school-key", "--state-dir", "state",
                                                              "--lost-key", "lost.pub"],
                      lambda d: (shutil.copytree(t.rotated / "schools" / "school-a", d / "state"),
                                 write_ledger_key(d / "lost.pub")), needle="--lost-key"))
    return cases


def restore_ledger_cases(t: Templates) -> list[Case]:
    """`fedfer deploy restore-ledger` at the rotated school whose ledger.jsonl is lost, fed the coordinator's runs
    (anchors/ and run-1, run-2's copies; a key transition between them) with the anchor or a copy damaged, missing
    or not a file. Refused before anything is written; the intact folder is restored (accepted)."""
    cases = []

    def add(name: str, change: Callable[[Path], None], needle: str, expect: str = "refuse",
            argv: tuple[str, ...] = ("--state-dir", "state", "--school", "school-a", "--from", "runs"),
            may_rewrite: tuple[str, ...] = (), check: Callable[[Path], str] | None = None) -> None:
        def setup(d: Path, change: Callable[[Path], None] = change) -> None:
            shutil.copytree(t.rotated / "schools" / "school-a", d / "state")
            shutil.copytree(t.rotated / "runs", d / "runs")
            (d / "state" / "ledger.jsonl").unlink()   # the ledger is lost
            change(d)
        cases.append(Case("deploy", f"restore-{name}", ["deploy", "restore-ledger", *argv], setup, expect=expect,
                          needle=needle, may_rewrite=may_rewrite, check=check))

    def edited_entry(path: Path, text: bytes) -> None:   # an entry's ε lowered: its hash no longer matches
        lines = text.decode().splitlines()
        entry = json.loads(lines[-1])
        entry["epsilon"] = 0.001
        path.write_text("\n".join(lines[:-1] + [json.dumps(entry)]) + "\n")

    def edited_count(path: Path, text: bytes) -> None:   # count 0: would let a shorter chain pass
        data = json.loads(text)
        for chain in data["chains"].values():
            chain["count"] = 0
        path.write_text(json.dumps(data))

    anchor, copy = "runs/anchors/school-a.json", "runs/run-2/ledger/school-a.jsonl"
    add("intact", lambda d: None, "", expect="accept")
    for what, relative in (("anchor", anchor), ("copy", copy)):
        add(f"{what}-missing", _replaced(relative, lambda p, text: None), Path(relative).name)
        add(f"{what}-empty", _replaced(relative, lambda p, text: p.write_bytes(b"")), Path(relative).name)
        add(f"{what}-binary", _replaced(relative, lambda p, text: p.write_bytes(bytes(range(256)) * 4)), Path(relative).name)
        add(f"{what}-deep", _replaced(relative, lambda p, text: p.write_text("[" * 100000 + "\n")), Path(relative).name)
        add(f"{what}-dir", _replaced(relative, lambda p, text: p.mkdir()), Path(relative).name)
        add(f"{what}-fifo", _replaced(relative, lambda p, text: os.mkfifo(p)), Path(relative).name)
    add("anchor-count-edited", _replaced(anchor, edited_count), "school-a.json")
    add("copy-torn", _replaced(copy, lambda p, text: p.write_bytes(text[:len(text) - 40])), "school-a.jsonl")
    add("copy-edited", _replaced(copy, edited_entry), "school-a.jsonl")
    add("copy-cut-short", _replaced("runs/run-1/ledger/school-a.jsonl",
                                  lambda p, text: p.write_bytes(text.splitlines(keepends=True)[0])), "gap")
    add("ledger-present", lambda d: shutil.copy(t.rotated / "schools" / "school-a" / "ledger.jsonl",
                                                d / "state" / "ledger.jsonl"), "ledger.jsonl")
    add("no-public-key", lambda d: [(d / "state" / n).unlink() for n in ("signing_key.pem", "signing_key.pub")],
        "signing_key.pub")
    add("another-schools-key", lambda d: write_ledger_key(d / "state" / "signing_key.pub"), "school's own keys",
        argv=("--state-dir", "state", "--school", "school-a", "--from", "runs"))
    accountant_cases(t, add)
    add("school-name-path", lambda d: None, "../a", argv=("--state-dir", "state", "--school", "../a", "--from", "runs"))
    add("from-missing", lambda d: None, "nowhere", argv=("--state-dir", "state", "--school", "school-a", "--from", "nowhere"))
    add("from-file", lambda d: (d / "afile").write_text("keep"), "afile",
        argv=("--state-dir", "state", "--school", "school-a", "--from", "afile"))
    return cases


def _accountant_path(state: Path) -> Path:
    (path,) = state.glob("accountant-*.json")   # the rotated school trained from one dataset: one accountant
    return path


def _counted(history: list) -> dict[tuple[float, float], int]:
    """An accountant's history as the restore compares it: steps per (noise multiplier, sample rate)."""
    counts: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        counts[(sigma, rate)] = counts.get((sigma, rate), 0) + steps
    return counts


def accountant_cases(t: Templates, add: Callable[..., None]) -> None:
    """restore-ledger over the accountant of an old backup of the whole state folder (the ledger moved aside): one
    that counted less is accepted and brought up to the coordinator's copies; one that counted more, or counted a
    mechanism the copies never used, is refused (the newest entries are missing); a damaged one is refused."""
    full = _counted(json.loads(_accountant_path(t.rotated / "schools" / "school-a").read_text())["history"])

    def history(change: Callable[[list], list]) -> Callable[[Path], None]:
        def edit(d: Path) -> None:
            path = _accountant_path(d / "state")
            data = json.loads(path.read_text())
            data["history"] = change(data["history"])
            path.write_text(json.dumps(data))
        return edit

    def caught_up(d: Path) -> str:
        counted = _counted(json.loads(_accountant_path(d / "state").read_text())["history"])
        if counted != full:
            return f"the accountant counts {counted}, not the copies' {full}"
        if not (d / "state" / "ledger.jsonl").is_file():
            return "no ledger.jsonl written"
        return ""

    account = "state/accountant-*.json"   # the one file a restore over an old accountant rewrites
    add("accountant-counted-less", history(lambda h: h[:2]), "", expect="accept", may_rewrite=(account,),
        check=caught_up)
    add("accountant-counted-nothing", history(lambda h: []), "", expect="accept", may_rewrite=(account,),
        check=caught_up)
    add("accountant-counted-more", history(lambda h: h + h[-1:]), "counted more spending")
    add("accountant-other-mechanism", history(lambda h: h[:-1] + [[h[-1][0] * 2, h[-1][1], h[-1][2]]]),
        "counted more spending")
    add("accountant-torn", lambda d: _replaced_text(_accountant_path(d / "state"), lambda text: text[:40]),
        "accountant-")
    add("accountant-history-text", history(lambda h: "lots"), "accountant-")
    add("accountant-negative-steps", history(lambda h: h[:-1] + [[h[-1][0], h[-1][1], -h[-1][2]]]), "accountant-")


def _replaced_text(path: Path, change: Callable[[str], str]) -> None:
    path.write_text(change(path.read_text()))


def write_signing_key(path: Path) -> None:
    """An Ed25519 private key in PEM, as a school's signing_key.pem holds it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)   # as the school keeps it (a readable one is refused for that first)


def rotate_recovered_cases(t: Templates) -> list[Case]:
    """`fedfer deploy rotate s1 --ledger-key K --recovered` at the coordinator with a malformed key file, the
    keyring's current key damaged, or --recovered without --ledger-key."""
    cases = []

    def add(name: str, change: Callable[[Path], None], needle: str, key: str = "k.pub",
            args: list[str] | None = None) -> None:
        def setup(d: Path, change: Callable[[Path], None] = change) -> None:
            copy_school_deploy(t, d)
            change(d)
        argv = args if args is not None else ["--ledger-key", key, "--recovered"]
        cases.append(Case("deploy", f"rotate-recovered-{name}", ["deploy", "rotate", "s1", *argv, "--dir", "deploy",
                                                                 *DEPLOY_HOME], setup, needle=needle))

    add("key-missing", lambda d: None, "k.pub")
    add("key-empty", lambda d: (d / "k.pub").write_bytes(b""), "k.pub")
    add("key-garbage", lambda d: (d / "k.pub").write_text("not a key"), "k.pub")
    add("key-binary", lambda d: (d / "k.pub").write_bytes(bytes(range(256))), "k.pub")
    add("key-truncated-pem", lambda d: (write_ledger_key(d / "k.pub"),
                                        (d / "k.pub").write_text((d / "k.pub").read_text()[:60])), "k.pub")
    add("key-dir", lambda d: (d / "k.pub").mkdir(), "k.pub")
    add("key-fifo", lambda d: os.mkfifo(d / "k.pub"), "k.pub")
    add("key-oversized", lambda d: (d / "k.pub").write_bytes(b"A" * (1 << 20)), "k.pub")
    add("key-private", lambda d: write_signing_key(d / "k.pub"), "k.pub")
    add("key-rsa", lambda d: write_rsa_public_key(d / "k.pub"), "k.pub")
    add("keyring-garbage", lambda d: (write_ledger_key(d / "k.pub"),
                                      (d / "deploy" / "keys" / "s1.pub").write_text("x")), "s1.pub")
    add("keyring-fifo", lambda d: (write_ledger_key(d / "k.pub"), (d / "deploy" / "keys" / "s1.pub").unlink(),
                                   os.mkfifo(d / "deploy" / "keys" / "s1.pub")), "s1.pub")
    add("retired-is-file", lambda d: (write_ledger_key(d / "k.pub"),
                                      (d / "deploy" / "keys" / "s1.retired").write_text("x")), "s1.retired")
    add("without-ledger-key", lambda d: None, "--recovered", args=["--recovered"])
    return cases


def write_rsa_public_key(path: Path) -> None:
    """A valid public key of a type the ledger does not sign with."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def set_budget_cases(t: Templates) -> list[Case]:
    """`fedfer deploy set-budget s1 EPSILON` with a number that is no budget (privacy/policy.py's rule: finite,
    > 0, at most MAX_EPSILON); the experiments' ε 128 is recorded."""
    cases = []
    rewrite = ("deploy/deployment.json", "deploy/nodes/s1/node-config.toml")
    for value, needle, expect in (("nan", "budget", "refuse"), ("inf", "budget", "refuse"), ("-inf", "budget", "refuse"),
                                  ("-1", "budget", "refuse"), ("0", "budget", "refuse"), ("1e309", "budget", "refuse"),
                                  ("abc", "EPSILON", "refuse"), ("0x10", "EPSILON", "refuse"), ("", "EPSILON", "refuse"),
                                  ("1e300", "budget", "refuse"), ("128", "", "accept")):
        # "--" so that -1 and -inf are read as the value, as a user has to type them
        cases.append(Case("deploy", f"set-budget-{value or 'empty'}", ["deploy", "set-budget", "--dir", "deploy",
                                                                       *DEPLOY_HOME, "s1", "--", value],
                          lambda d: copy_school_deploy(t, d), expect=expect, needle=needle, may_rewrite=rewrite))
    cases.append(Case("deploy", "set-budget-unknown-school", ["deploy", "set-budget", "--dir", "deploy", *DEPLOY_HOME,
                                                              "nobody", "3"],
                      lambda d: copy_school_deploy(t, d), needle="nobody"))
    cases.append(Case("deploy", "set-budget-evaluator", ["deploy", "set-budget", "--dir", "deploy", *DEPLOY_HOME,
                                                         "s1", "3"],
                      lambda d: (copy_school_deploy(t, d), _make_evaluator(d / "deploy" / "deployment.json")),
                      needle="s1"))
    return cases


def scripts_cases(t: Templates) -> list[Case]:
    """`fedfer deploy scripts` (writes the start scripts again) where a script's place is taken by a folder."""
    cases = []
    scripts = ("deploy/coordinator/start-superlink.sh", "deploy/nodes/s1/start.sh")

    def add(name: str, change: Callable[[Path], None], needle: str = "", expect: str = "refuse") -> None:
        cases.append(Case("deploy", f"scripts-{name}", ["deploy", "scripts", "--dir", "deploy", *DEPLOY_HOME],
                          lambda d: (copy_school_deploy(t, d), change(d)), expect=expect, needle=needle,
                          may_rewrite=scripts))

    def folder_at(rel: str) -> Callable[[Path], None]:
        def change(d: Path) -> None:
            (d / rel).unlink()
            (d / rel).mkdir()
            (d / rel / "keep").write_text("keep")
        return change

    add("valid", lambda d: None, expect="accept")
    add("node-script-dir", folder_at(scripts[1]), "/start.sh: ")   # the script, not its temp file
    add("superlink-script-dir", folder_at(scripts[0]), "/start-superlink.sh: ")
    return cases


def cli_cases() -> list[Case]:
    """`fedfer` and its command groups without a sub-command print their help (exit 2, nothing written); an unknown
    sub-command or option is argparse's usage and one error line."""
    cases = []
    for words in ([], ["data"], ["deploy"], ["privacy"]):
        cases.append(Case("cli", "no-sub-command-" + ("-".join(words) or "fedfer"), words,
                          needle=" ".join(["usage: fedfer", *words]), report=True))   # the help is on stdout
    unknown = {"unknown-command": ["bogus"], "unknown-data-action": ["data", "bogus"], "unknown-option": ["--bogus"],
               "data-synth-unknown-option": ["data", "synth", "--bogus"]}
    for name, words in unknown.items():
        cases.append(Case("cli", name, words, needle=words[-1]))
    return cases


def _make_evaluator(manifest: Path) -> None:
    data = json.loads(manifest.read_text())
    data["nodes"]["s1"]["role"] = "evaluator"
    manifest.write_text(json.dumps(data))


def privacy_flag_cases() -> list[Case]:
    """`fedfer privacy canary-audit` and `privacy plan` with flags out of range; `privacy audit --json` with a
    usage error (it must still be one JSON object on stdout)."""
    cases = []
    quick = ["--epochs", "1", "--runs", "4"]
    for name, args, needle in (
            ("randomness-bogus", ["--randomness", "bogus"], "--randomness"),
            ("randomness-empty", ["--randomness", ""], "--randomness"),
            ("clipping-bogus", ["--clipping", "per-frame"], "--clipping"),
            ("canaries-0", ["--canaries", "0"], "--canaries"), ("canaries-neg", ["--canaries", "-5"], "--canaries"),
            ("canaries-1", ["--canaries", "1"], "--canaries"),
            ("canaries-text", ["--canaries", "many"], "--canaries"),
            ("canaries-float", ["--canaries", "1e3"], "--canaries"),
            ("canaries-huge", ["--canaries", str(10**12)], "--canaries"),
            ("canaries-per-run", ["--canaries", "50000", "--runs", "2"], "--canaries"),
            ("canaries-black-box-huge", ["--black-box", "--canaries", "10000000"], "--canaries"),
            ("runs-0", ["--canaries", "40", "--runs", "0"], "--runs"),
            ("epsilon-nan", ["--epsilon", "nan"], "--epsilon"), ("clip-inf", ["--clip", "inf"], "--clip"),
            ("delta-1", ["--delta", "1"], "--delta"), ("beta-0", ["--beta", "0"], "--beta"),
            ("model-unknown", ["--model", "resnet9000"], "--model")):
        cases.append(Case("privacy", f"canary-audit-{name}", ["privacy", "canary-audit", *quick, *args], needle=needle))
    plan = {"--epsilon": "4", "--delta": "1e-5", "--rounds": "4", "--local-epochs": "1", "--students": "48",
            "--batch": "16"}
    for name, change, needle in (
            ("points-0", {"--points": "0"}, "--points"), ("points-neg", {"--points": "-3"}, "--points"),
            ("points-text", {"--points": "all"}, "--points"), ("rounds-0", {"--rounds": "0"}, "rounds"),
            ("epsilon-nan", {"--epsilon": "nan"}, "psilon"), ("epsilon-0", {"--epsilon": "0"}, "psilon"),
            ("delta-0", {"--delta": "0"}, "elta"), ("students-0", {"--students": "0"}, "units"),
            ("batch-0", {"--batch": "0"}, "batch"), ("local-epochs-0", {"--local-epochs": "0"}, "epoch")):
        words = [w for k, v in {**plan, **change}.items() for w in (k, v)]
        cases.append(Case("privacy", f"plan-{name}", ["privacy", "plan", *words], needle=needle))
    for name, args, needle in (
            ("no-path", ["--json"], "required"),
            ("missing-path", ["nowhere", "--keys", ".", "--json"], "nowhere"),
            ("unknown-flag", [".", "--trust-run-keys", "--json", "--bogus"], "--bogus"),
            ("keys-no-value", [".", "--json", "--keys"], "--keys"),
            ("budget-text", [".", "--trust-run-keys", "--json", "--budget", "abc"], "--budget"),
            ("budget-nan", [".", "--trust-run-keys", "--json", "--budget", "nan"], "--budget"),
            ("no-keyring", [".", "--json"], "--keys"),
            ("anchors-file", [".", "--trust-run-keys", "--json", "--anchors", "afile"], "afile")):
        cases.append(Case("audit", f"json-{name}", ["privacy", "audit", *args],
                          lambda d: (d / "afile").write_text("keep"), needle=needle, report=True, json_stdout=True))
    return cases


def audit_cases(t: Templates) -> list[Case]:
    """`fedfer privacy audit` of a rotated school where it reads keys, anchors and policies (a retired-key folder,
    the keyring, the run's keys, the school's state directory, the server's anchors): a named pipe, a directory,
    a key of a type `cryptography` does not know, an oversized file. (A symlink to /dev/zero is in
    tests/test_fuzz_key_files.py, in-process: against an older checkout it fills the memory before a timeout.)"""
    import base64

    unknown_key_type = (b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(bytes.fromhex("302a300506032a0304032100")
                                                                         + bytes(32)) + b"-----END PUBLIC KEY-----\n")
    bad = {"pipe": os.mkfifo, "dir": lambda p: p.mkdir(), "unknown-key-type": lambda p: p.write_bytes(unknown_key_type),
           "oversized": lambda p: p.write_bytes(b"A" * (1 << 20))}
    keyring, run_keys = ["runs/run-2", "--keys", "deploy/keys"], ["runs/run-2", "--trust-run-keys"]
    state = ["schools/school-a", "--trust-run-keys", "--anchors", "runs/anchors"]
    files = {"keyring-retired": ("deploy/keys/school-a.retired/planted.pub", keyring),
             "keyring-current": ("deploy/keys/school-a.pub", keyring),
             "run-retired": ("runs/run-2/keys/school-a.retired/planted.pub", run_keys),
             "state-retired": ("schools/school-a/signing_key.retired/planted.pub", state),
             "anchor": ("runs/anchors/school-a.json", state),
             "keyring-policy": ("deploy/keys/school-a.policy.json", keyring)}
    cases = []
    for where, (rel, args) in files.items():
        for kind, make in bad.items():
            def setup(d: Path, rel: str = rel, make: Callable[[Path], None] = make) -> None:
                shutil.copytree(t.rotated, d, dirs_exist_ok=True)
                target = d / rel
                if target.exists():
                    target.unlink()
                make(target)
            cases.append(Case("audit", f"{where}-{kind}", ["privacy", "audit", *args], setup, needle=rel, report=True))
    return cases


def report_cases(t: Templates) -> list[Case]:
    cases = []
    rewrite = ("run/report.md", "run/plots/*")

    def add(name: str, setup: Callable[[Path], None], expect: str = "accept", needle: str = "") -> None:
        cases.append(Case("report", name, ["report", "run"], setup, expect=expect, needle=needle, may_rewrite=rewrite))

    def metrics_line(change: Callable[[dict], None]) -> Callable[[Path], None]:
        def setup(d: Path) -> None:
            run = copy_report(t, d)
            lines = (run / "metrics.jsonl").read_text().splitlines()
            first = json.loads(lines[0])
            change(first)
            lines[0] = json.dumps(first)
            (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return setup

    for field_name, value in (("train", "abc"), ("train", [1]), ("train", 5), ("evaluation", "x"),
                              ("evaluation", [1, 2]), ("evaluation", {"rafdb": 3}), ("timing", [1]),
                              ("timing", "slow"), ("evaluated_by", [1]), ("round", 10**15), ("round", -4),
                              ("round", "3"), ("train", {"school-0": {"status": 7}}), ("train", {"school-0": []})):
        add(f"{field_name}={json.dumps(value)[:20]}", metrics_line(lambda r, f=field_name, v=value: r.__setitem__(f, v)))
    for key, value in (("confusion", [[1, 2], [3]]), ("confusion", "abc"), ("confusion", [["a"]]), ("confusion", 7),
                       ("labels", 5), ("labels", [[1]]), ("n", [1]), ("accuracy", "high"),
                       ("accuracy_ci_low", "x")):
        add(f"rafdb.{key}={json.dumps(value)[:16]}",
            metrics_line(lambda r, k=key, v=value: r["evaluation"]["rafdb"].__setitem__(k, v)))

    def config(text: str) -> Callable[[Path], None]:
        return lambda d: (copy_report(t, d) / "config.yaml").write_text(text)

    add("config-laughs", config("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                                "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                                "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"))
    add("config-deep", config("x: " + "[" * 100000 + "]" * 100000 + "\n"))
    add("config-nan-rounds", config("federation:\n  rounds: .nan\n"))
    add("config-rounds-huge", config("federation:\n  rounds: 1000000000000\n"))
    add("config-binary", lambda d: (copy_report(t, d) / "config.yaml").write_bytes(bytes(range(256))))
    add("metrics-binary", lambda d: (copy_report(t, d) / "metrics.jsonl").write_bytes(bytes(range(256)) * 10))
    add("metrics-deep", lambda d: (copy_report(t, d) / "metrics.jsonl").write_text("[" * 100000 + "\n"))
    add("metrics-huge-int", lambda d: (copy_report(t, d) / "metrics.jsonl").write_text('{"round": ' + "9" * 5000 + "}\n"))
    add("events-event-list", lambda d: (copy_report(t, d) / "events.jsonl").write_text('{"event": [1]}\n'))
    add("report-md-dir", lambda d: ((copy_report(t, d) / "report.md").mkdir(), (d / "run" / "report.md" / "k").write_text("k")),
        expect="refuse", needle="report.md")
    add("plots-file", lambda d: (copy_report(t, d) / "plots").write_text("keep"), expect="refuse", needle="plots")
    add("not-a-dir", lambda d: (d / "run").write_text("x"), expect="refuse", needle="run")
    return cases


# ------------------------------------------------------------------------------------ running
def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            out[rel] = "special"
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def classify(case: Case, proc_rc: int | None, stderr: str, before: dict[str, str], after: dict[str, str],
             case_dir: Path, stdout: str = "") -> str:
    import fnmatch

    if proc_rc is None:
        return "hang"
    if case.marker and (case_dir / case.marker).exists():
        return "executed"
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if "internal error" in stderr:
        return "internal"
    changed = [p for p, h in before.items() if after.get(p) != h and h != "dir"]
    if proc_rc == 0:
        changed = [p for p in changed if not any(fnmatch.fnmatch(p, g) for g in case.may_rewrite)]
    if changed:
        return "damaged"
    if proc_rc != 0 and set(after) - set(before):
        return "wrote"
    if case.json_stdout and not _one_json_object_with_exit_code(stdout, proc_rc):
        return "not-json"
    if case.expect == "refuse":
        if proc_rc == 0:
            return "accepted"
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("usage:")
                 and not line.startswith("  ") and "Warning" not in line]
        if case.needle and case.needle not in (stdout + stderr if case.report else stderr):
            return "accepted"      # refused, but for another reason: what the case broke went unnoticed
        if len(lines) > 1 and not case.report:
            return "multiline"
        return "ok"
    if case.expect == "accept" and proc_rc != 0:
        return "refused-valid"     # a valid input refused: reported, not counted as a crash
    if case.expect == "accept" and case.check is not None and case.check(case_dir):
        return "wrong-result"
    return "ok"


def _one_json_object_with_exit_code(stdout: str, exit_code: int) -> bool:
    try:
        data = json.loads(stdout)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("exit_code") == exit_code


def run_case(case: Case, work: Path, timeout: float) -> dict:
    case_dir = Path(tempfile.mkdtemp(prefix=f"{case.surface}-", dir=work))
    if case.setup is not None:
        case.setup(case_dir)
    before = snapshot(case_dir)
    env = {**os.environ, "PYTHONPATH": str(CODE_ROOT), "OMP_NUM_THREADS": "1", "FLWR_HOME": str(case_dir / "flwr-home"),
           }
    env.pop("FEDFER_DEBUG", None)
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "fedfer", *case.argv], cwd=case_dir, env=env, capture_output=True,
                              text=True, timeout=timeout, errors="replace", start_new_session=True)
        rc, stderr, stdout = proc.returncode, proc.stderr, proc.stdout
    except subprocess.TimeoutExpired as exc:
        rc, stderr = None, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        stdout = ""
    seconds = time.perf_counter() - started
    after = snapshot(case_dir)
    outcome = classify(case, rc, stderr, before, after, case_dir, stdout)
    shown = stdout + stderr if case.report else stderr   # the audit: its verdict is the last line of stdout
    last = [line.replace(str(case_dir), "<case>") for line in shown.splitlines() if line.strip()]
    shutil.rmtree(case_dir, ignore_errors=True)
    return {"surface": case.surface, "case": case.name, "argv": case.argv, "exit": rc, "outcome": outcome,
            "seconds": round(seconds, 2), "stderr_last": last[-1][:300] if last else ""}


def main(argv: list[str] | None = None) -> int:
    global CODE_ROOT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code-root", type=Path, default=HERE, help="checkout whose fedfer is run (default: this one)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    parser.add_argument("--only", default="", help="comma-separated surfaces: config,override,resume,checkpoint,deploy,report,audit,privacy,cli")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    args = parser.parse_args(argv)
    CODE_ROOT = args.code_root.resolve()
    work = Path(tempfile.mkdtemp(prefix="fedfer-fuzz-"))
    try:
        templates = Templates(work)
        cases = (config_cases() + resume_cases(templates) + checkpoint_cases(templates) + deploy_cases(templates)
                 + report_cases(templates) + audit_cases(templates) + privacy_flag_cases() + cli_cases())
        only = {s for s in args.only.split(",") if s}
        if only:
            cases = [c for c in cases if c.surface in only]
        results = []
        for i, case in enumerate(cases, 1):
            result = run_case(case, work, args.timeout)
            results.append(result)
            if result["outcome"] != "ok":
                print(f"[{i}/{len(cases)}] {case.surface}/{case.name}: {result['outcome']} (exit {result['exit']}) "
                      f"{result['stderr_last'][:160]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    surfaces = sorted({r["surface"] for r in results})
    kinds = [k for k in OUTCOMES if any(r["outcome"] == k for r in results)]
    print(f"\n{'surface':<12}" + "".join(f"{k:>11}" for k in kinds) + f"{'cases':>8}")
    for s in surfaces:
        rows = [r for r in results if r["surface"] == s]
        print(f"{s:<12}" + "".join(f"{sum(r['outcome'] == k for r in rows):>11}" for k in kinds) + f"{len(rows):>8}")
    totals = {k: sum(r["outcome"] == k for r in results) for k in kinds}
    print(f"{'total':<12}" + "".join(f"{totals[k]:>11}" for k in kinds) + f"{len(results):>8}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        given = [("<code-root>" if a == str(args.code_root) else a) for a in (argv if argv is not None else sys.argv[1:])]
        head = json.dumps({   # no machine paths in the record: the code root is a placeholder
            "command": "python -m simulations.fuzz_inputs " + shlex.join(given),
            "code_root": "this checkout" if CODE_ROOT == HERE else "<code-root>", "timeout_s": args.timeout,
            "totals": totals}, indent=1)[:-2]
        rows = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in results)   # one case per line
        args.out.write_text(head + ',\n "cases": [\n' + rows + "\n ]\n}\n")
    bad = sum(totals.get(k, 0) for k in ("traceback", "internal", "hang", "damaged", "executed", "wrong-result"))
    return 1 if bad else 0


CODE_ROOT = HERE

if __name__ == "__main__":
    sys.exit(main())
