"""SchoolFedAvg: Flower's FedAvg (with FedAvgM's server momentum), taught who is a school and who is the
evaluation node.

Flower's FedAvg samples from every connected node and trusts every reply. fedfer needs more:
- learn each node's role (school / evaluator) and school id with a `query` message, the first time
  the node is seen (a school that reconnects later is asked again);
- send training only to schools that still have budget, evaluation only to the evaluation node;
- validate every reply (weights, NaN/Inf, update norm, signed ledger entry) and record refusals;
- write one metrics line, the ledger copies and a checkpoint per round, so a run can be resumed.

Pipelined evaluation: the evaluation node does not get a message exchange of its own after each
round. Round r's model is evaluated *during round r+1*: its `evaluate` message goes out in the same
`send_and_receive` as round r+1's train messages (it carries the current global model, i.e. round r's),
and its reply is taken out of the train replies before anything counts them as schools'. Round r's
metrics line is written when that reply arrives (`RoundHooks.round_settled`). Round r's checkpoint does not wait
for it: `RoundHooks.round_trained` writes it as soon as round r's released model exists (start of
`configure_evaluate`, after client-level DP noise if enabled), so a coordinator that stops during round
r+1 resumes after round r and no school's round is trained twice. The final round's
model, and the last model when training stops early, are evaluated in the usual separate exchange
(`configure_evaluate`). If the evaluation node did not answer, `round_settled` gets the record without
an evaluation and the server evaluates in-process, as before.
Aggregation itself is Flower's FedAvg (`aggregate_arrayrecords`) over the accepted replies, each school
weighted by the size its privacy policy declares (`declared-units`: public, and checked against the
sampling rate it trained at; an exact example count is private and never sent), or unweighted under
client-level DP; then Flower's FedAvgM server step when `federation.server_momentum` > 0
(Hsu et al. 2019: the server keeps a momentum of the rounds' average updates). Under student-level DP the
momentum is post-processing of the schools' DP releases, so it costs no privacy. The momentum vector is
part of the strategy state in every checkpoint, so a resumed run continues with it.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from shared_models.evaluation import LIST_METRICS
from shared_models.wire import ERROR_RECORD, PackingError, received_numpy
from shared_models import wording
from shared_models.wording import counted
from server.run_dir import RoundRecord, RunDirectory
from server.validation import RejectedUpdate, check_update


def short_reason(reason: str) -> str:
    """Flower wraps a ClientApp exception in Ray's traceback; keep the one line that says what happened."""
    if "Message:" in reason:
        reason = reason.rsplit("Message:", 1)[1]
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return one_line(lines[-1] if lines else "unknown error")


def one_line(text: Any, limit: int = 300) -> str:
    """Text a node sent, made fit for a log line or the run's files: no control characters (newlines, terminal
    escapes), whitespace collapsed, at most `limit` characters."""
    printable = "".join(ch if ch.isprintable() else " " for ch in str(text)[:4 * limit])
    return wording.one_line(printable)[:limit]


#: What a school's train reply says in its status record (client/app.py, client/school_round.py RoundReply)
STATUSES = ("ok", "declined", "no-data", "policy-violation", "budget-exhausted", "ledger-lost", "ledger-behind", "busy",
            "failed")
#: Why a school is selected no more in a run, as the finishing line words it (in this order).
LEFT_OUT_WORDING = {
    "budget": "declined on budget (budget-exhausted)",
    "policy": "declined on policy (policy-violation)",
    "ledger": "left out for a ledger the server rejected (events.jsonl)",
    "ledger-lost": "declined for a lost or out-of-date ledger (ledger-lost: fedfer deploy restore-ledger)",
    "ledger-behind": ("declined: its ledger lacks entries this server anchored, an old backup of its state folder "
                      "(ledger-behind: fedfer deploy restore-ledger)"),
    "before-resume": "left out before the resume (its checkpoint does not say why)",
    "offline": "offline",
}
#: School names the finishing line lists per reason (a district may have hundreds).
NAMES_SHOWN = 5
#: how often the SuperLink is asked for its nodes while a run's first round waits for a school
#: (`federation.first_round_wait`)
FIRST_SCHOOL_POLL_S = 3.0
#: how often the SuperLink is asked for its nodes while schools that went offline are waited for
#: (`federation.offline_wait`): one cheap request, and a returning school waits at most this long to be seen
OFFLINE_POLL_S = 3.0
#: The values a school's train reply carries in its "metrics" record (client/school_round.py `_ok_reply`)
TRAIN_METRICS = ("epsilon", "epsilon-rdp", "noise-multiplier", "sample-rate", "steps", "unit-weight", "declared-units")


@dataclass
class NodeInfo:
    role: str
    school_id: str = ""
    public_key_pem: str = ""
    pinned: bool = False     # its ledger key checked and kept in the run directory (when first sampled)


class RoundHooks(Protocol):
    """What the strategy tells the run directory's writer (server/round_writer.py) about each round."""

    def round_started(self) -> None: ...

    def round_trained(self, record: RoundRecord, arrays: ArrayRecord, strategy_state: dict[str, Any]) -> None:
        """The round's released model exists (checkpoint it before any evaluation)."""

    def round_settled(self, record: RoundRecord, arrays: ArrayRecord, strategy_state: dict[str, Any],
                      evaluator_expected: bool) -> None:
        """The round's evaluation is in (or will not come): write its metrics line."""

    def round_closed(self, record: RoundRecord) -> None:
        """The round's own exchanges are over (its pipelined evaluation may still be due)."""


class FederationFinished(Exception):
    """No school can train any more (budgets spent, or none came back online in `federation.offline_wait`) and
    every trained round is recorded: raised at the end of the last round (the one that found nobody left to
    train after it, or the one that found nobody to train), to end Flower's round loop there
    (`run_rounds`), instead of letting it run the remaining planned rounds with nothing to send. `why` is the
    log's words for it."""

    def __init__(self, stopped_after: int, planned: int, why: str = "no school can train any more") -> None:
        super().__init__(f"{why}: stopped after round {stopped_after} of {planned}")
        self.stopped_after = stopped_after
        self.planned = planned
        self.why = why


class NoRoundHooks:
    """Hooks that record nothing (tests that drive the strategy alone)."""

    def round_started(self) -> None:
        pass

    def round_trained(self, record: RoundRecord, arrays: ArrayRecord, strategy_state: dict[str, Any]) -> None:
        pass

    def round_settled(self, record: RoundRecord, arrays: ArrayRecord, strategy_state: dict[str, Any],
                      evaluator_expected: bool) -> None:
        pass

    def round_closed(self, record: RoundRecord) -> None:
        pass


