"""Pipelined evaluation (issue #6): round r's model goes to the evaluation node in the same grid exchange as
round r+1's train messages, not in an exchange of its own; the final model gets its own evaluation.
metrics.jsonl still has exactly one line per round, each with the accuracy the evaluation node computed
for that round's model, and each round's checkpoint is that model.

Runs the real SchoolFedAvg + RoundWriter + run start/resume (server/) under Flower's FedAvg.start loop (server/strategy.py run_rounds) on the fake grid
of tests/grid_fixtures.py, behind PackedGrid as in the app.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from server.transport import PackedGrid, fast_grid
from shared_models.wire import unbundle
from grid_fixtures import FakeGrid, _reply, _state, _train_reply

pytestmark = pytest.mark.usefixtures("serverapp_identity")

SCHOOLS = {101: "school-a", 202: "school-b", 303: "school-c"}
EVALUATOR = 404
ROUNDS = 3


class RecordingGrid(FakeGrid):
    """Keeps every non-empty exchange as a list of (message type, destination, round in its config)."""

    def __init__(self, node_ids, answer):
        super().__init__(node_ids, answer)
        self.exchanges: list[list[tuple[str, int, int]]] = []
        self.evaluated: dict[int, dict[str, np.ndarray]] = {}   # round -> the model the evaluator received

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages:
            self.exchanges.append([(m.metadata.message_type, m.metadata.dst_node_id,
                                    int(m.content["config"].get("server-round", 0)) if "config" in m.content.config_records else 0)
                                   for m in messages])
        return super().send_and_receive(messages, timeout=timeout)


class ArrivingGrid(RecordingGrid):
    """Replies come back one per pull, as a SuperLink hands them out while schools finish (`order`:
    "forward" = in the order sent, the evaluation node last; "reverse" = the evaluation node first), for the
    app's PollingGrid and the strategy's `replies_arrived` hook."""

    def __init__(self, node_ids, answer, order: str):
        super().__init__(node_ids, answer)
        self.order = order
        self.waiting: list = []

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        contents = [unbundle(m.content) for m in messages]   # the app's grid bundles what it sends
        if messages:
            self.exchanges.append([(m.metadata.message_type, m.metadata.dst_node_id,
                                    int(c["config"].get("server-round", 0)) if "config" in c.config_records else 0)
                                   for m, c in zip(messages, contents)])
        replies = [r for r in (self.answer(m.metadata.dst_node_id, m) for m in messages) if r is not None]
        self.waiting = replies if self.order == "forward" else replies[::-1]
        return ids

    def pull_messages(self, message_ids):
        return [self.waiting.pop(0)] if self.waiting else []


def _accuracy(rnd: int) -> float:
    return 0.1 + 0.01 * rnd


class FakeModel:
    """Stands in for the configured model: its state is the fake schools' float vector."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return OrderedDict((k, torch.as_tensor(v)) for k, v in self.state.items())

    def load_state_dict(self, state_dict):
        self.state = {k: np.asarray(v) for k, v in state_dict.items()}


class Crash(Exception):
    """The coordinator stops (injected right after a checkpoint is written)."""


def _answerer(keys, silent_in: tuple[int, ...], poisoned: int, evaluated: dict):
    """The fake nodes: schools answer the role query and train (a school `poisoned` sends NaN weights);
    the evaluation node scores what it gets (remembering it in `evaluated`) unless silent in that exchange."""
    from shared_models.wire import unpack_content

    evaluations = {"count": 0}

    def answer(nid, message):
        kind = message.metadata.message_type
        if kind == MessageType.QUERY:
            info = ({"role": "evaluator"} if nid == EVALUATOR else
                    {"role": "school", "school-id": SCHOOLS[nid], "public-key": keys[nid]})
            return _reply(message, RecordDict({"node": ConfigRecord(info)}))
        if kind == MessageType.TRAIN:
            state = {k: v.numpy() for k, v in unpack_content(unbundle(message.content))["arrays"].items()}
            if nid == poisoned:    # a reply the server must reject (NaN weights)
                state["conv.weight"] = np.full_like(state["conv.weight"], np.nan)
            return _train_reply(message, {k: np.asarray(v + np.asarray(0.01 * nid, dtype=v.dtype)) for k, v in state.items()})
        assert kind == MessageType.EVALUATE and nid == EVALUATOR
        evaluations["count"] += 1
        if evaluations["count"] in silent_in:
            return None
        rnd = int(unbundle(message.content)["config"]["server-round"])
        evaluated[rnd] = {k: v.numpy() for k, v in unpack_content(unbundle(message.content))["arrays"].items()}
        return _reply(message, RecordDict({"metrics": MetricRecord(
            {"synthetic-rafdb.accuracy": _accuracy(rnd), "synthetic-rafdb.n": 100, "eval-seconds": 0.01})}))
    return answer


