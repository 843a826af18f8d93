"""A deployment's first round can come before any school's node is online (`fedfer deploy up &`, then
`flwr run` at once, as the README's one-machine trial shows): the coordinator waits for a school instead of
ending the run with nothing trained — and only then, so a simulation or a run whose schools are known never waits."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from grid_fixtures import FakeGrid, _record, _reply, _state

pytestmark = pytest.mark.usefixtures("serverapp_identity")


class LateGrid(FakeGrid):
    """Only the evaluation node is online at first; the school connects after `late` looks at the node list."""

    def __init__(self, answer, late: int) -> None:
        super().__init__([7], answer)
        self.looks = 0
        self.late = late

    def get_node_ids(self):
        self.looks += 1
        return [7, 101] if self.looks > self.late else [7]


def _strategy(tmp_path):
    from privacy.signing import load_or_create_signing_key, public_key_pem
    from server.run_dir import RunDirectory
    from server.strategy import SchoolFedAvg
    from shared_models.config import load_config

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "privacy.enabled=false",
                             "federation.min_train_schools=1"])
    run = RunDirectory.create(cfg)
    key = public_key_pem(load_or_create_signing_key(tmp_path / "school-a"))

    def answer(nid, message):
        if message.metadata.message_type == MessageType.QUERY:
            info = {"role": "evaluator"} if nid == 7 else {"role": "school", "school-id": "school-a", "public-key": key}
            return _reply(message, RecordDict({"node": ConfigRecord(info)}))
        return None
    return SchoolFedAvg(cfg, run), run, answer


def test_the_first_round_waits_for_a_school_that_comes_online_late(tmp_path, monkeypatch):
    from server import strategy as module

    monkeypatch.setattr(module, "FIRST_SCHOOL_POLL_S", 0.01)
    strategy, run, answer = _strategy(tmp_path)
    grid = LateGrid(answer, late=4)
    messages = list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in messages if m.metadata.message_type == MessageType.TRAIN] == [101]
    assert not strategy.finished


def test_with_no_school_at_all_the_run_ends_after_the_wait(tmp_path, monkeypatch):
    from server import strategy as module

    monkeypatch.setattr(module, "FIRST_SCHOOL_POLL_S", 0.01)
    monkeypatch.setattr(module, "FIRST_SCHOOL_WAIT_S", 0.05)
    strategy, run, answer = _strategy(tmp_path)
    assert list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), LateGrid(answer, late=10**9))) == []
    assert strategy.finished
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert any(e["event"] == "finished" and e["reason"] == "no school can train" for e in events)


def test_a_later_round_never_waits(tmp_path, monkeypatch):
    from server import strategy as module

    monkeypatch.setattr(module, "FIRST_SCHOOL_WAIT_S", 3600.0)   # a wait would hang the test
    strategy, run, answer = _strategy(tmp_path)
    assert list(strategy.configure_train(2, _record(_state(0)), ConfigRecord(), LateGrid(answer, late=10**9))) == []
    assert strategy.finished
