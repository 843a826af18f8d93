"""fedfer ClientApp: the Flower handlers, one per message type. A school's round is
client/school_round.py; the evaluation node scores public benchmarks.

What leaves a school: DP-noised weights, public values (status, school id, ε, σ, q, steps) and its
signed ledger entries — never a face, a landmark, a label list, a student id, a count, an un-noised
loss or a duration (tests/test_privacy_boundary.py, tests/test_privacy_neighbours.py).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from shared_models.threads import apply_threads, prefer_passive_waiting

prefer_passive_waiting()   # before torch loads OpenMP: idle threads sleep instead of spinning (shared_models/threads.py)

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node import NodeIdentity, identify
from shared_models.wire import LEDGER_ANCHOR_RECORD, PackingError, bundle, is_bundled, is_packed, pack_content, received_numpy, unbundle, unpack_content
from shared_models.models import registry
from shared_models.config import from_run_config
from shared_models.wording import one_line

logging.getLogger("flwr").propagate = False   # Opacus's root handler would print every record twice (server/app.py)

app = ClientApp()

MAX_ROUND = 10**9   # a round number the school's ledger keeps (privacy/ledger.py: counts up to 18 digits)

_BENCHMARK_CACHE: dict[tuple[str, str, int], Any] = {}


def _reply_status(msg: Message, status: str, reason: str, **extra: Any) -> Message:
    """A reply that declines the request; the server records `status` and `reason`."""
    record = ConfigRecord({"status": status, "reason": reason[:500], **{k: str(v) for k, v in extra.items()}})
    return Message(RecordDict({"status": record}), reply_to=msg)


def _request(msg: Message) -> RecordDict:
    """The request's records (a bundled request carries them all in one object: shared_models/wire.py)."""
    return unbundle(msg.content)


def _received_state(content: RecordDict) -> dict[str, torch.Tensor]:
    """The model the server sent, as a torch state dict (packed in one array per dtype or not)."""
    content = unpack_content(content, strict=True)
    return {k: torch.from_numpy(received_numpy(v, k)) for k, v in content.array_records["arrays"].items()}


def _reply(msg: Message, content: RecordDict) -> Message:
    """Reply in the form the request came in: packed model in, packed model out; bundled in, bundled out."""
    if "arrays" in content.array_records and (is_packed(msg.content) or is_bundled(msg.content)):
        content = pack_content(content)
        if is_bundled(msg.content):
            content = bundle(content)
    return Message(content, reply_to=msg)


def _setup(content: RecordDict, context: Context) -> tuple[dict[str, Any], NodeIdentity, ConfigRecord]:
    cfg = from_run_config(context.run_config)
    apply_threads(int(cfg["train.threads"]))
    round_config = content.config_records.get("config", ConfigRecord())
    node = identify(context.node_config, cfg, run_dir=str(round_config.get("run-dir", "")))
    return cfg, node, round_config


def _round_problem(round_config: ConfigRecord) -> str:
    """What is wrong with a train message's round and run id (the ServerApp's: a run directory's name and a
    round number), or ""."""
    server_round, run_id = round_config.get("server-round"), round_config.get("run-id")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or not 1 <= server_round < MAX_ROUND:
        return f"config field 'server-round' is {str(server_round)[:40]!r}, not a round number (1 to {MAX_ROUND - 1})"
    if not isinstance(run_id, str) or not 0 < len(run_id) <= 255 or not run_id.isprintable():
        return f"config field 'run-id' is {str(run_id)[:80]!r}, not a run directory's name"
    return ""


def _anchored_head(content: RecordDict) -> tuple[Any, str]:
    """(what the coordinator's anchor holds of this school's chain, problem): the train message's "ledger-anchor"
    record (`entries`, `head`; server/strategy.py `configure_train`) as an AnchoredHead, or None when there is no
    such record (the anchor holds nothing: a first round, a fresh enrolment, a new identity). A malformed record
    is a problem, never "nothing": the school declines rather than guess."""
    from privacy.state_folder import AnchoredHead

    if LEDGER_ANCHOR_RECORD not in content:
        return None, ""
    record = content[LEDGER_ANCHOR_RECORD]
    if not isinstance(record, ConfigRecord):   # the name on a metric or array record is not "no anchor"
        return None, f"record '{LEDGER_ANCHOR_RECORD}' is not a config record"
    extra = sorted(str(key)[:40] for key in record if key not in ("entries", "head"))
    if extra:   # another school's name, a budget, ...: the school reads nothing it was not built to read
        named = ", ".join(map(repr, extra[:5]))
        return None, f"record '{LEDGER_ANCHOR_RECORD}' holds {named}, not only 'entries' and 'head'"
    entries, head = record.get("entries"), record.get("head")
    if isinstance(entries, bool) or not isinstance(entries, int) or not 1 <= entries < MAX_ROUND:
        return None, f"record '{LEDGER_ANCHOR_RECORD}': 'entries' is {str(entries)[:40]!r}, not a count of entries"
    if not isinstance(head, str) or not re.fullmatch(r"[0-9a-f]{64}", head):
        return None, f"record '{LEDGER_ANCHOR_RECORD}': 'head' is {str(head)[:80]!r}, not an entry hash"
    return AnchoredHead(entries, head), ""