class _AcceptedAverage(FedAvg):
    """FedAvg's aggregation step restricted to the replies SchoolFedAvg accepts.

    Sits below FedAvgM in SchoolFedAvg's bases, so FedAvgM's `aggregate_train` (the server momentum step)
    runs on top of this average, exactly as it runs on top of FedAvg's."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.average_accepted(server_round, replies)

    def average_accepted(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and average the accepted ones (SchoolFedAvg says which are accepted)."""
        raise NotImplementedError


class SchoolFedAvg(FedAvgM, _AcceptedAverage):
    """FedAvg(M) over schools with reply validation, a budget-aware sampler and an evaluation node."""

    def __init__(self, cfg: Mapping[str, Any], run: RunDirectory, round_offset: int = 0,
                 exhausted: Iterable[str] = (), momentum: list[torch.Tensor] | None = None,
                 rounds: RoundHooks | None = None, left_out: Mapping[str, str] | None = None) -> None:
        server_momentum = float(cfg["federation.server_momentum"])
        if server_momentum and bool(cfg["federation.client_dp"]):
            # Flower's client-DP wrapper noises what this strategy returns; a momentum built from the
            # un-noised averages would carry them into later releases unaccounted.
            log(WARNING, "[fedfer] federation.server_momentum is ignored with federation.client_dp=true")
            server_momentum = 0.0
        super().__init__(
            fraction_train=float(cfg["federation.fraction_train"]),
            min_train_nodes=1,
            min_available_nodes=1,
            min_evaluate_nodes=0,
            server_momentum=server_momentum,
        )
        # a resumed run continues with the momentum its checkpoint kept (None: starts afresh, as in round 1)
        self.momentum_vector = [np.asarray(m) for m in momentum] if momentum and server_momentum else None
        # FedAvg weighs each school by the size its policy declares (public; an exact example count is
        # private and never sent); client-level DP averages unweighted ("unit-weight", below)
        self.weighted_by_key = "declared-units"
        self.cfg = cfg
        self.run = run
        self.round_offset = round_offset
        self.nodes: dict[int, NodeInfo] = {}
        self.exhausted: set[str] = set(exhausted)
        # why each school in `exhausted` is left out (a key of LEFT_OUT_WORDING): what the finishing line says.
        # A resumed run takes it from its checkpoint (`left_out`); one written before it was kept has none
        self.left_out_why: dict[str, str] = {school: why for school, why in (left_out or {}).items()
                                             if school in self.exhausted and why in LEFT_OUT_WORDING}
        self.current_arrays: ArrayRecord | None = None
        self.record: RoundRecord | None = None
        self.rounds: RoundHooks = rounds if rounds is not None else NoRoundHooks()
        self.finished = False
        self.stopped_after = 0   # when finished: the last round of the federation (the rounds after it never ran)
        self.finished_why = "no school can train any more"   # the stop line's words (`_finish`)
        self.rng = random.Random(int(cfg["run.seed"]))
        # client-level DP: one school, one vote (the wrapper's clipping bound assumes an unweighted average)
        if bool(cfg["federation.client_dp"]):
            self.weighted_by_key = "unit-weight"
        self._train_messages: list[Message] = []   # this round's train messages (ids set by the grid on push)
        self._sent_at: float = 0.0
        # pipelined evaluation: the last round whose model waits for the evaluation node's verdict
        self.pending: tuple[RoundRecord, ArrayRecord] | None = None
        self._eval_message: Message | None = None    # the evaluate message riding with this round's training
        self._eval_target: RoundRecord | None = None  # the round the separate evaluate exchange is for
        # replies validated as they arrived (`replies_arrived`), by id of the reply Message: this round only
        self._validated: dict[int, tuple[str, dict[str, Any]]] = {}
        self._global_np: dict[str, np.ndarray] | None = None

    # -- who is who -----------------------------------------------------------------------------
    def _discover(self, grid: Grid) -> set[int]:
        """Ask nodes we have not met yet for their role; pin each school's ledger key. Returns the nodes
        connected now (asked again after a query exchange: one SuperLink request fewer per round)."""
        connected = set(grid.get_node_ids())
        unknown = [nid for nid in sorted(connected) if nid not in self.nodes]
        if not unknown:
            return connected
        config = ConfigRecord({"run-id": self.run.run_id, "run-dir": str(self.run.path)})
        messages = [Message(RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=nid)
                    for nid in unknown]
        # a simulation answers the queries on a few Ray actors one after another (~0.1 s each): 1,000
        # schools need more than the two minutes a deployment's nodes, answering side by side, ever do
        replies = list(grid.send_and_receive(messages, timeout=max(120.0, 0.5 * len(messages))))
        sent = sent_to(messages)
        for reply in replies:
            nid, mismatch = replying_node(reply, sent)
            if mismatch:
                self.run.event("query-error", node_id=nid, reason=mismatch)
                log(WARNING, "[fedfer] node %s: %s", nid, mismatch)
                continue
            if reply.has_error():
                reason = short_reason(reply.error.reason)
                self.run.event("query-error", node_id=nid, reason=reason)
                log(WARNING, "[fedfer] node %s did not answer the role query: %s", nid, reason)
                continue
            node, problem = self._node_info(reply.content, nid, connected)
            if problem:
                self.run.event("query-error", node_id=nid, reason=problem)
                log(WARNING, "[fedfer] node %s refused: %s", nid, problem)
                continue
            # a school's ledger key is checked and pinned when it is first sampled (`_pin_chosen`), so the
            # run directory holds keys of the schools that trained, not of every school that could have
            self.nodes[nid] = node
        return set(grid.get_node_ids())

    def _wait_for_a_school(self, grid: Grid, connected: set[int]) -> set[int]:
        """No school's node is online at the run's first round: wait for one (`federation.first_round_wait`
        seconds at most; a deployment's `fedfer deploy up &` then `flwr run` starts the run before the nodes
        connect, instead of ending it at once with nothing trained). Only then: a simulation's nodes all exist before the ServerApp starts, schools met before (even with
        their budgets spent) never make a run wait, and later rounds never do. (The evaluation node is not
        waited for: a run without one is normal, and a round it misses is evaluated in-process.)"""
        wait = float(self.cfg["federation.first_round_wait"])
        if wait <= 0:
            return connected
        deadline = time.monotonic() + wait
        log(INFO, "[fedfer] no school is online yet: waiting up to %g s for one (federation.first_round_wait)", wait)
        while not self.school_nodes() and time.monotonic() < deadline:
            time.sleep(min(FIRST_SCHOOL_POLL_S, max(0.0, deadline - time.monotonic())))
            connected = self._discover(grid)
        log(INFO, "[fedfer] online: %s", ", ".join(sorted(n.school_id for n in self.school_nodes().values()))
            or "no school")
        return connected

    def _node_info(self, content: RecordDict, nid: int, connected: set[int]) -> tuple[NodeInfo, str]:
        """A node's answer to the role query, or a one-line problem. A school id names files in the run
        directory and lines in its logs, so it must be a plain name; a school another connected node already
        is stays that node (a restarted school is asked again once its old node is gone)."""
        from shared_models.config import SCHOOL_ID

        info = content.config_records.get("node", ConfigRecord())
        role, school_id, key = (info.get(k, "") for k in ("role", "school-id", "public-key"))
        if role not in ("school", "evaluator", "spare"):
            return NodeInfo("unknown"), f"role {one_line(role, 40)!r} is not school, evaluator or spare"
        if role != "school":
            return NodeInfo(role), ""
        if not isinstance(school_id, str) or not SCHOOL_ID.match(school_id):
            return NodeInfo("unknown"), (f"school id {one_line(school_id, 80)!r} is not a name (letters, digits, "
                                         "'.', '_', '-', starting with a letter or digit, at most 64)")
        if not isinstance(key, str) or not key.lstrip().startswith("-----BEGIN"):
            return NodeInfo("unknown"), f"{school_id}: its ledger public key is not PEM text"
        holder = next((other for other, n in self.nodes.items()
                       if n.school_id == school_id and other != nid and other in connected), None)
        if holder is not None:
            return NodeInfo("unknown"), f"claims to be {school_id}, which node {holder} already is"
        return NodeInfo(role, school_id, key), ""

    def _pin_chosen(self, chosen: list[int]) -> list[int]:
        """The sampled nodes whose ledger key is (now) pinned; a school whose key is refused is rejected
        for the rest of the run."""
        kept = []
        for nid in chosen:
            node = self.nodes[nid]
            if not node.pinned:
                problem = self._pin_key(node)
                if problem:
                    self.run.event("rejected-school", school=node.school_id, node_id=nid, reason=problem)
                    log(WARNING, "[fedfer] %s rejected: %s", node.school_id, problem)
                    self.nodes[nid] = NodeInfo("rejected", node.school_id)
                    continue
                node.pinned = True
            kept.append(nid)
        return kept

    def _pin_key(self, node: NodeInfo) -> str:
        """Trust the school's ledger key from the keyring (deployment) or on first contact (simulation)."""
        from privacy.signing import (SigningKeyError, approve_recovery_key, load_public_key, public_key_pem,
                                     recovery_public_keys, retire_public_key, trusted_public_keys, write_public_key)

        key_file = self.run.key_path(node.school_id)
        keyring = str(self.cfg["privacy.keyring"])
        if keyring:
            trusted = Path(keyring).expanduser() / f"{node.school_id}.pub"
            if not trusted.is_file():
                return f"no ledger key for {node.school_id} in keyring {keyring}"
            expected = public_key_pem(load_public_key(trusted))
        elif key_file.is_file():
            expected = public_key_pem(load_public_key(key_file))
        else:
            expected = node.public_key_pem
        try:   # bytes: a key the node sent is PEM text, never a path this server would read
            sent = public_key_pem(load_public_key(node.public_key_pem.encode("utf-8", "replace")))
        except SigningKeyError as exc:
            return f"ledger public key: {one_line(exc, 120)}"
        if sent != expected:
            return "ledger public key differs from the trusted one"
        if keyring:   # the keys the school retired (`fedfer deploy rotate` keeps them): its copy may start under one
            for old in trusted_public_keys(trusted)[1:]:
                retire_public_key(key_file, old)
            for recovered in recovery_public_keys(trusted):   # approved by `rotate --recovered`: a key recovery
                approve_recovery_key(key_file, recovered)    # signed by one continues the school's chain
        write_public_key(key_file, expected)   # the run's pinned key of the school
        return ""

    def school_nodes(self) -> dict[int, NodeInfo]:
        return {nid: n for nid, n in self.nodes.items() if n.role == "school"}

    def evaluator_nodes(self) -> list[int]:
        return [nid for nid, n in self.nodes.items() if n.role == "evaluator"]

    # -- training ---------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        self.record = RoundRecord(rnd)
        self.current_arrays = arrays
        self._train_messages, self._eval_message = [], None
        self._validated, self._global_np = {}, None
        self.rounds.round_started()
        if self.finished:
            return []
        connected = self._discover(grid)
        # a node that is online but not a known node was refused (or did not answer) at the role query:
        # a simulation whose every school was refused ends at once rather than waiting for nobody
        if server_round == 1 and not self.school_nodes() and connected <= set(self.nodes):
            connected = self._wait_for_a_school(grid, connected)
        candidates = self._candidates(connected)
        offline_for = None
        if not candidates and server_round > 1 and not self._every_known_school_exhausted():
            # gone since the check between rounds (`configure_evaluate`): offline is not finished either
            connected = self._wait_for_schools_back(grid, connected, after_round=rnd - 1)
            candidates, offline_for = self._candidates(connected), float(self.cfg["federation.offline_wait"])
        if not candidates:
            self._finish(connected, first_round_not_run=rnd, offline_for=offline_for)
            return []
        count = max(int(round(len(candidates) * self.fraction_train)), min(int(self.cfg["federation.min_train_schools"]), len(candidates)), 1)
        chosen = self._pin_chosen(sorted(self.rng.sample(candidates, min(count, len(candidates)))))
        config["server-round"] = rnd
        config["run-id"] = self.run.run_id
        config["run-dir"] = str(self.run.path)
        self._train_messages = []
        for nid in chosen:
            school = self.nodes[nid].school_id
            anchored = self._anchored_head(school, rnd)
            if anchored is None:   # the server cannot read its own anchor of the school: it would reject the reply
                continue
            self.record.train[school] = {"status": "no-reply"}
            # the model and the round's config are shared by every school's message; what the anchor holds of the
            # school's chain is that school's alone (nothing about other schools)
            content = RecordDict({"arrays": arrays, "config": config, **anchored})
            self._train_messages.append(Message(content, message_type=MessageType.TRAIN, dst_node_id=nid))
        evaluators = [nid for nid in self.evaluator_nodes() if nid in connected]
        if self.pending is not None and evaluators:
            # the previous round's model (= this round's starting model, `arrays`) is evaluated while the
            # schools train; PackedGrid packs the shared ArrayRecord once for all of these messages
            self._eval_message = self._evaluate_message(arrays, self.pending[0].round, evaluators[0])
        self._sent_at = time.perf_counter()
        # the evaluation first: Flower stores and uploads an exchange's messages in list order, a node is
        # woken once its message's objects are uploaded (server/held_pulls.py), and the evaluation node
        # (a whole benchmark to score) is usually the last to answer, so it should start first
        return ([self._eval_message] if self._eval_message is not None else []) + self._train_messages

    def _anchored_head(self, school: str, rnd: int) -> dict[str, ConfigRecord] | None:
        """The train message's record of what this server anchored of the school's chain under the school's key
        pinned in this run (or a key it retired: a rotation not yet anchored): {LEDGER_ANCHOR_RECORD: entries and
        the last hash}, {} when nothing is anchored (a first round, a fresh enrolment, a new identity). The school
        refuses to train when its ledger lacks that entry (an old backup of its whole state folder,
        client/school_round.py), before anything leaves it, instead of this server rejecting the update after.
        None: the anchor is unreadable; the school is left out of the run (its reply would be rejected)."""
        from privacy.anchors import anchors_dir_of_run, load_chain
        from privacy.ledger import LedgerError
        from privacy.signing import SigningKeyError, trusted_public_keys
        from shared_models.wire import LEDGER_ANCHOR_RECORD

        try:
            anchors = anchors_dir_of_run(self.run.path)
            chain = next((c for key in trusted_public_keys(self.run.key_path(school))
                          if (c := load_chain(anchors, school, key))), None)
        except (LedgerError, SigningKeyError) as exc:
            self._leave_out(school, "ledger")
            self.run.event("ledger-anchor", round=rnd, school=school, problem="unreadable", reason=str(exc))
            log(WARNING, "[fedfer] %s not sent training: %s", school, exc)
            return None
        if not chain or int(chain["count"]) < 1:
            return {}
        return {LEDGER_ANCHOR_RECORD: ConfigRecord({"entries": int(chain["count"]), "head": str(chain["head"])})}

    #: run-config keys a school's policy refusal may name (privacy/policy.py `agree_round`)
    POLICY_SETTINGS = ("privacy.enabled", "privacy.unit", "privacy.delta", "privacy.budget", "privacy.school_budgets",
                       "privacy.max_round_epsilon", "privacy.target_epsilon", "privacy.noise_multiplier")

    def _asked(self, setting: Any, school: str) -> str:
        """What this run's config asked for `setting` (the key a school's policy refusal names), e.g.
        "privacy.budget=24" or "privacy.school_budgets school-00=30"; "" for a key a policy never names."""
        from privacy.policy import requested_budget

        if not isinstance(setting, str) or setting not in self.POLICY_SETTINGS or setting not in self.cfg:
            return ""
        if setting == "privacy.school_budgets":
            value, key = requested_budget(self.cfg, school)
            return f"privacy.school_budgets {school}={value:g}" if key == setting else ""
        value = self.cfg[setting]
        shown = f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        return f"{setting}={one_line(shown, 60)}"

    def _candidates(self, connected: set[int]) -> list[int]:
        """The connected schools that can still be sent training (not out of budget, not refused)."""
        return [nid for nid, n in self.school_nodes().items() if nid in connected and n.school_id not in self.exhausted]

    def _leave_out(self, school: str, why: str) -> None:
        """Select `school` no more in this run; `why` is a key of LEFT_OUT_WORDING."""
        self.exhausted.add(school)
        self.left_out_why[school] = why

    def _finish(self, connected: set[int], first_round_not_run: int, offline_for: float | None = None) -> None:
        """No school can train any more: say so once (log, events.jsonl `finished`); the federation ends after
        round `first_round_not_run` - 1 (`end_of_round` raises FederationFinished once that round is recorded).
        `offline_for`: the schools that could still train were offline and none came back in that many seconds."""
        self.finished = True
        self.stopped_after = first_round_not_run - 1
        # online but unknown: refused at the role query (e.g. every school refused the app), not "none connected"
        refused = len(connected - set(self.nodes))
        if offline_for is not None and not refused:
            self.finished_why = (f"no school that can train came back online within {offline_for:g} s" if offline_for > 0
                                 else "no school that can train is online")
            why = self._why_no_school_can_train(connected, refused)
            log(INFO, "[fedfer] %s (federation.offline_wait; %s): finishing", self.finished_why, why)
            self.run.event("finished", round=first_round_not_run, reason="no school online", waited_s=round(offline_for, 1),
                           refused_at_query=0, why=why)
            return
        why = self._why_no_school_can_train(connected, refused)
        log(INFO, "[fedfer] no school can train any more (%s): finishing", why)
        self.run.event("finished", round=first_round_not_run, reason="no school can train", refused_at_query=refused,
                       why=why)

    def _why_no_school_can_train(self, connected: set[int], refused: int) -> str:
        """What the server knows about why no school is left, e.g. "2 schools declined on budget
        (budget-exhausted): school-00, school-01; 1 school offline: school-02" (it said "budgets exhausted or none
        connected" whatever it knew)."""
        groups: dict[str, list[str]] = {}
        for nid, node in self.school_nodes().items():
            if node.school_id in self.exhausted:
                why = self.left_out_why.get(node.school_id, "before-resume")
            elif nid not in connected:
                why = "offline"
            else:   # a candidate: _finish is not called while one is left
                continue
            groups.setdefault(why, []).append(node.school_id)
        parts = [f"{counted(refused, 'online node')} refused or did not answer the role query: see the warnings "
                 f"above"] if refused else []
        for why, wording in LEFT_OUT_WORDING.items():
            if names := sorted(groups.get(why, [])):
                shown = ", ".join(names[:NAMES_SHOWN]) + (f" and {len(names) - NAMES_SHOWN} more"
                                                          if len(names) > NAMES_SHOWN else "")
                parts.append(f"{counted(len(names), 'school')} {wording}: {shown}")
        if not self.school_nodes() and not refused:
            parts.append("no school connected")
        return "; ".join(parts)

    def _wait_for_schools_back(self, grid: Grid, connected: set[int], after_round: int) -> set[int]:
        """Between rounds no school that could train is online, but not every one is out of budget: a deployment's
        schools go offline and come back (a restarted node, a network outage, a school's night-time shutdown), so
        this waits up to `federation.offline_wait` seconds for one (asking the SuperLink every
        OFFLINE_POLL_S), says who came back, and returns the nodes online then. The caller stops the
        federation if still nobody can train. Nothing is sent meanwhile: the round waited for has not started.
        `connected`: the nodes online now (just asked)."""
        wait = float(self.cfg["federation.offline_wait"])
        able = sorted(n.school_id for n in self.school_nodes().values() if n.school_id not in self.exhausted)
        if wait <= 0:
            return connected
        log(INFO, "[fedfer] after round %d no school that can train is online (%s offline): waiting up to %g s "
            "for one to come back (federation.offline_wait)", after_round, ", ".join(able) or "none met yet", wait)
        started = time.monotonic()
        while not self._candidates(connected) and time.monotonic() - started < wait:
            time.sleep(min(OFFLINE_POLL_S, max(0.0, wait - (time.monotonic() - started))))
            connected = self._discover(grid)
        waited = time.monotonic() - started
        if self.record is not None:
            self.record.timing["offline_wait_s"] = self.record.timing.get("offline_wait_s", 0.0) + waited
        back = sorted(self.nodes[nid].school_id for nid in self._candidates(connected))
        if back:
            log(INFO, "[fedfer] back online after %.0f s: %s", waited, ", ".join(back))
        return connected

    def _every_known_school_exhausted(self) -> bool:
        """Every school met so far declined on its budget or policy (so it declines every later round)."""
        return all(n.school_id in self.exhausted for n in self.school_nodes().values())

    def _evaluate_message(self, arrays: ArrayRecord, rnd: int, node_id: int) -> Message:
        config = ConfigRecord({"server-round": rnd, "run-dir": str(self.run.path)})
        return next(iter(self._construct_messages(RecordDict({"arrays": arrays, "config": config}), [node_id],
                                                  MessageType.EVALUATE)))

    def take_evaluation(self, replies: Iterable[Message]) -> list[Message]:
        """Remove the evaluation node's reply from a round's train replies and record it for the pending
        round; returns the schools' replies. Safe to call twice (client-DP's wrapper calls it first)."""
        replies = list(replies)
        if self._eval_message is None:
            return replies
        eval_id = self._eval_message.metadata.message_id
        mine = [r for r in replies if eval_id and r.metadata.reply_to_message_id == eval_id]
        for reply in mine if self.pending is not None else []:   # None: recorded already (replies_arrived)
            if self._record_evaluation(reply, self.pending[0]) is not None and self.record is not None:
                self.pending[0].evaluated_in_round = self.record.round
        return [r for r in replies if not (eval_id and r.metadata.reply_to_message_id == eval_id)]

    def replies_arrived(self, replies: list[Message]) -> None:
        """Grid hook (server/transport.PollingGrid `on_replies`): replies of the train exchange as they come
        in, while the schools still training are awaited. The evaluation node's reply settles the previous
        round now (its metrics line), and each school's reply gets now the validation `average_accepted`
        would give it (same checks, same order: arrival order), so the round's end waits only for the last
        reply's. Replies to other exchanges (role queries, the final evaluation) are left alone. Not used
        under client-level DP: Flower's wrapper clips the replies before they reach `average_accepted`."""
        sent = sent_to(self._train_messages)
        if self.record is None or not sent:
            return
        schools = self.take_evaluation(replies)
        if len(schools) < len(replies):
            self._flush_pending()
        for reply in schools:
            if reply.metadata.reply_to_message_id in sent and id(reply) not in self._validated:
                self._validated[id(reply)] = self._validate(reply, sent)

    def _flush_pending(self) -> None:
        """Hand the pending round to the writer (with or without the evaluation node's result)."""
        if self.pending is None:
            return
        record, arrays = self.pending
        self.pending = None
        self.rounds.round_settled(record, arrays, self.state(), evaluator_expected=bool(self.evaluator_nodes()))

    def round_done(self, record: RoundRecord | None, arrays: ArrayRecord, pipeline: bool) -> None:
        """End of a round's training (and, for the final round, its evaluation); `record` None: nothing
        trained this round.

        With `pipeline`, a round that has no evaluation yet waits for the next round's training exchange;
        otherwise it is handed to the writer now (which evaluates in-process if nothing came back).
        """
        self._flush_pending()
        if record is None:
            return
        if pipeline and not record.evaluation and self.evaluator_nodes():
            self.pending = (record, arrays)
        else:
            self.rounds.round_settled(record, arrays, self.state(), evaluator_expected=bool(self.evaluator_nodes()))

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's `evaluate_fn`, called after each round's training (and the final round's evaluation):
        the round is done, so its record goes to the writer now or waits for its pipelined evaluation.
        Evaluates nothing itself; returns None so Flower records nothing of its own. Raises FederationFinished
        once no school can train any more and every trained round is handed to the writer."""
        record = self.record
        if server_round == 0 or record is None:
            return None
        if self.finished and not record.train:
            self.round_done(None, arrays, pipeline=False)   # the last trained round, if still waiting
        else:
            self.round_done(record, arrays, pipeline=not self.is_final_round(server_round))
            self.rounds.round_closed(record)
        if self.finished:
            # everything trained is recorded: end Flower's round loop here, so the rounds that cannot train
            # print no round lines (`run_rounds` catches this)
            raise FederationFinished(stopped_after=self.stopped_after, planned=int(self.cfg["federation.rounds"]),
                                     why=self.finished_why)
        return None

    def average_accepted(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply; the example-weighted average of the accepted ones (FedAvg's step)."""
        assert self.record is not None and self.current_arrays is not None
        rnd = self.record.round
        self.record.timing["train_exchange_s"] = time.perf_counter() - self._sent_at
        replies = self.take_evaluation(replies)
        if self._train_messages:   # training happened, so the previous round's evaluation had its chance
            self._flush_pending()
        accepted: list[RecordDict] = []
        sent = sent_to(self._train_messages)
        for reply in replies:
            school, outcome = self._validated.pop(id(reply), None) or self._validate(reply, sent)
            self.record.train[school] = outcome
            if outcome["status"] == "ok":
                accepted.append(reply.content)
        for school, outcome in self.record.train.items():
            if outcome["status"] == "no-reply":
                self.run.event("missing", round=rnd, school=school, reason="no reply before the round timeout")
        if self.finished:   # configure_train sent nothing: the federation is over, there is no round to report
            return None, None
        min_schools = int(self.cfg["federation.min_train_schools"])
        needed = min(min_schools, max(1, len(self.record.train)))
        if len(accepted) < needed or not accepted:
            log(WARNING, "[fedfer] round %d: %s (at least %d needed): global model unchanged", rnd,
                counted(len(accepted), "accepted reply", "accepted replies"), needed)
            return None, None
        self.record.aggregated = True
        arrays = aggregate_arrayrecords(accepted, self.weighted_by_key)
        self.record.num_aggregated = len(accepted)
        return arrays, MetricRecord({"schools": len(accepted)})

    def _validate(self, reply: Message, sent: Mapping[str, int]) -> tuple[str, dict[str, Any]]:
        """(school, outcome recorded in metrics.jsonl) of one train reply; rejections are logged as events."""
        assert self.record is not None and self.current_arrays is not None
        rnd = self.record.round
        # the node we sent the message to, not the reply's sender field: the SuperLink's error reply for a
        # school that died comes from the SuperLink itself (node id 1)
        nid, mismatch = replying_node(reply, sent)
        node = self.nodes.get(nid, NodeInfo("unknown"))
        school = node.school_id or f"node-{nid}"
        if mismatch:
            self.run.event("rejected", round=rnd, school=school, reason=mismatch)
            log(WARNING, "[fedfer] rejected %s in round %d: %s", school, rnd, mismatch)
            return school, {"status": "rejected", "reason": mismatch}
        if self._global_np is None:
            self._global_np = {k: v.numpy() for k, v in self.current_arrays.items()}
        return school, self._accept(reply, school, node, rnd, self._global_np)

    def _accept(self, reply: Message, school: str, node: NodeInfo, rnd: int, global_np: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Validate one training reply; returns the per-school outcome recorded in metrics.jsonl."""
        if reply.has_error():
            reason = f"client error: {short_reason(reply.error.reason)}"
            self.run.event("client-error", round=rnd, school=school, reason=reason)
            return {"status": "error", "reason": reason}
        content = reply.content
        if ERROR_RECORD in content.config_records:   # PackedGrid could not unpack the reply's weights
            reason = f"packed weights do not match their layout: {content[ERROR_RECORD].get('reason', '')}"
            reason = wording.one_line(reason)
            self.run.event("rejected", round=rnd, school=school, reason=reason)
            log(WARNING, "[fedfer] rejected %s in round %d: %s", school, rnd, reason)
            return {"status": "rejected", "reason": reason}
        status = content.config_records.get("status", ConfigRecord({"status": "ok"}))
        if status.get("status") not in STATUSES:
            reason = f"status {one_line(status.get('status'), 40)!r} is not one of {', '.join(STATUSES)}"
            self.run.event("rejected", round=rnd, school=school, reason=reason)
            log(WARNING, "[fedfer] rejected %s in round %d: %s", school, rnd, reason)
            return {"status": "rejected", "reason": reason}
        if status.get("status") != "ok":
            outcome = {"status": str(status["status"]), "reason": one_line(status.get("reason", ""))}
            if outcome["status"] == "policy-violation":
                asked = self._asked(status.get("setting"), school)
                if asked:   # the school names only the key; what the run asked of it is the coordinator's to say
                    outcome["reason"] = f"{outcome['reason']}; the run asks {asked}"
            left_out = {"budget-exhausted": "budget", "policy-violation": "policy", "ledger-lost": "ledger-lost",
                        "ledger-behind": "ledger-behind"}
            if outcome["status"] in left_out:
                # a school that declines on its budget, its policy, a lost ledger or one behind the anchor declines
                # every later round of the run too (a restored ledger trains again from the next run)
                self._leave_out(school, left_out[outcome["status"]])
                if "ledger" in content.config_records and node.role == "school":
                    try:  # the school's signed refusal goes into the run's ledger copy like any entry
                        self._store_ledger(content, school, rnd)
                    except RejectedUpdate as exc:
                        log(WARNING, "[fedfer] %s: refusal entry not stored: %s", school, exc)
            self.run.event("declined", round=rnd, school=school, **outcome)
            log(INFO, "[fedfer] %s declined round %d: %s", school, rnd, outcome["reason"])
            return outcome
        ledger_checked = False
        try:
            if node.role != "school":
                raise RejectedUpdate("reply from a node that is not a registered school")
            # exactly one of each: Flower's FedAvg averages every ArrayRecord and weighs by the first MetricRecord
            if len(content.array_records) != 1 or list(content.metric_records) != ["metrics"]:
                raise RejectedUpdate("reply must carry one ArrayRecord and one MetricRecord, 'metrics'")
            try:
                reply_np = {k: received_numpy(v, k) for k, v in content.array_records.get("arrays", {}).items()}
            except PackingError as exc:
                raise RejectedUpdate(str(exc)) from None
            norm = check_update(global_np, reply_np, float(self.cfg["federation.max_update_norm"]))
            metrics = dict(content["metrics"])
            _check_train_metrics(metrics)
            if metrics.get("unit-weight") != 1:
                raise RejectedUpdate(f"unit-weight {metrics.get('unit-weight')!r}: must be 1")
            _check_declared_weight(metrics)
            if bool(self.cfg["privacy.enabled"]):
                ledger_checked = True
                self._store_ledger(content, school, rnd)
        except RejectedUpdate as exc:
            self.run.event("rejected", round=rnd, school=school, reason=str(exc))
            log(WARNING, "[fedfer] rejected %s in round %d: %s", school, rnd, exc)
            if not ledger_checked and node.role == "school" and bool(self.cfg["privacy.enabled"]) \
                    and "ledger" in content.config_records:
                # the weights are refused, but the school did train and spend: its signed entry goes into the
                # run's copy like a refusal's, so the run's ε per school (summary, report) counts that round
                try:
                    self._store_ledger(content, school, rnd)
                except RejectedUpdate as ledger_problem:
                    log(WARNING, "[fedfer] %s: ledger entry of the rejected reply not stored: %s", school, ledger_problem)
            return {"status": "rejected", "reason": str(exc)}
        return {"status": "ok", "update_norm": norm, **{k.replace("-", "_"): v for k, v in metrics.items()}}

    def _store_ledger(self, content: RecordDict, school: str, rnd: int) -> None:
        from privacy.anchors import (anchors_dir_of_run, check_continues, load_chain, unanchored_transition,
                                     update_anchor)
        from privacy.ledger import (GENESIS_HASH, KEY_RECOVERY, LedgerError, ServerLedgerCopy, chain_start_key,
                                    check_entry_fields, read_ledger_file)
        from privacy.signing import key_id, trusted_public_keys

        if "ledger" not in content.config_records:
            raise RejectedUpdate("private training reply without a signed ledger entry")
        entry = _ledger_json(content.config_records["ledger"], "entry", dict)
        if entry.get("school_id") != school or entry.get("round") != rnd or entry.get("run_id") != self.run.run_id:
            raise RejectedUpdate(f"ledger entry is for {one_line(entry.get('school_id'), 80)} round "
                                 f"{one_line(entry.get('round'), 40)} run {one_line(entry.get('run_id'), 80)}, "
                                 f"expected {school} round {rnd} run {self.run.run_id}")
        run_entries = _ledger_json(content.config_records["ledger"], "run-entries", list) or [entry]
        if not all(isinstance(e, dict) for e in run_entries):
            raise RejectedUpdate("ledger field 'run-entries' must be a list of entries")
        if run_entries[-1].get("hash") != entry.get("hash"):
            raise RejectedUpdate("ledger entry is not the last of the run entries sent with it")
        try:   # field types first: the anchor check below reads the first entry before its signature is verified
            for i, e in enumerate(run_entries, start=1):
                check_entry_fields(e, f"reply from school {school} entry {i}")
        except LedgerError as exc:
            raise RejectedUpdate(f"ledger entry does not verify: {exc}") from None
        recovery = next((e for e in run_entries if e.get("event") == KEY_RECOVERY), None)
        problem = self._approve_recovery(school, recovery) if recovery is not None else ""
        if problem:
            # not selected again in this run: every round it trained would spend privacy into a reply refused here
            self._leave_out(school, "ledger")
            self.run.event("ledger-recovery", round=rnd, school=school, reason=problem)
            raise RejectedUpdate(problem)
        # the pinned key, then the ones it replaced (from the keyring, or a key transition in this run)
        trusted = trusted_public_keys(self.run.key_path(school))
        public_key = trusted[0]
        anchors = anchors_dir_of_run(self.run.path)
        try:
            # entries that begin with a key transition continue the chain anchored under the (trusted) old key
            start_key = chain_start_key(run_entries, trusted, f"reply from school {school}")
        except LedgerError as exc:
            raise RejectedUpdate(f"ledger entry does not verify: {exc}") from None
        try:
            chain = load_chain(anchors, school, start_key)
        except LedgerError as exc:
            raise RejectedUpdate(f"ledger anchor: {exc}") from None
        if chain is None and run_entries[0].get("prev_hash") != GENESIS_HASH:
            # continues a chain under a key the server never anchored: a key change it never received (a key
            # recovery in a reply it refused). It must carry at least what the school's retired keys anchored.
            try:
                chain = next((c for k in trusted[1:] if (c := load_chain(anchors, school, k))), None)
            except LedgerError as exc:
                raise RejectedUpdate(f"ledger anchor: {exc}") from None
        if chain is None and key_id(start_key) != key_id(public_key):
            check = unanchored_transition(anchors, school, start_key)
            if check.problem:
                self._leave_out(school, "ledger")
                self.run.event("ledger-anchor", round=rnd, school=school, problem=check.kind, reason=check.problem)
                raise RejectedUpdate(f"ledger does not continue the server's anchor ({check.kind}): {check.problem}")
        if chain and not any(r["run_id"] == self.run.run_id for r in chain["runs"]):
            # the school's first entries of this run: they must continue what earlier runs verified
            check = check_continues(chain, run_entries[0])
            if check.problem:
                # not selected again in this run: its training would spend privacy into a ledger we reject
                self._leave_out(school, "ledger")
                self.run.event("ledger-anchor", round=rnd, school=school, problem=check.kind, reason=check.problem)
                raise RejectedUpdate(f"ledger does not continue the server's anchor ({check.kind}): {check.problem}")
            if check.note:
                self.run.event("ledger-gap", round=rnd, school=school, reason=check.note)
        try:
            ServerLedgerCopy.sync_verified(self.run.path, school, run_entries, public_key)
            stored = read_ledger_file(ServerLedgerCopy.path(self.run.path, school), school_id=school)
            update_anchor(anchors, school, trusted_public_keys(self.run.key_path(school)), stored)
        except LedgerError as exc:
            raise RejectedUpdate(f"ledger entry does not verify: {exc}") from None

    def _approve_recovery(self, school: str, recovery: Mapping[str, Any]) -> str:
        """"" when the run holds the new key of the school's key recovery as an approved recovery key, else a
        one-line problem. A run pins a school's keys when it first selects it; a key the coordinator approved in
        the keyring after that (`rotate --recovered`: the school lost its key during the run) is taken from the
        keyring now, as a run's start would take it. The ledger checks then decide whether the recovery holds."""
        from privacy.signing import (approve_recovery_key, key_id, load_public_key, recovery_public_keys,
                                     retire_public_key, write_public_key)

        key_file = self.run.key_path(school)
        new = str(recovery.get("new_key_id"))
        if any(key_id(k) == new for k in recovery_public_keys(key_file)):
            return ""
        keyring = str(self.cfg["privacy.keyring"])
        trusted = Path(keyring).expanduser() / f"{school}.pub" if keyring else None
        current = load_public_key(trusted) if trusted is not None and trusted.is_file() else None
        if current is not None and key_id(current) == new and any(key_id(k) == new for k in recovery_public_keys(trusted)):
            retire_public_key(key_file, load_public_key(key_file))   # the lost key: the stored copy starts under it
            approve_recovery_key(key_file, current)
            write_public_key(key_file, current)
            return ""
        return (f"key recovery to key {one_line(new, 40)} not approved in this run: the coordinator approves it with "
                f"`fedfer deploy rotate {school} --ledger-key signing_key.pub --recovered`, and the school is not "
                f"selected again in this run")

    # -- evaluation -------------------------------------------------------------------------------
    def is_final_round(self, server_round: int) -> bool:
        return self.finished or server_round + self.round_offset >= int(self.cfg["federation.rounds"])

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Only after the final round (or when training stopped early): every other round's model is
        evaluated during the next round's training (see `configure_train`).

        Called by Flower after every round with the round's released model (`arrays`: after the client-DP
        wrapper's noise, or the unchanged global model if nothing was aggregated); that model is handed
        to `RoundHooks.round_trained` first, so its checkpoint exists before any evaluation exchange."""
        self._eval_target = None
        if self.record is not None and self.record.train:
            self.rounds.round_trained(self.record, arrays, self.state())
            if not self.is_final_round(server_round):
                # checked before this round's evaluation and before Flower starts the next round: a federation that
                # is over evaluates its last round in its own exchange and ends here, instead of starting a round
                # that finds nobody (a school that came online meanwhile is met by the role query and keeps it
                # going). Schools out of budget are over; schools offline may come back: they are waited for.
                connected, offline_for = self._discover(grid), None
                if not self._candidates(connected) and not self._every_known_school_exhausted():
                    connected = self._wait_for_schools_back(grid, connected, after_round=self.record.round)
                    offline_for = float(self.cfg["federation.offline_wait"])
                if not self._candidates(connected):
                    self._finish(connected, first_round_not_run=self.record.round + 1, offline_for=offline_for)
        if not self.is_final_round(server_round):
            return []
        if self.pending is not None:   # training stopped before the pending round's model got its evaluation
            target = self.pending[0]
            arrays = self.pending[1]
        elif self.record is not None and self.record.train:
            target = self.record
        else:
            return []
        connected = self._discover(grid)
        evaluators = [nid for nid in self.evaluator_nodes() if nid in connected]
        if not evaluators:
            return []
        self._eval_target = target
        self._sent_at = time.perf_counter()
        return [self._evaluate_message(arrays, target.round, evaluators[0])]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        target = self._eval_target
        if target is None:
            return None
        if replies:
            target.timing["evaluate_exchange_s"] = time.perf_counter() - self._sent_at
        for reply in replies:
            metrics = self._record_evaluation(reply, target)
            if metrics is not None:
                return metrics
        return None

    def _record_evaluation(self, reply: Message, target: RoundRecord) -> MetricRecord | None:
        from shared_models.evaluation import unflatten_metrics

        if reply.has_error() or "metrics" not in reply.content.metric_records:
            status = reply.content.config_records.get("status") if not reply.has_error() else None
            reason = (short_reason(reply.error.reason) if reply.has_error()
                      else f"declined: {one_line(status.get('reason', ''), 300)}" if status is not None
                      else "reply without metrics")
            self.run.event("evaluator-error", round=target.round, reason=reason)
            return None
        metrics = reply.content["metrics"]
        problem = _evaluation_problem(metrics)
        if problem:
            self.run.event("evaluator-error", round=target.round, reason=problem)
            log(WARNING, "[fedfer] round %d: evaluation node's reply refused: %s", target.round, problem)
            return None
        target.evaluation = unflatten_metrics(dict(metrics))
        if "eval-seconds" in metrics:
            target.timing["evaluate_compute_s"] = float(metrics["eval-seconds"])
        target.evaluated_by = f"evaluator-node-{reply.metadata.src_node_id}"
        return metrics

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the strategy: schools out of budget (and why), FedAvgM's momentum vector."""
        # tensors, not numpy arrays: `fedfer evaluate` reads checkpoints with torch.load(weights_only=True)
        momentum = None if self.momentum_vector is None else [torch.tensor(np.asarray(m)) for m in self.momentum_vector]
        return {"exhausted": sorted(self.exhausted), "left_out": dict(sorted(self.left_out_why.items())),
                "momentum": momentum}


def run_rounds(runner: Strategy, strategy: SchoolFedAvg, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int,
               timeout: float) -> None:
    """Flower's round loop (`runner.start`: the strategy, or the client-DP wrapper around it) over `num_rounds`,
    ended early when the strategy finds no school that can train (FederationFinished): the log then says the
    federation stopped and why, and shows no round lines for rounds that never trained."""
    try:
        runner.start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
                     train_config=ConfigRecord(), evaluate_config=ConfigRecord(), evaluate_fn=strategy.end_of_round)
    except FederationFinished as stop:
        if stop.stopped_after >= stop.planned:   # a resume that only evaluated the last round: nothing stopped early
            return
        log(INFO, "[fedfer] federation stopped after round %d of %d: %s (%s not run)",
            stop.stopped_after, stop.planned, stop.why, counted(stop.planned - stop.stopped_after, "planned round"))


BENCHMARK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,63}$")
MAX_BENCHMARKS, MAX_METRIC_LIST = 64, 10_000


