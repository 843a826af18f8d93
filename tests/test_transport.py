"""The model on the wire: packed into one array per dtype (shared_models/wire.py PackedGrid, the
ClientApp's `_received_state` / `_reply`), unpacked before validation and FedAvg; and replies matched
to schools by the message they answer, not by position or sender field.

A fake Grid stands in for Flower's (in-memory or SuperLink) grid: it gives pushed messages ids,
as Flower's grids do, and answers them with the replies a test scripts.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from grid_fixtures import FakeGrid, _record, _reply, _state, _superlink_error, _train_reply
from server.transport import PackedGrid
from shared_models.wire import is_packed, pack_content, unpack_content

pytestmark = pytest.mark.usefixtures("serverapp_identity")


# ------------------------------------------------------------------------------------ packing
def test_packed_grid_sends_one_array_per_dtype_and_returns_the_unpacked_reply():
    state = _state(1)
    seen = {}

    def answer(nid, message):
        seen[nid] = message.content
        # the ClientApp's side: unpack, "train", reply in the form the request came
        got = unpack_content(message.content).array_records["arrays"]
        trained = {k: np.asarray(v.numpy() + 1, dtype=v.numpy().dtype) for k, v in got.items()}
        return _reply(message, pack_content(RecordDict({"arrays": _record(trained),
                                                        "metrics": MetricRecord({"num-examples": 3})})))

    fake = FakeGrid([11, 12], answer)
    grid = PackedGrid(fake)
    arrays = _record(state)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    messages = [Message(content, dst_node_id=nid, message_type=MessageType.TRAIN) for nid in (11, 12)]
    replies = list(grid.send_and_receive(messages, timeout=5))

    for nid in (11, 12):
        sent = seen[nid]
        assert is_packed(sent) and sorted(sent["arrays"].keys()) == ["packed-float32", "packed-int64"]
        assert dict(sent["config"]) == {"server-round": 1}
    assert seen[11]["arrays"] is seen[12]["arrays"]          # packed once per exchange
    assert all(m.metadata.message_id for m in messages)        # the strategy's own Message objects got ids
    for reply in replies:
        assert not is_packed(reply.content) and set(reply.content.config_records) == set()
        back = reply.content["arrays"]
        assert list(back.keys()) == list(state)
        for name, value in state.items():
            got = back[name].numpy()
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value + 1)


def test_fedavg_after_packed_transport_equals_fedavg_of_the_tensors():
    """Same replies, once sent plain and once packed + unpacked by PackedGrid: bit-identical FedAvg."""
    states, weights = [_state(s) for s in (1, 2, 3)], [10.0, 30.0, 60.0]

    def reply_content(i, packed):
        content = RecordDict({"arrays": _record(states[i]), "metrics": MetricRecord({"num-examples": weights[i]})})
        return pack_content(content) if packed else content

    def run(packed):
        fake = FakeGrid([0, 1, 2], lambda nid, m: _reply(m, reply_content(nid, packed)))
        grid = PackedGrid(fake) if packed else fake
        msgs = [Message(RecordDict({"arrays": _record(_state(9))}), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in (0, 1, 2)]
        return aggregate_arrayrecords([r.content for r in grid.send_and_receive(msgs)], "num-examples")

    plain, packed = run(False), run(True)
    assert list(plain.keys()) == list(packed.keys())
    for name in plain.keys():
        a, b = plain[name].numpy(), packed[name].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------ strategy
@pytest.fixture()
def strategy_setup(tmp_path):
    from privacy.signing import load_or_create_signing_key, public_key_pem
    from server.run_dir import RunDirectory
    from server.strategy import SchoolFedAvg
    from shared_models.config import load_config

    # plain FedAvg (no server momentum): the aggregate is compared bit for bit with Flower's
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "privacy.enabled=false",
                             "federation.min_train_schools=1", "federation.max_update_norm=1000",
                             "federation.server_momentum=0"])
    run = RunDirectory.create(cfg)
    schools = {101: "school-a", 202: "school-b", 303: "school-c"}
    keys = {nid: public_key_pem(load_or_create_signing_key(tmp_path / name)) for nid, name in schools.items()}

    def query_reply(nid, message):
        info = ConfigRecord({"role": "school", "school-id": schools[nid], "public-key": keys[nid]})
        return _reply(message, RecordDict({"node": info}))

    return cfg, run, schools, query_reply, SchoolFedAvg(cfg, run)


def test_packed_round_is_validated_unpacked_and_a_bad_packed_reply_is_rejected_naming_the_school(strategy_setup, caplog):
    cfg, run, schools, query_reply, strategy = strategy_setup
    global_state = _state(0)
    good = {101: _state(1), 303: _state(3)}

    def answer(nid, message):
        if message.metadata.message_type == MessageType.QUERY:
            return query_reply(nid, message)
        if nid == 202:   # school-b: its packed array lost its last value
            reply = _train_reply(message, _state(2))
            arrays = reply.content["arrays"]
            arrays["packed-float32"] = Array(arrays["packed-float32"].numpy()[:-1])
            return reply
        return _train_reply(message, good[nid])

    grid = PackedGrid(FakeGrid(schools, answer))
    messages = list(strategy.configure_train(1, _record(global_state), ConfigRecord(), grid))
    with caplog.at_level(logging.WARNING):
        replies = grid.send_and_receive(messages, timeout=5)
        arrays, metrics = strategy.aggregate_train(1, replies)

    train = strategy.record.train
    assert train["school-a"]["status"] == "ok" and train["school-c"]["status"] == "ok"
    assert train["school-b"]["status"] == "rejected"
    reason = train["school-b"]["reason"]
    assert "\n" not in reason and "packed weights do not match their layout" in reason and "too short" in reason
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1 and "school-b" in lines[0] and "\n" not in lines[0]
    assert any(e == {"event": "rejected", "round": 1, "school": "school-b", "reason": reason}
               for e in ({k: v for k, v in ev.items() if k != "time"} for ev in _events(run)))

    # FedAvg of the two valid replies, over the unpacked tensors, with public uniform weights
    expected = aggregate_arrayrecords(
        [RecordDict({"arrays": _record(good[n]), "metrics": MetricRecord({"w": 1})}) for n in (101, 303)], "w")
    assert list(arrays.keys()) == list(expected.keys())
    for name in expected.keys():
        np.testing.assert_array_equal(arrays[name].numpy(), expected[name].numpy())
    assert metrics["schools"] == 2


def test_a_packed_reply_with_the_wrong_dtype_is_rejected(strategy_setup):
    cfg, run, schools, query_reply, strategy = strategy_setup

    def answer(nid, message):
        if message.metadata.message_type == MessageType.QUERY:
            return query_reply(nid, message)
        reply = _train_reply(message, _state(nid))
        if nid == 303:   # float64 values sent under the float32 key (same count)
            arrays = reply.content["arrays"]
            arrays["packed-float32"] = Array(arrays["packed-float32"].numpy().astype(np.float64))
        return reply

    grid = PackedGrid(FakeGrid(schools, answer))
    replies = grid.send_and_receive(list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)))
    strategy.aggregate_train(1, replies)
    outcome = strategy.record.train["school-c"]
    assert outcome["status"] == "rejected" and "holds float64, not float32" in outcome["reason"]
    assert "\n" not in outcome["reason"]
    assert [strategy.record.train[s]["status"] for s in ("school-a", "school-b")] == ["ok", "ok"]


def _events(run):
    import json

    return [json.loads(line) for line in run.events_path.read_text().splitlines()]


def test_school_clientapp_answers_a_packed_request_with_a_packed_reply(tmp_path):
    """The real train handler: packed model in → packed model out; the layout names only tensors."""
    import json

    from school_fixtures import SECRET_STUDENTS, small_school_train

    from shared_models.wire import unpack

    model, out = small_school_train(tmp_path, pack_content)
    assert is_packed(out) and set(out.config_records) == {"status", "ledger", "layout"}
    assert all(k.startswith("packed-") for k in out["arrays"].keys())
    state = unpack(out["arrays"], out["layout"], strict=True)
    expected = model.state_dict()
    assert list(state) == list(expected) and all(state[k].shape == tuple(expected[k].shape) for k in expected)
    layout = json.loads(out["layout"]["layout"])
    assert {name for name, _, _ in layout} == set(expected)
    assert not any(student in out["layout"]["layout"] for student in SECRET_STUDENTS)


# ------------------------------------------------------------------------------------ reply attribution
def test_error_reply_for_a_dead_school_is_charged_to_that_school(strategy_setup):
    """The SuperLink answers for a school whose node died: sender = the SuperLink (node 1), so only
    `reply_to_message_id` says which school it is about. Replies also come back in any order."""
    cfg, run, schools, query_reply, strategy = strategy_setup

    class Reordering(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))

    def answer(nid, message):
        if message.metadata.message_type == MessageType.QUERY:
            return query_reply(nid, message)
        if nid == 202:
            return _superlink_error(message)
        return _train_reply(message, _state(nid))

    grid = PackedGrid(Reordering(schools, answer))
    replies = grid.send_and_receive(list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)))
    strategy.aggregate_train(1, replies)
    train = strategy.record.train
    assert set(train) == {"school-a", "school-b", "school-c"}      # no "node-1"
    assert train["school-b"]["status"] == "error" and "Node Unavailable" in train["school-b"]["reason"]
    assert train["school-a"]["status"] == "ok" and train["school-c"]["status"] == "ok"
    assert strategy.record.num_aggregated == 2
    events = [e for e in _events(run) if e["event"] == "client-error"]
    assert [e["school"] for e in events] == ["school-b"]


def test_a_reply_from_another_node_than_the_one_asked_is_rejected(strategy_setup):
    cfg, run, schools, query_reply, strategy = strategy_setup

    def answer(nid, message):
        if message.metadata.message_type == MessageType.QUERY:
            return query_reply(nid, message)
        # school-c's node answers the message sent to school-a (e.g. a confused or malicious node)
        return _train_reply(message, _state(nid)) if nid != 101 else \
            _reply(message, pack_content(RecordDict({"arrays": _record(_state(1)),
                                                     "metrics": MetricRecord({"unit-weight": 1, "declared-units": 100,
                                                                               "epsilon": 0.1}),
                                                     "status": ConfigRecord({"status": "ok"})})), src_node_id=303)

    grid = PackedGrid(FakeGrid(schools, answer))
    replies = grid.send_and_receive(list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)))
    strategy.aggregate_train(1, replies)
    train = strategy.record.train
    assert train["school-a"] == {"status": "rejected", "reason": "reply from node 303 to the message sent to node 101"}
    assert train["school-b"]["status"] == "ok" and train["school-c"]["status"] == "ok"


def test_a_query_error_from_the_superlink_names_the_node_that_was_asked(strategy_setup):
    cfg, run, schools, query_reply, strategy = strategy_setup

    def answer(nid, message):
        if nid == 303:
            return _superlink_error(message)
        if message.metadata.message_type == MessageType.QUERY:
            return query_reply(nid, message)
        return _train_reply(message, _state(nid))

    grid = PackedGrid(FakeGrid(schools, answer))
    strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)
    assert sorted(strategy.nodes) == [101, 202]
    errors = [e for e in _events(run) if e["event"] == "query-error"]
    assert [e["node_id"] for e in errors] == [303]


def test_fedavg_weights_are_public_a_reply_claiming_a_count_is_rejected(strategy_setup):
    """Schools send no example count; a reply that tries to weigh more than one vote, or whose declared
    size is not a whole number that agrees with its sampling rate, is rejected."""
    cfg, run, schools, query_reply, strategy = strategy_setup

    def answer(nid, message):
        if message.metadata.message_type == MessageType.QUERY:
            return query_reply(nid, message)
        if nid == 303:
            return _train_reply(message, _state(nid), declared=3.5)
        return _train_reply(message, _state(nid), 40 if nid == 202 else 1)

    grid = PackedGrid(FakeGrid(schools, answer))
    replies = grid.send_and_receive(list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)))
    strategy.aggregate_train(1, replies)
    outcome = strategy.record.train["school-b"]
    assert outcome["status"] == "rejected" and "unit-weight 40" in outcome["reason"]
    assert strategy.record.train["school-c"]["status"] == "rejected"
    assert "declared-units 3.5" in strategy.record.train["school-c"]["reason"]
    assert strategy.record.train["school-a"]["status"] == "ok"


def test_fedavg_weighs_schools_by_their_declared_size(strategy_setup):
    """FedAvg's weight is the public declared size: two schools declaring 100 and 300 give 1:3."""
    cfg, run, schools, query_reply, strategy = strategy_setup
    values = {101: 1.0, 202: 5.0, 303: 0.0}
    declared = {101: 100, 202: 300}

    def answer(nid, message):
        if message.metadata.message_type == MessageType.QUERY:
            return query_reply(nid, message)
        if nid == 303:
            return None
        state = {k: np.full_like(v, values[nid]) for k, v in _state(0).items()}
        return _train_reply(message, state, declared=declared[nid])

    grid = PackedGrid(FakeGrid(schools, answer))
    replies = grid.send_and_receive(list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)))
    arrays, _ = strategy.aggregate_train(1, replies)
    for name, array in arrays.items():
        np.testing.assert_allclose(array.numpy(), (1.0 * 100 + 5.0 * 300) / 400, rtol=1e-6)
