"""Who this node is: a school (with its data and state directories) or the evaluation node.

In deployment the answer comes from the SuperNode's node-config, written by `fedfer deploy`:
    role=school school-id=NAME data-dir=PATH state-dir=PATH [budget=E]
    role=evaluator benchmarks="fer2013=PATH,rafdb=PATH"
In simulation Flower gives each simulated node `partition-id` and `num-partitions`; partitions
0 .. schools-1 are the synthetic schools and partition `schools` is the evaluator (when enabled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class NodeIdentity:
    role: str                   # school | evaluator | spare
    school_id: str = ""
    data_dir: Path | None = None
    state_dir: Path | None = None
    budget: float | None = None
    benchmarks: str = ""        # evaluator: comma-separated benchmark specs
    simulated: bool = False


def _synthetic_root(cfg: Mapping[str, Any]) -> Path:
    from simulations import synth

    params = synth.params_from_config(cfg)
    return Path(cfg["data.root"]).expanduser() if cfg["data.root"] else synth.default_root(params)


def school_budgets(spec: str) -> dict[str, float]:
    """`"school-02=4.5,school-03=6"` -> {"school-02": 4.5, "school-03": 6.0}."""
    budgets: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        try:
            budgets[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"privacy.school_budgets: '{item}' must look like school-id=epsilon") from None
    return budgets


def identify(node_config: Mapping[str, Any], cfg: Mapping[str, Any], run_dir: str = "") -> NodeIdentity:
    """Map the node-config (deployment) or partition id (simulation) to a role."""
    if "role" in node_config:
        role = str(node_config["role"])
        if role == "evaluator":
            return NodeIdentity(role="evaluator", benchmarks=str(node_config.get("benchmarks", cfg["evaluation.benchmarks"])),
                                data_dir=Path(str(node_config["data-dir"])) if node_config.get("data-dir") else None)
        if role != "school":
            raise ValueError(f"node-config: role must be 'school' or 'evaluator', got {role!r}")
        for key in ("school-id", "data-dir", "state-dir"):
            if not node_config.get(key):
                raise ValueError(f"node-config: key '{key}' is required for a school node")
        budget = node_config.get("budget")
        return NodeIdentity(
            role="school",
            school_id=str(node_config["school-id"]),
            data_dir=Path(str(node_config["data-dir"])),
            state_dir=Path(str(node_config["state-dir"])),
            budget=float(budget) if budget not in (None, "") else None,
        )

    partition = int(node_config.get("partition-id", 0))
    schools = int(cfg["federation.schools"])
    if partition < schools:
        school_id = f"school-{partition:02d}"
        state_root = Path(cfg["privacy.state_dir"]).expanduser() if cfg["privacy.state_dir"] else Path(run_dir) / "schools"
        return NodeIdentity(
            role="school",
            school_id=school_id,
            data_dir=_synthetic_root(cfg) / "schools" / school_id,
            state_dir=state_root / school_id,
            budget=school_budgets(str(cfg["privacy.school_budgets"])).get(school_id),
            simulated=True,
        )
    if partition == schools and bool(cfg["federation.evaluator"]):
        return NodeIdentity(role="evaluator", benchmarks=str(cfg["evaluation.benchmarks"]),
                            data_dir=_synthetic_root(cfg), simulated=True)
    return NodeIdentity(role="spare", simulated=True)
