"""A deployment's first round can come before the nodes are online (`fedfer deploy up &`, then `flwr run` at
once, as the README's one-machine trial shows): the coordinator waits for a school instead of ending the run with
nothing trained — and only then, so a simulation (every node exists before the ServerApp starts), a run
without an evaluation node or a later round never waits."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from grid_fixtures import FakeGrid, _record, _reply, _state

pytestmark = pytest.mark.usefixtures("serverapp_identity")

EVALUATOR, SCHOOL = 7, 101
NEVER = 10**9


class LateGrid(FakeGrid):
    """A node is online once the node list has been looked at more than `late[node]` times."""

    def __init__(self, answer, late: dict[int, int]) -> None:
        super().__init__(list(late), answer)
        self.looks = 0
        self.late = late

    def get_node_ids(self):
        self.looks += 1
        return [nid for nid, after in self.late.items() if self.looks > after]


def _strategy(tmp_path, monkeypatch, *extra):
    from privacy.signing import load_or_create_signing_key, public_key_pem
    from server import strategy as module
    from server.run_dir import RunDirectory
    from shared_models.config import load_config

    monkeypatch.setattr(module, "FIRST_SCHOOL_POLL_S", 0.01)
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "privacy.enabled=false",
                             "federation.min_train_schools=1", *extra])
    run = RunDirectory.create(cfg)
    key = public_key_pem(load_or_create_signing_key(tmp_path / "school-a"))

    def answer(nid, message):
        if message.metadata.message_type == MessageType.QUERY:
            info = ({"role": "evaluator"} if nid == EVALUATOR
                    else {"role": "school", "school-id": "school-a", "public-key": key})
            return _reply(message, RecordDict({"node": ConfigRecord(info)}))
        return None
    return module.SchoolFedAvg(cfg, run), run, answer


def _trained(messages) -> list[int]:
    return [m.metadata.dst_node_id for m in messages if m.metadata.message_type == MessageType.TRAIN]


def test_the_first_round_waits_for_a_school_that_comes_online_late(tmp_path, monkeypatch):
    strategy, _, answer = _strategy(tmp_path, monkeypatch)
    grid = LateGrid(answer, {EVALUATOR: 0, SCHOOL: 4})
    assert _trained(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)) == [SCHOOL]
    assert not strategy.finished and grid.looks > 4


def test_the_evaluation_node_is_not_waited_for(tmp_path, monkeypatch):
    strategy, _, answer = _strategy(tmp_path, monkeypatch, "federation.first_round_wait=3600")   # a wait would hang
    grid = LateGrid(answer, {EVALUATOR: NEVER, SCHOOL: 0})
    assert _trained(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)) == [SCHOOL]


def test_with_no_school_at_all_the_run_ends_after_the_wait(tmp_path, monkeypatch):
    strategy, run, answer = _strategy(tmp_path, monkeypatch, "federation.first_round_wait=0.05")
    grid = LateGrid(answer, {EVALUATOR: 0, SCHOOL: NEVER})
    assert list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)) == []
    assert strategy.finished
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert any(e["event"] == "finished" and e["reason"] == "no school can train" and e["refused_at_query"] == 0
               and e["why"] == "no school connected" for e in events), events


def test_a_later_round_never_waits(tmp_path, monkeypatch):
    strategy, _, answer = _strategy(tmp_path, monkeypatch, "federation.first_round_wait=3600")
    assert list(strategy.configure_train(2, _record(_state(0)), ConfigRecord(),
                                         LateGrid(answer, {EVALUATOR: NEVER, SCHOOL: NEVER}))) == []
    assert strategy.finished


def test_a_run_whose_online_schools_were_all_refused_does_not_wait(tmp_path, monkeypatch):
    # a simulation's nodes all exist at the start; if every one was refused at the role query, nobody will come
    strategy, _, answer = _strategy(tmp_path, monkeypatch, "federation.first_round_wait=3600")   # a wait would hang

    def refusing(nid, message):
        if message.metadata.message_type == MessageType.QUERY and nid == SCHOOL:
            return _reply(message, RecordDict({"node": ConfigRecord({"role": "school", "school-id": "../x"})}))
        return answer(nid, message)
    assert list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(),
                                         LateGrid(refusing, {EVALUATOR: 0, SCHOOL: 0}))) == []
    assert strategy.finished
    # the end says the school was refused (it used to say "budgets exhausted or none connected")
    events = [json.loads(line) for line in strategy.run.events_path.read_text().splitlines()]
    assert [e["refused_at_query"] for e in events if e["event"] == "finished"] == [1]
    assert [e["why"] for e in events if e["event"] == "finished"] == [
        "1 online node refused or did not answer the role query: see the warnings above"]


def test_first_round_wait_0_does_not_wait(tmp_path, monkeypatch):
    # the school would come online at the fifth look at the node list; with no wait the run ends at the first
    strategy, run, answer = _strategy(tmp_path, monkeypatch, "federation.first_round_wait=0")
    grid = LateGrid(answer, {EVALUATOR: 0, SCHOOL: 4})
    assert list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)) == []
    assert strategy.finished and grid.looks <= 2


def test_the_first_round_wait_is_the_configured_one(tmp_path, monkeypatch, caplog):
    # the run waits as long as its run-config says (it was a constant 180 s in the code), and the log says so
    import logging
    import time

    strategy, _, answer = _strategy(tmp_path, monkeypatch, "federation.first_round_wait=0.3")
    flower_log = logging.getLogger("flwr")
    flower_log.addHandler(caplog.handler)
    try:
        started = time.monotonic()
        assert list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(),
                                             LateGrid(answer, {EVALUATOR: 0, SCHOOL: NEVER}))) == []
        waited = time.monotonic() - started
    finally:
        flower_log.removeHandler(caplog.handler)
    assert 0.3 <= waited < 30
    assert "no school is online yet: waiting up to 0.3 s for one (federation.first_round_wait)" in caplog.text


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon", "700000"])
def test_a_bad_first_round_wait_is_one_line_naming_the_key(value):
    from shared_models.config import ConfigError, load_config

    with pytest.raises(ConfigError) as refused:
        load_config(None, [f"federation.first_round_wait={value}"])
    assert "federation.first_round_wait" in str(refused.value) and "\n" not in str(refused.value)
