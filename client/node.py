"""Who this node is: a school (with its data and state directories and its privacy policy) or the
evaluation node.

In deployment the answer comes from the SuperNode's node-config, written by `fedfer deploy`, and is
read strictly — a missing, empty or misspelt key, or a bad value, stops the node with one line naming the
key: at start, before the SuperNode runs (`read_deployed`, from client/runtime/preflight.py, which the
start script runs first), and in the ClientApp (`identify`), with the same checks:
    role=school school-id=NAME data-dir=PATH state-dir=PATH
        unit=student delta=D budget=E max-round-epsilon=E declared-students=N   (the school's policy)
    role=evaluator benchmarks="fer2013=PATH,rafdb=PATH" [data-dir=PATH]
In simulation Flower gives each simulated node `partition-id` and `num-partitions`; partitions
0 .. schools-1 are the synthetic schools and partition `schools` is the evaluator (when enabled). A
simulated school's policy is `<state dir>/policy.json` (written by `fedfer simulate`). A node-config
with neither `role` nor `partition-id` is an error: only simulation makes simulated schools.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from privacy.policy import POLICY_KEYS, PolicyError, SchoolPolicy

SCHOOL_KEYS = ("role", "school-id", "data-dir", "state-dir", *POLICY_KEYS)
EVALUATOR_KEYS = ("role", "benchmarks", "data-dir")


class NodeConfigError(ValueError):
    """A node-config this node cannot run with, as one line naming the key."""


@dataclass(frozen=True)
class NodeIdentity:
    role: str                   # school | evaluator | spare
    school_id: str = ""
    data_dir: Path | None = None
    state_dir: Path | None = None
    policy: SchoolPolicy | None = None   # deployed school: from its node-config; simulated: from its state dir
    benchmarks: str = ""        # evaluator: comma-separated benchmark specs
    simulated: bool = False


def _synthetic_root(cfg: Mapping[str, Any]) -> Path:
    """The synthetic classroom a simulation reads: `fedfer simulate` builds it before Flower starts and
    puts its folder in `data.root`, so a simulated node only ever reads it."""
    if not str(cfg["data.root"]).strip():
        raise NodeConfigError("data.root is empty: a simulated node reads the synthetic classroom that "
                              "`fedfer simulate` (or `fedfer data synth`) built; pass data.root=<its folder>")
    return Path(str(cfg["data.root"])).expanduser()


def simulated_state_dir(cfg: Mapping[str, Any], run_dir: str | Path, school_id: str) -> Path:
    """Where a simulated school keeps its state (key, accountant, ledger, policy.json)."""
    root = Path(cfg["privacy.state_dir"]).expanduser() if cfg["privacy.state_dir"] else Path(run_dir) / "schools"
    return root / school_id


def _deployed(node_config: Mapping[str, Any], cfg: Mapping[str, Any] | None, source: str = "node-config") -> NodeIdentity:
    """A deployed node's identity from its node-config; `source` names it in errors (the ClientApp:
    'node-config'; the start script's check, client/runtime/preflight.py: the node-config.toml path).
    cfg None: no run-config (at start), so an evaluator without `benchmarks` gets none here."""
    role = str(node_config["role"])
    allowed = {"school": SCHOOL_KEYS, "evaluator": EVALUATOR_KEYS}.get(role)
    if allowed is None:
        raise NodeConfigError(f"{source}: key 'role' must be 'school' or 'evaluator', got {role!r}")
    for key in node_config:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise NodeConfigError(f"{source}: unknown key '{key}' for a {role} node ({hint}its keys: {', '.join(allowed)})")
    if role == "evaluator":
        data_dir = node_config.get("data-dir")
        if "benchmarks" in node_config:
            benchmarks = str(node_config["benchmarks"])
        else:
            benchmarks = str(cfg["evaluation.benchmarks"]) if cfg is not None else ""
        return NodeIdentity(role="evaluator", benchmarks=benchmarks, data_dir=Path(str(data_dir)) if data_dir else None)
    for key in ("school-id", "data-dir", "state-dir"):
        if not str(node_config.get(key, "")).strip():
            raise NodeConfigError(f"{source}: key '{key}' is required for a school node")
    try:
        policy = SchoolPolicy.from_mapping(node_config, source)
    except PolicyError as exc:
        raise NodeConfigError(str(exc)) from None
    return NodeIdentity(role="school", school_id=str(node_config["school-id"]), data_dir=Path(str(node_config["data-dir"])),
                        state_dir=Path(str(node_config["state-dir"])), policy=policy)


def read_deployed(node_config: Mapping[str, Any], source: str) -> NodeIdentity:
    """The checks `identify` applies to a deployed node's node-config, without a run: what the node's
    start script runs before the SuperNode starts (client/runtime/preflight.py), so a bad value stops
    the node at start instead of at its first round. Raises NodeConfigError naming `source` and the key."""
    if "role" not in node_config:
        raise NodeConfigError(f"{source}: key 'role' is required (role=school or role=evaluator)")
    return _deployed(node_config, None, source)


def identify(node_config: Mapping[str, Any], cfg: Mapping[str, Any], run_dir: str = "") -> NodeIdentity:
    """Map the node-config (deployment) or partition id (simulation) to a role."""
    if "role" in node_config:
        return _deployed(node_config, cfg)
    if "partition-id" not in node_config:
        raise NodeConfigError("node-config: key 'role' is required (role=school or role=evaluator); only a "
                              "simulation's nodes, which Flower gives a 'partition-id', run without one")
    partition = int(node_config["partition-id"])
    schools = int(cfg["federation.schools"])
    if partition < schools:
        school_id = f"school-{partition:02d}"
        return NodeIdentity(
            role="school",
            school_id=school_id,
            data_dir=_synthetic_root(cfg) / "schools" / school_id,
            state_dir=simulated_state_dir(cfg, run_dir, school_id),
            simulated=True,
        )
    if partition == schools and bool(cfg["federation.evaluator"]):
        return NodeIdentity(role="evaluator", benchmarks=str(cfg["evaluation.benchmarks"]),
                            data_dir=_synthetic_root(cfg), simulated=True)
    return NodeIdentity(role="spare", simulated=True)