def _start(cfg):
    """server/run.py's start_or_resume with the fake model (its files checked on resume, not its weights)."""
    from server.run import start_or_resume
    from server.run_dir import check_resume_dir

    with pytest.MonkeyPatch.context() as patch:   # the fake schools train a float vector, not the configured model
        patch.setattr("server.run.registry.build_from_config", lambda cfg: FakeModel(_state(0)))
        patch.setattr("server.run.check_resume_dir", lambda path: check_resume_dir(path, deep=False))
        return start_or_resume(cfg)


def _setup(tmp_path, evaluator: bool, silent_in: tuple[int, ...] = (), wrap=None, crash_after: int | None = None,
           resume: bool = False, arriving: str = "", poisoned: int = 0):
    """A strategy + RoundWriter over 3 schools (+ evaluation node); the evaluator stays silent during the
    exchanges numbered in `silent_in` (1-based, counting exchanges that carry an evaluate message).

    `crash_after`: the coordinator stops right after round `crash_after`'s checkpoint is written.
    `resume`: continue the run in tmp_path from its latest checkpoint, as server/app.py's main does.
    `arriving`: run behind the app's grid (fast_grid, replies validated as they arrive), the replies coming
    back one per pull in that order (ArrivingGrid)."""
    from privacy.signing import load_or_create_signing_key, public_key_pem
    from server.round_writer import RoundWriter
    from server.run import resume_pending
    from server.strategy import SchoolFedAvg, run_rounds
    from shared_models.config import load_config

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "privacy.enabled=false",
                             "federation.min_train_schools=1", "federation.max_update_norm=1000",
                             f"federation.rounds={ROUNDS}", "federation.fraction_train=1.0"]
                      + ([f"run.resume={tmp_path / 'runs' / 't'}"] if resume else []))
    keys = {nid: public_key_pem(load_or_create_signing_key(tmp_path / name)) for nid, name in SCHOOLS.items()}
    nodes = list(SCHOOLS) + ([EVALUATOR] if evaluator else [])
    evaluated: dict = {}
    answer = _answerer(keys, silent_in, poisoned, evaluated)
    grid = ArrivingGrid(nodes, answer, arriving) if arriving else RecordingGrid(nodes, answer)
    grid.evaluated = evaluated
    in_process: list[int] = []
    checkpoints: dict[int, dict[str, np.ndarray]] = {}

    class Writer(RoundWriter):
        """The app's writer with a stub in-process evaluation, remembering each checkpoint's weights."""

        def evaluate_in_process(self, arrays):
            in_process.append(len(in_process))
            return {"synthetic-rafdb": {"accuracy": 0.5, "n": 100}}

        def round_trained(self, record, arrays, strategy_state):
            checkpoints[record.round] = {k: v.numpy().copy() for k, v in arrays.to_torch_state_dict().items()}
            super().round_trained(record, arrays, strategy_state)
            if record.round == crash_after:
                raise Crash(record.round)

    start = _start(cfg)
    writer = Writer(start.run, start.cfg, start.round_offset)
    writer.model_info = {"name": "fake", "preset": "", "num_classes": 7}
    strategy = SchoolFedAvg(start.cfg, start.run, round_offset=start.round_offset, rounds=writer,
                            exhausted=start.strategy_state.get("exhausted", []),
                            momentum=start.strategy_state.get("momentum"))
    initial = ArrayRecord(OrderedDict(start.model.state_dict()))
    num_rounds = resume_pending(strategy, start.unevaluated, initial, start.remaining)
    runner = wrap(strategy) if wrap is not None else strategy
    try:
        with pytest.MonkeyPatch.context() as patch:   # PollingGrid would shorten Flower's object-pull backoff process-wide
            patch.setattr("server.transport.shorten_object_pull_backoff", lambda: True)
            app_grid = fast_grid(grid, on_replies=strategy.replies_arrived) if arriving else PackedGrid(grid)
            run_rounds(runner, strategy, app_grid, initial, num_rounds=num_rounds, timeout=5)   # as server/app.py
    except Crash:
        assert crash_after is not None
    return grid, start.run.metrics(), checkpoints, in_process