def _evaluation_problem(metrics: Mapping[str, Any]) -> str:
    """What is wrong with the evaluation node's metrics (shared_models/evaluation.py `flatten_metrics`), or "":
    `<benchmark>.<metric>` numbers (NaN: no value), the confusion matrix and per-class recall as lists, every
    benchmark with an accuracy in [0, 1]; `num-examples` and `eval-seconds` beside them. They go into the
    progress line, metrics.jsonl and the report as sent."""
    accuracy: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in ("num-examples", "eval-seconds"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                return f"'{key}' is {one_line(repr(value), 40)}, not a number >= 0"
            continue
        bench, _, name = key.rpartition(".")
        if not BENCHMARK_NAME.match(bench) or not name.replace("_", "").isalnum():
            return f"metric {one_line(key, 80)!r} is not <benchmark>.<metric>"
        if isinstance(value, list):
            if name not in LIST_METRICS or len(value) > MAX_METRIC_LIST:
                return f"metric '{key}' is a list"
            if name == "confusion" and round(len(value) ** 0.5) ** 2 != len(value):
                return f"metric '{key}' holds {len(value)} counts, not a square table"
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
            return f"metric '{key}' is {one_line(repr(value), 40)}, not a number"
        if name == "accuracy":
            accuracy[bench] = value
    benches = {key.rpartition(".")[0] for key in metrics if "." in key}
    if len(benches) > MAX_BENCHMARKS:
        return f"{len(benches)} benchmarks (at most {MAX_BENCHMARKS})"
    for bench in sorted(benches):
        if not 0 <= accuracy.get(bench, -1) <= 1:   # NaN or missing fails too
            return f"benchmark {bench!r} has no accuracy in [0, 1]"
    return ""


def _ledger_json(record: ConfigRecord, field: str, kind: type) -> Any:
    """One JSON field of a reply's ledger record (`entry`: an object; `run-entries`: a list, may be absent)."""
    text = record.get(field, "[]" if kind is list else None)
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, kind):
        raise RejectedUpdate(f"ledger field '{field}' is not a JSON {'list' if kind is list else 'object'}")
    return value