def _global_model(content: RecordDict, cfg: dict[str, Any]) -> torch.nn.Module:
    """The configured model holding the weights the server sent. Raises PackingError (one line) when they are
    malformed or are not this model's tensors: load_state_dict's RuntimeError spans lines and names every key."""
    model = registry.build_from_config(cfg)   # train.trainable freezes here, before the DP engine sees it
    received, expected = _received_state(content), model.state_dict()
    missing, unknown = sorted(set(expected) - set(received)), sorted(set(received) - set(expected))
    if missing or unknown:
        raise PackingError(f"the global model lacks {len(missing)} of the model's {len(expected)} tensors and holds "
                           f"{len(unknown)} tensor(s) it does not have (e.g. {(missing or unknown)[0][:80]!r})")
    for name, tensor in received.items():
        if tensor.shape != expected[name].shape:
            raise PackingError(f"the global model's {name[:80]!r} has shape {tuple(tensor.shape)}, not "
                               f"{tuple(expected[name].shape)}")
    model.load_state_dict(received, strict=True)
    return model


def _signing_key_pem(node: NodeIdentity) -> str:
    from privacy.signing import load_or_create_signing_key, public_key_pem

    assert node.state_dir is not None
    return public_key_pem(load_or_create_signing_key(node.state_dir))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's role and (for a school) its ledger public key."""
    cfg = from_run_config(context.run_config)
    try:
        round_config = _request(msg).config_records.get("config", ConfigRecord())
    except PackingError as exc:   # the server then counts this node as unknown (server/strategy.py), not a crash
        return _reply_status(msg, "declined", f"the query message: {one_line(str(exc))}")
    node = identify(context.node_config, cfg, run_dir=str(round_config.get("run-dir", "")))
    info: dict[str, Any] = {"role": node.role, "school-id": node.school_id}
    if node.role == "school":
        info["public-key"] = _signing_key_pem(node)
    return Message(RecordDict({"node": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of DP training at a school (client/school_round.py)."""
    from client.school_round import PhaseClock, run_round

    phases = PhaseClock()
    try:
        content = _request(msg)
    except PackingError as exc:   # a bundle that does not match its manifest: decline in one line, not a traceback
        return _reply_status(msg, "declined", f"the train message: {one_line(str(exc))}")
    cfg, node, round_config = _setup(content, context)
    if node.role != "school":
        return _reply_status(msg, "declined", f"node role is {node.role}, not school")
    problem = _round_problem(round_config)
    if problem:   # before anything is trained: these two go into the school's signed ledger entry
        return _reply_status(msg, "declined", problem)
    anchored, problem = _anchored_head(content)
    if problem:
        return _reply_status(msg, "declined", problem)
    server_round = int(round_config["server-round"])
    try:
        model = _global_model(content, cfg)
    except PackingError as exc:   # the coordinator's model is not this school's: nothing to train from
        return _reply_status(msg, "declined", one_line(str(exc)), school=node.school_id)
    phases.mark("receive")
    broken = next((name for name, value in model.state_dict().items()
                   if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
    if broken is not None:   # nothing trains from it: declining now spends no ε on a round that cannot learn
        return _reply_status(msg, "declined", f"the global model's '{broken}' holds NaN or Inf", school=node.school_id)
    try:
        outcome = run_round(node, cfg, model, run_id=str(round_config["run-id"]),
                            server_round=server_round, anchored=anchored, phases=phases)
    except Exception:  # noqa: BLE001 - Flower would send the exception's text, which may name private values
        from client.school_round import details_where

        _log_failure(node)
        phases.write(node, server_round, "failed")
        return _reply_status(msg, "failed", f"the school's round failed (details in {details_where(node)})",
                             school=node.school_id)
    if outcome.status != "ok":
        extra = {"setting": outcome.setting} if outcome.setting else {}
        reply = _reply_status(msg, outcome.status, outcome.reason, school=node.school_id, **extra)
        if outcome.ledger is not None:
            reply.content["ledger"] = ConfigRecord(outcome.ledger)
        phases.write(node, server_round, outcome.status)
        return reply
    reply = _reply(msg, RecordDict({
        "arrays": ArrayRecord(outcome.weights),
        "metrics": MetricRecord(outcome.metrics),
        "status": ConfigRecord({"status": "ok", "school": node.school_id}),
        "ledger": ConfigRecord(outcome.ledger),
    }))
    phases.mark("reply")
    phases.write(node, server_round, "ok")
    if not node.simulated:   # the next round's ε compositions, once this reply has gone (school_round.py)
        from client.school_round import after_reply, prepare_next_round

        after_reply(lambda: prepare_next_round(node, cfg))
    return reply


def _log_failure(node: NodeIdentity) -> None:
    """The school's own log gets the exception and its traceback (a simulated school's: its school.log, not the
    simulation's Flower log, which is the coordinator's); the reply only says the round failed."""
    import traceback
    from logging import ERROR

    from flwr.common.logger import log

    from client.school_round import school_log

    if node.simulated:
        school_log(node, f"{node.school_id}: the round failed:\n{traceback.format_exc().rstrip()}")
        return
    log(ERROR, "[fedfer client] %s: the round failed", node.school_id, exc_info=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The evaluation node: score the global model on every configured public benchmark."""
    started = time.perf_counter()
    try:
        content = _request(msg)
    except PackingError as exc:   # a bundle that does not match its manifest: decline in one line, not a traceback
        return _reply_status(msg, "declined", f"the evaluate message: {one_line(str(exc))}")
    cfg, node, round_config = _setup(content, context)
    if node.role != "evaluator":
        return _reply_status(msg, "declined", f"node role is {node.role}, not evaluator")
    try:
        model = _global_model(content, cfg)
    except PackingError as exc:   # the coordinator's model is not the configured one: nothing to score
        return _reply_status(msg, "declined", one_line(str(exc)))
    from shared_models.evaluation import evaluate_benchmarks, flatten_metrics

    results = evaluate_benchmarks(model, node.benchmarks, node.data_dir, cfg, cache=_BENCHMARK_CACHE)
    metrics = {**flatten_metrics(results), "eval-seconds": time.perf_counter() - started}  # no "." : not a benchmark
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
