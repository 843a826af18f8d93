"""fedfer ClientApp: one per school (DP training) plus the evaluation node (public benchmarks).

What leaves a school: model weights, counts, loss, ε, and its signed ledger entry. Never a face,
a landmark, a label list or a student id (tests/test_privacy_boundary.py checks every reply).
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node import NodeIdentity, identify
from shared_models.wire import is_packed, pack_content, unpack_content
from shared_models.datasets.school_folder import SchoolData, SchoolDataError, load_school
from shared_models.models import registry
from shared_models.config import from_run_config

app = ClientApp()

# Per-process caches: a simulated node's Ray actor (or a long-running deployed ClientApp process)
# serves many rounds; decoding a school's images or a benchmark once is enough.
_SCHOOL_CACHE: dict[Path, SchoolData] = {}
_BENCHMARK_CACHE: dict[tuple[str, str, int], Any] = {}


def _log(message: str) -> None:
    from flwr.common.logger import log
    from logging import INFO

    log(INFO, "[fedfer client] %s", message)


def _reply_status(msg: Message, status: str, reason: str, **extra: Any) -> Message:
    """A reply that declines the request; the server records `status` and `reason`."""
    record = ConfigRecord({"status": status, "reason": reason[:500], **{k: str(v) for k, v in extra.items()}})
    return Message(RecordDict({"status": record}), reply_to=msg)


def _received_state(msg: Message) -> dict[str, torch.Tensor]:
    """The model the server sent, as a torch state dict (packed in one array per dtype or not)."""
    content = unpack_content(msg.content, strict=True)
    return content.array_records["arrays"].to_torch_state_dict()


def _reply(msg: Message, content: RecordDict) -> Message:
    """Reply in the form the request came in: packed model in, packed model out."""
    if is_packed(msg.content) and "arrays" in content.array_records:
        content = pack_content(content)
    return Message(content, reply_to=msg)


def _setup(msg: Message, context: Context) -> tuple[dict[str, Any], NodeIdentity, ConfigRecord]:
    cfg = from_run_config(context.run_config)
    torch.set_num_threads(int(cfg["train.threads"]))
    round_config = msg.content.config_records.get("config", ConfigRecord())
    node = identify(context.node_config, cfg, run_dir=str(round_config.get("run-dir", "")))
    return cfg, node, round_config


def _school_data(node: NodeIdentity, cfg: dict[str, Any]) -> SchoolData:
    assert node.data_dir is not None
    if node.simulated and not node.data_dir.exists():
        from simulations import synth

        params = synth.params_from_config(cfg)
        synth.ensure_school(node.data_dir.parent.parent, params, int(node.school_id.split("-")[-1]))
    if node.data_dir not in _SCHOOL_CACHE:
        data = load_school(node.data_dir)
        if data.skipped:
            _log(f"{node.school_id}: {data.describe_skips()}")
        _SCHOOL_CACHE[node.data_dir] = data
    return _SCHOOL_CACHE[node.data_dir]


def _signing_key_pem(node: NodeIdentity) -> str:
    from privacy.signing import load_or_create_signing_key, public_key_pem

    assert node.state_dir is not None
    return public_key_pem(load_or_create_signing_key(node.state_dir))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's role and (for a school) its ledger public key."""
    cfg = from_run_config(context.run_config)
    round_config = msg.content.config_records.get("config", ConfigRecord())
    node = identify(context.node_config, cfg, run_dir=str(round_config.get("run-dir", "")))
    info: dict[str, Any] = {"role": node.role, "school-id": node.school_id}
    if node.role == "school":
        info["public-key"] = _signing_key_pem(node)
    return Message(RecordDict({"node": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of DP training at a school, guarded by its lifetime privacy budget."""
    started = time.perf_counter()
    cfg, node, round_config = _setup(msg, context)
    if node.role != "school":
        return _reply_status(msg, "declined", f"node role is {node.role}, not school")
    server_round = int(round_config.get("server-round", 0))
    run_id = str(round_config.get("run-id", ""))

    try:
        data = _school_data(node, cfg)
    except SchoolDataError as exc:
        return _reply_status(msg, "no-data", str(exc), school=node.school_id)
    if len(data) == 0:
        why = data.describe_skips() or f"{node.data_dir}: labels.csv lists no images"
        return _reply_status(msg, "no-data", f"no usable images: {why}", school=node.school_id)

    model = registry.scale_aux_losses(
        registry.build(str(cfg["model.name"]), num_classes=7, preset=str(cfg["model.preset"])), float(cfg["model.aux_loss_weight"]))
    model.load_state_dict(_received_state(msg), strict=True)
    seed = zlib.crc32(f"{cfg['run.seed']}/{node.school_id}/{server_round}".encode())
    torch.manual_seed(seed)

    # unit-weight: the server's unweighted average when client-level DP is on (one school, one vote)
    metrics: dict[str, Any] = {"num-examples": len(data), "num-students": data.num_students, "unit-weight": 1}
    records: dict[str, Any] = {}
    if bool(cfg["privacy.enabled"]):
        entry, run_entries, stats, refusal = _train_private(model, data, cfg, node, run_id, server_round, seed)
        ledger_record = ConfigRecord({"entry": json.dumps(entry, sort_keys=True), "school-id": node.school_id,
                                      "run-entries": json.dumps(run_entries, sort_keys=True)})
        if refusal is not None:
            reply = _reply_status(msg, "budget-exhausted", refusal, school=node.school_id)
            reply.content["ledger"] = ledger_record
            return reply
        metrics.update({"epsilon": entry["epsilon"], "epsilon-rdp": entry["epsilon_rdp"],
                        "noise-multiplier": entry["noise_multiplier"], "sample-rate": entry["sample_rate"]})
        records["ledger"] = ledger_record
    else:
        from client.training import FaceDataset, train_plain
        from shared_models.transforms import train_transform

        dataset = FaceDataset(data.images, data.labels, train_transform(model.input_size, bool(cfg["train.augment"])))
        stats = train_plain(model, dataset, cfg, epochs=int(cfg["train.local_epochs"]), seed=seed)
        metrics.update({"epsilon": float("inf"), "epsilon-rdp": float("inf"), "noise-multiplier": 0.0, "sample-rate": 0.0})
    metrics.update({"train-loss": float(stats["loss"]), "steps": int(stats["steps"]),
                    "frames": int(stats["frames"]), "train-seconds": time.perf_counter() - started})
    _log(f"{node.school_id} round {server_round}: {stats['steps']} steps, loss {stats['loss']:.3f}, ε {metrics['epsilon']:.3f}")
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord(metrics),
        "status": ConfigRecord({"status": "ok", "school": node.school_id}),
        **records,
    })
    return _reply(msg, content)


def _train_private(model: torch.nn.Module, data: SchoolData, cfg: dict[str, Any], node: NodeIdentity,
                   run_id: str, server_round: int, seed: int) -> tuple[dict, list[dict], dict[str, float], str | None]:
    """Budget guard -> DP-SGD -> signed ledger entry + lifetime accountant.

    Returns (this round's ledger entry, all of this run's entries, training stats, refusal reason or
    None). A refusal is itself a signed ledger entry (event "refused"), so an auditor sees that the
    school stopped, and why. All of the run's entries travel with each reply so the server's copy
    heals if it missed an earlier reply (lost message, coordinator restart).
    """
    from privacy.accounting import SchoolAccountant
    from privacy.budget import check_budget
    from privacy.ledger import SchoolLedger, record_refusal, record_round
    from privacy.signing import load_or_create_signing_key

    from client.training import plan_round, train_private

    assert node.state_dir is not None
    node.state_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_round(data, cfg)
    delta = float(cfg["privacy.delta"])
    budget = node.budget if node.budget is not None else float(cfg["privacy.budget"])
    accountant = SchoolAccountant(node.state_dir, node.school_id, data.fingerprint)
    ledger = SchoolLedger(node.state_dir, node.school_id, load_or_create_signing_key(node.state_dir))
    common = dict(run_id=run_id, round=server_round, privacy_unit=plan.unit, noise_multiplier=plan.noise_multiplier,
                  sample_rate=plan.sample_rate, max_grad_norm=plan.max_grad_norm, delta=delta, budget=budget,
                  accountant=str(cfg["privacy.accountant"]))
    decision = check_budget(accountant, (plan.noise_multiplier, plan.sample_rate, plan.steps), delta, budget)
    if not decision.allowed:
        entry = record_refusal(accountant, ledger, planned_steps=plan.steps, reason=decision.reason, **common)
        return entry, ledger.entries_for_run(run_id), {}, (f"{decision.reason}: ε would reach {decision.epsilon_after:.3f} > budget {budget:.3f} "
                           f"(spent {decision.epsilon_now:.3f})")

    stats = train_private(model, data, cfg, plan, seed)
    # The accountant is fed with the steps that actually ran, at the q the sampler used.
    entry = record_round(accountant, ledger, steps=int(stats["steps"]), **common)
    return entry, ledger.entries_for_run(run_id), stats, None


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The evaluation node: score the global model on every configured public benchmark."""
    started = time.perf_counter()
    cfg, node, round_config = _setup(msg, context)
    if node.role != "evaluator":
        return _reply_status(msg, "declined", f"node role is {node.role}, not evaluator")
    model = registry.scale_aux_losses(
        registry.build(str(cfg["model.name"]), num_classes=7, preset=str(cfg["model.preset"])), float(cfg["model.aux_loss_weight"]))
    model.load_state_dict(_received_state(msg), strict=True)
    from shared_models.evaluation import evaluate_benchmarks, flatten_metrics

    results = evaluate_benchmarks(model, node.benchmarks, node.data_dir, cfg, cache=_BENCHMARK_CACHE)
    metrics = {**flatten_metrics(results), "eval-seconds": time.perf_counter() - started}  # no "." : not a benchmark
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