def _check_train_metrics(metrics: Mapping[str, Any]) -> None:
    """Only the public values a school sends, each one number (ε may be infinite without noise): anything else
    would be written into metrics.jsonl and the report as the school sent it."""
    for key, value in metrics.items():
        if key not in TRAIN_METRICS:
            raise RejectedUpdate(f"metric {one_line(key, 40)!r} is not one a school sends ({', '.join(TRAIN_METRICS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or (math.isinf(value) and not key.startswith("epsilon")):
            raise RejectedUpdate(f"metric '{key}' is {one_line(repr(value), 40)}, not a number")


def _check_declared_weight(metrics: Mapping[str, Any]) -> None:
    """FedAvg's weight must be the school's public declared size: a whole number ≥ 1 that agrees with
    the sampling rate it trained at (q = expected batch / declared size, so batch / q gives it back)."""
    declared = metrics.get("declared-units")
    if isinstance(declared, bool) or not isinstance(declared, int) or not 1 <= declared <= 10**9:
        raise RejectedUpdate(f"declared-units {declared!r}: must be the school's declared size (a whole number >= 1)")
    q = metrics.get("sample-rate")
    if isinstance(q, (int, float)) and 0 < q < 1:
        batch = q * declared
        if abs(batch - round(batch)) > 1e-6 * max(1.0, batch):
            raise RejectedUpdate(f"declared-units {declared} does not agree with sample-rate {q}")


def sent_to(messages: Iterable[Message]) -> dict[str, int]:
    """{message id: destination node} for messages a grid has pushed (it sets their ids in place)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def replying_node(reply: Message, sent: Mapping[str, int]) -> tuple[int, str]:
    """(the node this reply is about, a problem or "").

    The node is the destination of the message the reply answers (`reply_to_message_id`); only a reply to
    none of our messages falls back to its `src_node_id`. Error replies the SuperLink makes itself (node
    unavailable, message expired) carry the SuperLink's id as sender, so the sender field alone would
    charge them to no school or the wrong one. A reply with content from another node than the one we
    asked is a problem.
    """
    src = reply.metadata.src_node_id
    nid = sent.get(reply.metadata.reply_to_message_id)
    if nid is None:
        return src, ""
    if not reply.has_error() and src != nid:
        return nid, f"reply from node {src} to the message sent to node {nid}"
    return nid, ""