def test_evaluation_rides_with_the_next_rounds_train_messages(tmp_path):
    grid, lines, checkpoints, in_process = _setup(tmp_path, evaluator=True)
    train = lambda rnd: sorted((MessageType.TRAIN, nid, rnd) for nid in SCHOOLS)  # noqa: E731
    exchanges = [sorted(e) for e in grid.exchanges[1:]]   # [0] is the role query
    assert [m[0] for m in grid.exchanges[0]] == [MessageType.QUERY] * 4
    assert exchanges == [
        train(1),                                                       # nothing to evaluate yet
        sorted(train(2) + [(MessageType.EVALUATE, EVALUATOR, 1)]),      # round 1's model, during round 2
        sorted(train(3) + [(MessageType.EVALUATE, EVALUATOR, 2)]),      # round 2's model, during round 3
        [(MessageType.EVALUATE, EVALUATOR, 3)],                         # the final model, on its own
    ]
    # one metrics line per round, each with the evaluation node's accuracy for that round's model
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert [line["evaluation"]["synthetic-rafdb"]["accuracy"] for line in lines] == [_accuracy(r) for r in (1, 2, 3)]
    assert all(line["evaluated_by"] == f"evaluator-node-{EVALUATOR}" for line in lines)
    assert [line.get("evaluated_in_round") for line in lines] == [2, 3, None]
    assert all(line["aggregated"] and len(line["train"]) == 3 for line in lines)
    assert in_process == []
    # round r's checkpoint is the model the evaluation node scored as round r
    assert sorted(checkpoints) == [1, 2, 3]
    for rnd, state in checkpoints.items():
        assert state.keys() == grid.evaluated[rnd].keys()
        for name in state:
            np.testing.assert_array_equal(state[name], grid.evaluated[rnd][name])
    assert not np.array_equal(checkpoints[1]["conv.weight"], checkpoints[2]["conv.weight"])


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_replies_validated_as_they_arrive_give_the_same_run(tmp_path, monkeypatch, order):
    """The app validates each school's reply when it arrives (and settles the previous round when the
    evaluation node's reply does), not after the last one: the run directory ends the same — metrics
    lines, events, checkpoints — as when everything is validated at the end, whichever node answers last."""
    from server.strategy import SchoolFedAvg

    at_aggregation: list[int] = []
    aggregate = SchoolFedAvg.average_accepted

    def spy(self, server_round, replies):
        at_aggregation.append(len(self._validated))
        return aggregate(self, server_round, replies)

    monkeypatch.setattr(SchoolFedAvg, "average_accepted", spy)
    runs = {}
    for mode in ("", order):
        root = tmp_path / (mode or "at-the-end")
        grid, lines, checkpoints, in_process = _setup(root, evaluator=True, arriving=mode, poisoned=202)
        events = [{k: v for k, v in json.loads(line).items() if k != "time"}
                  for line in (root / "runs" / "t" / "events.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events] == ["rejected"] * 3
        runs[mode] = ([{k: v for k, v in line.items() if k != "timing"} for line in lines], events,
                      {r: {k: v.tolist() for k, v in s.items()} for r, s in checkpoints.items()},
                      [sorted(e) for e in grid.exchanges], in_process)
    assert at_aggregation == [0, 0, 0] + [3, 3, 3]   # arriving: the three schools' replies were checked already
    assert runs[order] == runs[""]
    assert [line.get("evaluated_in_round") for line in runs[order][0]] == [2, 3, None]
    assert [line["train"]["school-b"]["status"] for line in runs[order][0]] == ["rejected"] * 3


def test_a_silent_evaluator_falls_back_to_in_process_for_that_round_only(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        grid, lines, checkpoints, in_process = _setup(tmp_path, evaluator=True, silent_in=(1,))
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert [line["evaluated_by"] for line in lines] == ["server-in-process", f"evaluator-node-{EVALUATOR}",
                                                         f"evaluator-node-{EVALUATOR}"]
    assert len(in_process) == 1 and sorted(checkpoints) == [1, 2, 3]
    assert any("round 1: the evaluation node did not answer" in r.getMessage() for r in caplog.records)


def test_without_an_evaluation_node_the_server_evaluates_every_round_in_process(tmp_path):
    grid, lines, checkpoints, in_process = _setup(tmp_path, evaluator=False)
    assert all(m[0] == MessageType.TRAIN for e in grid.exchanges[1:] for m in e)
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert all(line["evaluated_by"] == "server-in-process" for line in lines)
    assert len(in_process) == 3 and sorted(checkpoints) == [1, 2, 3]


@pytest.mark.parametrize("stop_after", [1, 2])
def test_when_training_stops_early_the_last_model_is_still_evaluated(tmp_path, monkeypatch, stop_after):
    """Every school runs out of budget: the last trained round's model gets its own evaluate exchange."""
    from server.strategy import SchoolFedAvg

    original = SchoolFedAvg.configure_train

    def configure_train(self, server_round, arrays, config, grid):
        if server_round > stop_after:
            self.exhausted.update(SCHOOLS.values())
        return original(self, server_round, arrays, config, grid)

    monkeypatch.setattr(SchoolFedAvg, "configure_train", configure_train)
    grid, lines, checkpoints, in_process = _setup(tmp_path, evaluator=True)
    assert [line["round"] for line in lines] == list(range(1, stop_after + 1))
    assert [line["evaluation"]["synthetic-rafdb"]["accuracy"] for line in lines] == [_accuracy(r) for r in range(1, stop_after + 1)]
    assert in_process == [] and sorted(checkpoints) == list(range(1, stop_after + 1))
    assert grid.exchanges[-1] == [(MessageType.EVALUATE, EVALUATOR, stop_after)]


def test_client_dp_wrapper_clips_and_counts_only_the_schools_replies(tmp_path):
    """Flower's adaptive-clipping wrapper sees every train reply; the evaluator's must be taken out first."""
    from server.client_dp import SchoolsOnlyAdaptiveClipping

    seen: list[int] = []

    def wrap(strategy):
        aggregate = strategy.aggregate_train

        def spy(server_round, replies):
            replies = list(replies)
            seen.append(len(replies))
            return aggregate(server_round, replies)

        strategy.aggregate_train = spy
        return SchoolsOnlyAdaptiveClipping(strategy, noise_multiplier=0.0, num_sampled_clients=3,
                                           initial_clipping_norm=100.0, clipped_count_stddev=1.0)

    grid, lines, checkpoints, in_process = _setup(tmp_path, evaluator=True, wrap=wrap)
    assert seen == [3, 3, 3]
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert [line["evaluation"]["synthetic-rafdb"]["accuracy"] for line in lines] == [_accuracy(r) for r in (1, 2, 3)]
    assert in_process == []


def _latest(tmp_path) -> dict:
    return json.loads((tmp_path / "runs" / "t" / "checkpoints" / "latest.json").read_text())


def test_a_checkpoint_is_written_before_its_models_evaluation(tmp_path):
    """Round r's checkpoint exists as soon as its model does (marked unevaluated), not one round later with
    its metrics line: a coordinator that stops during round r+1 resumes after round r."""
    grid, lines, checkpoints, _ = _setup(tmp_path, evaluator=True, crash_after=1)
    assert lines == [] and sorted(checkpoints) == [1]
    assert _latest(tmp_path) == {"round": 1, "file": "round-0001.pt", "evaluated": False}
    from fedfer.commands.results import load_checkpoint   # `fedfer evaluate` reads it with weights_only=True

    saved = load_checkpoint(tmp_path / "runs" / "t")["strategy"]["unevaluated"]
    assert saved["round"] == 1 and saved["aggregated"] and saved["evaluation"] == {} and len(saved["train"]) == 3
    assert [sorted(e) for e in grid.exchanges[1:]] == [sorted((MessageType.TRAIN, nid, 1) for nid in SCHOOLS)]
    _, lines, _, _ = _setup(tmp_path / "complete", evaluator=True)
    assert _latest(tmp_path / "complete") == {"round": ROUNDS, "file": f"round-{ROUNDS:04d}.pt", "evaluated": True}


@pytest.mark.parametrize("crash_after", [1, 2, ROUNDS])
def test_resume_from_an_unevaluated_checkpoint_evaluates_it_first(tmp_path, crash_after):
    """The coordinator stops right after checkpoint `crash_after`: the resumed run trains the following
    rounds once each and evaluates the checkpoint's model in its first exchange (an evaluate-only exchange
    when no round is left); metrics.jsonl ends with exactly one line per round."""
    _, lines, first_checkpoints, _ = _setup(tmp_path, evaluator=True, crash_after=crash_after)
    assert [line["round"] for line in lines] == list(range(1, crash_after))

    grid, lines, checkpoints, in_process = _setup(tmp_path, evaluator=True, resume=True)
    train = lambda rnd: [(MessageType.TRAIN, nid, rnd) for nid in SCHOOLS]  # noqa: E731
    expected = [sorted(train(rnd) + [(MessageType.EVALUATE, EVALUATOR, rnd - 1)]) for rnd in range(crash_after + 1, ROUNDS + 1)]
    assert [m[0] for m in grid.exchanges[0]] == [MessageType.QUERY] * 4
    assert [sorted(e) for e in grid.exchanges[1:]] == expected + [[(MessageType.EVALUATE, EVALUATOR, ROUNDS)]]
    assert [line["round"] for line in lines] == list(range(1, ROUNDS + 1))
    assert [line["evaluation"]["synthetic-rafdb"]["accuracy"] for line in lines] == [_accuracy(r) for r in range(1, ROUNDS + 1)]
    resumed = lines[crash_after - 1]
    assert resumed["evaluated_by"] == f"evaluator-node-{EVALUATOR}" and resumed["aggregated"] and len(resumed["train"]) == 3
    assert resumed.get("evaluated_in_round") == (crash_after + 1 if crash_after < ROUNDS else None)
    assert in_process == [] and sorted(checkpoints) == list(range(crash_after + 1, ROUNDS + 1))
    # the model evaluated as round `crash_after` is that round's checkpoint from before the stop
    for name, value in first_checkpoints[crash_after].items():
        np.testing.assert_array_equal(grid.evaluated[crash_after][name], value)
    assert _latest(tmp_path)["evaluated"] is True and _latest(tmp_path)["round"] == ROUNDS


def test_server_momentum_is_flowers_fedavgm_and_a_resumed_run_keeps_it(tmp_path):
    """federation.server_momentum (default 0.7): each round's model is FedAvgM's step from the
    uniform (public) average of the accepted replies, and a run resumed after a crash continues with the
    checkpointed momentum, ending at the same model as the run that never stopped."""
    from shared_models.config import load_config

    momentum = float(load_config(None, [])["federation.server_momentum"])
    assert momentum > 0
    (tmp_path / "full").mkdir()
    _, _, full, _ = _setup(tmp_path / "full", evaluator=True)
    # every school adds 0.01 * node id to every value; FedAvg weights are uniform: the average update
    step = sum(0.01 * nid for nid in SCHOOLS) / len(SCHOOLS)
    velocity, total, initial = 0.0, 0.0, _state(0)
    for rnd in range(1, ROUNDS + 1):
        velocity = momentum * velocity + step
        total += velocity
        for name in ("conv.weight", "head.weight"):
            np.testing.assert_allclose(full[rnd][name] - initial[name], total, rtol=1e-4)
    (tmp_path / "crash").mkdir()
    _setup(tmp_path / "crash", evaluator=True, crash_after=1)
    _, _, resumed, _ = _setup(tmp_path / "crash", evaluator=True, resume=True)
    for name, value in full[ROUNDS].items():
        np.testing.assert_allclose(resumed[ROUNDS][name], value, rtol=1e-6)


def test_the_best_round_survives_a_stop_and_resume_through_the_strategy(tmp_path, monkeypatch):
    """Round 2 scores best on the public benchmark, round 3 worse; the coordinator stops right after round 3's
    checkpoint (its evaluation still pending). The resumed run evaluates round 3 first and keeps round 2 as
    checkpoints/best.pt: the best from before the stop is not forgotten."""
    import sys

    from server.run_dir import load_checkpoint_file

    monkeypatch.setattr(sys.modules[__name__], "_accuracy", {1: 0.5, 2: 0.9, 3: 0.4}.get)
    _, lines, first_checkpoints, _ = _setup(tmp_path, evaluator=True, crash_after=ROUNDS)
    assert [line["round"] for line in lines] == [1, 2]
    _setup(tmp_path, evaluator=True, resume=True)
    best = load_checkpoint_file(tmp_path / "runs" / "t" / "checkpoints" / "best.pt")
    assert best["round"] == 2 and best["best"]["accuracies"] == {"synthetic-rafdb": 0.9}
    for name, value in first_checkpoints[2].items():   # the weights of round 2's model, kept before the stop
        np.testing.assert_array_equal(best["state_dict"][name].numpy(), value)
    assert json.loads((tmp_path / "runs" / "t" / "checkpoints" / "best.json").read_text())["round"] == 2


def test_a_resume_that_only_evaluates_the_last_round_does_not_say_the_federation_stopped_early(tmp_path):
    """The coordinator stopped after the last round's checkpoint, before its evaluation: the resume evaluates
    that model and trains nothing, because every planned round ran. Its log must not claim the federation
    stopped early ("stopped after round 0 of 3: no school can train any more (3 planned rounds not run)" was
    printed in a deployment walk-through, where both schools had trained every round)."""
    import logging

    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    _setup(tmp_path, evaluator=True, crash_after=ROUNDS)
    handler, logger = Lines(), logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        _, lines, _, _ = _setup(tmp_path, evaluator=True, resume=True)
    finally:
        logger.removeHandler(handler)
    assert [line["round"] for line in lines] == list(range(1, ROUNDS + 1))
    assert not [line for line in handler.lines if "federation stopped" in line or "not run" in line], handler.lines
