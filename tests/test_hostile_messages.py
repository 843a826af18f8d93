"""Messages as an attacker or a buggy peer would send them, through the real handlers: a school's train
reply, a node's answer to the role query, a ledger record, the evaluation node's metrics, and (the other
way) a train message at a school. Each is refused for that node only, with one line naming it; the
other schools' round completes and nothing crashes the ServerApp or runs past what it declares.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from grid_fixtures import FakeGrid, _record, _reply, _state, _train_reply
from server.transport import PackedGrid
from shared_models.wire import bundle, pack_content

pytestmark = pytest.mark.usefixtures("serverapp_identity")

SCHOOLS = {101: "school-a", 202: "school-b", 303: "school-c"}


def _setup(tmp_path):
    from privacy.signing import load_or_create_signing_key, public_key_pem
    from server.run_dir import RunDirectory
    from server.strategy import SchoolFedAvg
    from shared_models.config import load_config

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "privacy.enabled=false",
                             "federation.min_train_schools=1", "federation.max_update_norm=1000",
                             "federation.server_momentum=0"])
    run = RunDirectory.create(cfg)
    keys = {nid: public_key_pem(load_or_create_signing_key(tmp_path / name)) for nid, name in SCHOOLS.items()}
    return run, keys, SchoolFedAvg(cfg, run)


def _round(tmp_path, bad_train=None, bad_query=None, packed=True):
    """One round with school-b (node 202) answering `bad_train(message)` / `bad_query(message, info)`.
    Returns (record.train, the aggregate, the run directory)."""
    run, keys, strategy = _setup(tmp_path)

    def answer(nid, message):
        if message.metadata.message_type == MessageType.QUERY:
            info = {"role": "school", "school-id": SCHOOLS[nid], "public-key": keys[nid]}
            if nid == 202 and bad_query is not None:
                return bad_query(message, info)
            return _reply(message, RecordDict({"node": ConfigRecord(info)}))
        if nid == 202 and bad_train is not None:
            return bad_train(message)
        return _train_reply(message, _state(nid))

    grid = PackedGrid(FakeGrid(SCHOOLS, answer)) if packed else FakeGrid(SCHOOLS, answer)
    replies = grid.send_and_receive(list(strategy.configure_train(1, _record(_state(0)), ConfigRecord(), grid)))
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy.record.train, arrays, run


def _metrics(**extra):
    return MetricRecord({"unit-weight": 1, "declared-units": 100, "epsilon": 0.5, **extra})


def _content(arrays, metrics=None, status=None, **records):
    return RecordDict({"arrays": arrays, "metrics": metrics or _metrics(),
                       "status": status or ConfigRecord({"status": "ok"}), **records})


def _only_b_refused(train, arrays, words):
    assert train["school-a"]["status"] == "ok" and train["school-c"]["status"] == "ok"
    assert train["school-b"]["status"] == "rejected", train["school-b"]
    reason = train["school-b"]["reason"]
    assert "\n" not in reason and "\x1b" not in reason and len(reason) <= 300
    assert words in reason, reason
    assert arrays is not None


# ------------------------------------------------------------------------------------ weights
def test_integer_weights_do_not_escape_the_update_norm(tmp_path):
    """int64 values for a float tensor were averaged in unchecked: one school moved the model by 10^15."""
    huge = ArrayRecord({k: Array(np.full(v.shape, 10**15, dtype=np.int64)) for k, v in _state(2).items()})
    train, arrays, _ = _round(tmp_path, lambda m: _reply(m, _content(huge)), packed=False)
    _only_b_refused(train, arrays, "exceeds federation.max_update_norm")
    assert float(np.abs(arrays["conv.weight"].numpy()).max()) < 10


def test_complex_weights_are_refused_not_a_crash(tmp_path):
    cplx = ArrayRecord({k: Array(np.asarray(v.astype(np.complex64))) for k, v in _state(2).items()})
    train, arrays, _ = _round(tmp_path, lambda m: _reply(m, _content(cplx)), packed=False)
    _only_b_refused(train, arrays, "has dtype complex64, not real numbers")


def _npy_claiming(count: int) -> Array:
    """A .npy array whose header claims `count` float32 values but that carries four."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(4, dtype=np.float32))
    data = buffer.getvalue()
    header = data[:128].decode("latin1").replace("(4,)", f"({count},)")
    header = header[:127].rstrip("\n").ljust(127) + "\n"
    return Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=header.encode("latin1") + data[128:])


@pytest.mark.parametrize("array, words", [
    (_npy_claiming(10**12), "declares shape (1000000000000,)"),        # numpy allocated 3.6 TiB: MemoryError
    (Array(dtype="float32", shape=(4,), stype="torch", data=b"junk"), "serialised as 'torch'"),
    (Array(dtype="object", shape=(4,), stype="numpy.ndarray", data=b"junk"), "not a .npy array"),
], ids=["terabytes", "stype", "junk"])
def test_an_array_that_lies_about_its_size_is_refused_before_it_is_allocated(tmp_path, array, words):
    state = {k: Array(v) for k, v in _state(2).items()}
    state["conv.bias"] = array
    train, arrays, _ = _round(tmp_path, lambda m: _reply(m, _content(ArrayRecord(state))), packed=False)
    _only_b_refused(train, arrays, words)


def test_a_packed_array_that_lies_about_its_size_becomes_a_packing_error(tmp_path):
    def bad(message):
        reply = _train_reply(message, _state(2))
        reply.content["arrays"]["packed-float32"] = _npy_claiming(10**12)
        return reply

    train, arrays, _ = _round(tmp_path, bad)
    _only_b_refused(train, arrays, "declares shape (1000000000000,)")


# ------------------------------------------------------------------------------------ metrics and status
def test_fedavg_cannot_be_weighed_by_a_second_metric_record(tmp_path):
    """Flower's FedAvg weighs a reply by its *first* MetricRecord: one placed before 'metrics' claiming 10^9
    units made school-b's update the whole average while 'metrics' passed the declared-size check."""
    state = {k: np.full_like(v, 3.0) for k, v in _state(0).items()}
    content = RecordDict({"arrays": _record(state), "aaa": MetricRecord({"declared-units": 10**9}),
                          "metrics": _metrics(), "status": ConfigRecord({"status": "ok"})})
    train, arrays, _ = _round(tmp_path, lambda m: _reply(m, content), packed=False)
    _only_b_refused(train, arrays, "one MetricRecord")
    assert float(arrays["conv.bias"].numpy().max()) < 2.9


@pytest.mark.parametrize("metrics, words", [
    (_metrics(epsilon=float("nan")), "metric 'epsilon' is nan"),
    (_metrics(status=5), "metric 'status' is not one a school sends"),         # overwrote the outcome's status
    (_metrics(junk=[1.0] * 1000), "metric 'junk' is not one a school sends"),  # went into metrics.jsonl
], ids=["nan", "status", "list"])
def test_metrics_are_the_public_values_a_school_sends(tmp_path, metrics, words):
    train, arrays, _ = _round(tmp_path, lambda m: _reply(m, _content(_record(_state(2)), metrics)), packed=False)
    _only_b_refused(train, arrays, words)


@pytest.mark.parametrize("status, words", [
    ({"foo": "bar"}, "status 'None' is not one of"),              # KeyError ended the ServerApp
    ({"status": "weird\n\x1b[31mred", "reason": "x"}, "status 'weird [31mred' is not one of"),
], ids=["missing", "escapes"])
def test_a_status_record_is_checked(tmp_path, status, words):
    content = RecordDict({"status": ConfigRecord(status)})
    train, arrays, _ = _round(tmp_path, lambda m: _reply(m, content), packed=False)
    _only_b_refused(train, arrays, words)


@pytest.mark.parametrize("status", ["busy", "failed", "declined", "no-data"])
def test_every_status_a_school_sends_is_recorded_as_sent(tmp_path, status):
    """client/app.py answers 'failed' when its round raised (its fixed reason, never the error's text)."""
    content = RecordDict({"status": ConfigRecord({"status": status, "reason": "the school's round failed"})})
    train, _, _ = _round(tmp_path, lambda m: _reply(m, content), packed=False)
    assert train["school-b"]["status"] == status and train["school-a"]["status"] == "ok"


def test_a_declines_reason_is_one_bounded_line(tmp_path):
    content = RecordDict({"status": ConfigRecord({"status": "busy", "reason": "x" * 100_000 + "\n\x1b[2JINJECTED"})})
    train, _, run = _round(tmp_path, lambda m: _reply(m, content), packed=False)
    assert train["school-b"]["status"] == "busy"
    reason = train["school-b"]["reason"]
    assert len(reason) <= 300 and "\n" not in reason and "\x1b" not in reason
    assert "INJECTED" not in run.events_path.read_text()


# ------------------------------------------------------------------------------------ role query
def _query(**info):
    def answer(message, base):
        return _reply(message, RecordDict({"node": ConfigRecord({**base, **info})}))
    return answer


def _ok_without_b(train):
    assert {school: o["status"] for school, o in train.items()} == {"school-a": "ok", "school-c": "ok"}


@pytest.mark.parametrize("bad_query, words", [
    (lambda message, base: _reply(message, RecordDict({"x": ConfigRecord({"role": "school"})})), "role ''"),
    (_query(role="x\ny"), "role 'x y'"),
    (_query(**{"school-id": "../../../../outside"}), "school id '../../../../outside' is not a name"),
    (_query(**{"school-id": "school\n\x1b[31m"}), "is not a name"),
    (_query(**{"school-id": ""}), "school id '' is not a name"),
    (_query(**{"public-key": ""}), "its ledger public key is not PEM text"),       # read '.' as the key file
    (_query(**{"public-key": __file__}), "its ledger public key is not PEM text"),   # read as a key file
    (_query(**{"school-id": "school-a"}), "claims to be school-a, which node 101 already is"),
], ids=["no-record", "role", "traversal", "escapes", "empty-id", "empty-key", "key-path", "impostor"])
def test_a_bad_answer_to_the_role_query_refuses_that_node(tmp_path, bad_query, words):
    train, _, run = _round(tmp_path, bad_query=bad_query)
    _ok_without_b(train)
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    refused = [e for e in events if e["event"] == "query-error"]
    assert [e["node_id"] for e in refused] == [202] and words in refused[0]["reason"], refused
    assert "\n" not in refused[0]["reason"]
    assert not (tmp_path / "outside.pub").exists() and not list(tmp_path.parent.glob("outside*"))


def test_a_public_key_that_is_not_a_key_rejects_the_school_not_the_run(tmp_path):
    train, _, run = _round(tmp_path, bad_query=_query(**{"school-id": "school-x", "public-key": "-----BEGIN junk"}))
    _ok_without_b(train)
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert any(e["event"] == "rejected-school" and e["school"] == "school-x" and "not a PEM public key" in e["reason"]
               for e in events)


# ------------------------------------------------------------------------------------ ledger record
@pytest.mark.parametrize("ledger, words", [
    ({"run-entries": "[]"}, "ledger field 'entry' is not a JSON object"),
    ({"entry": "{not json"}, "ledger field 'entry' is not a JSON object"),
    ({"entry": "[1, 2]"}, "ledger field 'entry' is not a JSON object"),
    ({"entry": "[" * 100_000}, "ledger field 'entry' is not a JSON object"),
    ({"entry": json.dumps({"school_id": "school-a", "round": "abc", "run_id": "t"})}, "round abc"),
    ({"entry": json.dumps({"school_id": "school-a", "round": 1, "run_id": "t"}), "run-entries": "[1]"},
     "'run-entries' must be a list of entries"),
    ({"entry": json.dumps({"school_id": "school-a", "round": 1, "run_id": "t"}), "run-entries": "{}"},
     "ledger field 'run-entries' is not a JSON list"),
], ids=["no-entry", "not-json", "list", "deep", "round", "entries-ints", "entries-object"])
def test_a_malformed_ledger_record_is_rejected_not_a_crash(tmp_path, ledger, words):
    from server.validation import RejectedUpdate

    run, _, strategy = _setup(tmp_path)
    with pytest.raises(RejectedUpdate, match="ledger") as refused:
        strategy._store_ledger(RecordDict({"ledger": ConfigRecord(ledger)}), "school-a", 1)
    assert words in str(refused.value) and "\n" not in str(refused.value)


# ------------------------------------------------------------------------------------ evaluation node
@pytest.mark.parametrize("metrics, words", [
    ({"bench.accuracy": float("nan")}, "no accuracy in [0, 1]"),     # the progress line's format crashed
    ({"bench.uar": 0.5}, "no accuracy in [0, 1]"),                    # KeyError in the progress line
    ({"bench.accuracy": [0.1, 0.2]}, "metric 'bench.accuracy' is a list"),
    ({"bench.accuracy": 0.5, "eval-seconds": [1.0]}, "'eval-seconds' is [1.0]"),
    ({"bench.accuracy": 0.5, "bench.accuracy_ci_low": [1.0]}, "is a list"),
    ({"bench.accuracy": 0.5, "bench.confusion": [1, 2]}, "not a square table"),
    ({"be\nnch|<b>.accuracy": 0.5}, "is not <benchmark>.<metric>"),
], ids=["nan", "missing", "list", "seconds", "ci", "confusion", "name"])
def test_evaluation_metrics_that_do_not_fit_are_refused(tmp_path, metrics, words):
    from server.round_writer import progress_line
    from server.strategy import RoundRecord

    run, _, strategy = _setup(tmp_path)
    record = RoundRecord(1)
    request = Message(RecordDict({}), dst_node_id=9, message_type=MessageType.EVALUATE)
    assert strategy._record_evaluation(_reply(request, RecordDict({"metrics": MetricRecord(metrics)})), record) is None
    assert record.evaluation == {}
    progress_line(record, 3, "bench", 1.0)
    events = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert words in events[-1]["reason"] and events[-1]["event"] == "evaluator-error"


def test_the_evaluation_nodes_own_metrics_pass(tmp_path):
    from server.round_writer import progress_line
    from server.strategy import RoundRecord
    from shared_models.evaluation import flatten_metrics
    from shared_models.metrics import classification_report

    report = classification_report([0, 1, 2, 2, 1], [0, 1, 2, 1, 1], num_classes=8, n_boot=20)
    metrics = {**flatten_metrics({"synthetic-fer2013": report, "fer2013:test": report}), "eval-seconds": 1.5}
    run, _, strategy = _setup(tmp_path)
    record = RoundRecord(1)
    request = Message(RecordDict({}), dst_node_id=9, message_type=MessageType.EVALUATE)
    assert strategy._record_evaluation(_reply(request, RecordDict({"metrics": MetricRecord(metrics)})), record)
    assert record.evaluation["synthetic-fer2013"]["accuracy"] == 0.8
    assert "synthetic-fer2013 acc 0.800" in progress_line(record, 3, "synthetic-fer2013", 1.0)


def test_a_school_refuses_a_model_array_that_lies_about_its_size(tmp_path):
    """The other way: the coordinator's model reaches a school's `_received_state`, packed or not."""
    from client.app import _received_state
    from shared_models.wire import PackingError

    lying = RecordDict({"arrays": ArrayRecord({"w": _npy_claiming(10**12)})})
    with pytest.raises(PackingError, match=r"array 'w': its header declares shape \(1000000000000,\)"):
        _received_state(lying)
    packed = pack_content(RecordDict({"arrays": _record(_state(1))}))
    packed["arrays"]["packed-float32"] = _npy_claiming(10**12)
    with pytest.raises(PackingError, match="declares shape"):
        _received_state(packed)


# ------------------------------------------------------------------------------------ server -> school
@pytest.mark.parametrize("field, value, words", [
    ("server-round", "abc", "config field 'server-round' is 'abc'"),   # ValueError in the handler
    ("server-round", -5, "config field 'server-round' is '-5'"),       # trained, then the ledger refused it
    ("run-id", "r\n\x1b[31m", "config field 'run-id'"),               # went into the signed ledger entry
    ("run-id", "", "config field 'run-id'"),
], ids=["round-text", "round-negative", "run-id-escapes", "run-id-empty"])
def test_a_school_declines_a_train_message_with_a_bad_round_or_run_id_before_training(tmp_path, field, value, words):
    from school_fixtures import school_context, train_message, write_school

    from client import app as client_app
    from shared_models.config import load_config
    from shared_models.models import registry

    cfg = load_config(None, ["train.batch_size=2", "federation.rounds=2"])
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    school = write_school(tmp_path / "school", [f"s{i}" for i in range(8)])
    message = train_message(model.state_dict(), tmp_path / "run")
    message.content["config"][field] = value
    reply = client_app.train(message, school_context(school, tmp_path / "state", cfg)).content
    status = reply["status"]
    assert status["status"] == "declined" and words in status["reason"] and "\n" not in status["reason"]
    assert not (tmp_path / "state" / "ledger.jsonl").exists()


def test_a_school_declines_a_global_model_with_nan_before_spending_anything(tmp_path):
    """A NaN or Inf in the coordinator's model: nothing could be learnt from it, so no ε is spent on it."""
    from school_fixtures import school_context, train_message, write_school

    from client import app as client_app
    from shared_models.config import load_config
    from shared_models.models import registry

    cfg = load_config(None, ["train.batch_size=2", "federation.rounds=2"])
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    state = model.state_dict()
    name = next(iter(state))
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    school = write_school(tmp_path / "school", [f"s{i}" for i in range(8)])
    reply = client_app.train(train_message(state, tmp_path / "run"), school_context(school, tmp_path / "state", cfg))
    status = reply.content["status"]
    assert status["status"] == "declined" and f"'{name}' holds NaN or Inf" in status["reason"], dict(status)
    assert not (tmp_path / "state" / "ledger.jsonl").exists()


# ------------------------------------------------------------------------------------ the coordinator's anchored head
# Each train message carries what the coordinator's anchor holds of the school's chain ("ledger-anchor": `entries`,
# `head`; client/app.py `_anchored_head`). A hostile coordinator can send anything there; whatever it sends, the
# school declines in one line before anything is trained, recorded or signed (or trains exactly as it would have).
ANCHOR = "ledger-anchor"   # shared_models/wire.py LEDGER_ANCHOR_RECORD: the name on the wire


def _state_files(state) -> dict:
    """The state folder's files that record spending or training (not locks, not the school's timing log)."""
    return {p.name: p.read_bytes() for p in state.iterdir()
            if p.is_file() and not p.name.endswith(".lock") and p.name != "round-timing.jsonl"}


@pytest.fixture(scope="module")
def trained_schools(tmp_path_factory):
    """school-x and school-y, each with one real round in its ledger (run-1, round 1). Returns
    (school-x's data folder, its state folder, the global model, school-x's head, school-y's head, run config)."""
    from school_fixtures import school_context, train_message, write_school

    from client import app as client_app
    from privacy.ledger import read_ledger_file
    from server.deploy.commands import make_school_keys
    from shared_models.config import from_run_config, load_config
    from shared_models.models import registry

    overrides = ["train.batch_size=2", "federation.rounds=4", "train.frames_per_student=2"]
    run_config = from_run_config(dict(o.split("=", 1) for o in overrides))
    root = tmp_path_factory.mktemp("anchored")
    cfg = load_config(None, overrides)
    torch_model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"])).state_dict()
    heads = {}
    for school_id in ("school-x", "school-y"):
        school = write_school(root / school_id, [f"s{i}" for i in range(6)])
        state = root / f"{school_id}-state"
        make_school_keys(state)
        reply = client_app.train(train_message(torch_model, root / "run-1", server_round=1, run_id="run-1"),
                                 school_context(school, state, run_config, **{"school-id": school_id}))
        assert reply.content["status"]["status"] == "ok", dict(reply.content["status"])
        heads[school_id] = read_ledger_file(state / "ledger.jsonl")[-1]["hash"]
    return root / "school-x", root / "school-x-state", torch_model, heads["school-x"], heads["school-y"], run_config


def _hostile_anchors(own_head: str, other_head: str) -> dict:
    """name -> (what the coordinator puts under "ledger-anchor", the reply's status, words its reason holds)."""
    def anchor(**values):
        return ConfigRecord(values)
    bad_count, bad_head = "'entries' is", "'head' is"
    return {
        "count-text": (anchor(entries="1", head=own_head), "declined", bad_count),
        "count-float": (anchor(entries=1.0, head=own_head), "declined", bad_count),
        "count-bool": (anchor(entries=True, head=own_head), "declined", bad_count),
        "count-list": (anchor(entries=[1], head=own_head), "declined", bad_count),
        "count-zero": (anchor(entries=0, head=own_head), "declined", bad_count),
        "count-negative": (anchor(entries=-1, head=own_head), "declined", bad_count),
        "count-int64-max": (anchor(entries=2**63 - 1, head=own_head), "declined", bad_count),
        "count-past-the-ledger": (anchor(entries=10**9 - 1, head=own_head), "ledger-behind", "lacks entries"),
        "count-missing": (anchor(head=own_head), "declined", bad_count),
        "head-short": (anchor(entries=1, head=own_head[:63]), "declined", bad_head),
        "head-long": (anchor(entries=1, head=own_head + "00"), "declined", bad_head),
        "head-not-hex": (anchor(entries=1, head="zz" * 32), "declined", bad_head),
        "head-upper-case": (anchor(entries=1, head=own_head.upper()), "declined", bad_head),
        "head-bytes": (anchor(entries=1, head=own_head.encode()), "declined", bad_head),
        "head-escapes": (anchor(entries=1, head="\x1b[31m\n" + own_head), "declined", bad_head),
        "head-missing": (anchor(entries=1), "declined", bad_head),
        "empty-record": (anchor(), "declined", bad_count),
        "extra-keys": (anchor(entries=1, head=own_head, school="school-y", epsilon=0.0), "declined",
                       "holds 'epsilon', 'school'"),
        "another-schools-head": (anchor(entries=1, head=other_head), "ledger-behind", "lacks entries"),
        "metric-record": (MetricRecord({"entries": 1}), "declined", "not a config record"),
        "array-record": (ArrayRecord({}), "declined", "not a config record"),
    }


def _train_with_anchor(trained_schools, tmp_path, record, bundled: bool):
    """school-x's round 2 of run-1 (everything else in the message valid) with `record` as its "ledger-anchor",
    on a copy of its state folder; bundled: in the form the server's grid sends (server/transport.py: the model and
    config in one bundle, the anchor beside it). Returns (reply content, files before, files after)."""
    import shutil

    from school_fixtures import school_context, train_message

    from client import app as client_app
    from shared_models.wire import bundle, unbundle

    school, trained_state, model, _, _, run_config = trained_schools
    state = tmp_path / "state"
    shutil.copytree(trained_state, state)
    message = train_message(model, tmp_path / "run-1", server_round=2, run_id="run-1")
    if bundled:
        message.content = bundle(pack_content(message.content))
    message.content[ANCHOR] = record
    before = _state_files(state)
    reply = client_app.train(message, school_context(school, state, run_config))
    return unbundle(reply.content), before, _state_files(state)   # a bundled request is answered bundled


def test_the_anchor_fixture_trains_when_the_anchor_is_right(trained_schools, tmp_path):
    """The control for the cases below: the same message with the right anchor trains and signs round 2."""
    own_head = trained_schools[3]
    right = ConfigRecord({"entries": 1, "head": own_head})
    content, before, after = _train_with_anchor(trained_schools, tmp_path, right, bundled=True)
    assert content["status"]["status"] == "ok", dict(content["status"])
    assert "ledger" in content.config_records and after["ledger.jsonl"] != before["ledger.jsonl"]


@pytest.mark.parametrize("bundled", [False, True], ids=["plain", "bundled"])
@pytest.mark.parametrize("case", list(_hostile_anchors("0" * 64, "1" * 64)))
def test_a_hostile_anchor_makes_the_school_decline_in_one_line_with_nothing_trained_or_signed(
        trained_schools, tmp_path, case, bundled):
    """Extra keys, or the name on a metric or array record, were read as "no anchor" (the school trained on);
    now every record the school cannot read as (entries, head) declines the round."""
    record, status, words = _hostile_anchors(trained_schools[3], trained_schools[4])[case]
    content, before, after = _train_with_anchor(trained_schools, tmp_path, record, bundled)
    reply = dict(content["status"])
    assert reply["status"] == status and words in reply["reason"], reply
    assert "\n" not in reply["reason"] and "\x1b" not in reply["reason"] and len(reply["reason"]) <= 500
    assert "ledger" not in content.config_records and "arrays" not in content.array_records
    assert after == before


def test_an_anchor_inside_the_bundle_as_well_as_beside_it_is_declined_not_raised(trained_schools, tmp_path):
    """Two "ledger-anchor" records (one folded into the bundle, one beside it): unbundling raised PackingError out
    of the ClientApp (a traceback in the school's log); now the school declines naming the repeated record."""
    import shutil

    from school_fixtures import school_context, train_message

    from client import app as client_app
    from shared_models.wire import bundle

    school, trained_state, model, own_head, _, run_config = trained_schools
    state = tmp_path / "state"
    shutil.copytree(trained_state, state)
    message = train_message(model, tmp_path / "run-1", server_round=2, run_id="run-1")
    message.content[ANCHOR] = ConfigRecord({"entries": 1, "head": "ab" * 32})
    message.content = RecordDict({**bundle(pack_content(message.content)),
                                  ANCHOR: ConfigRecord({"entries": 1, "head": own_head})})
    before = _state_files(state)
    reply = dict(client_app.train(message, school_context(school, state, run_config)).content["status"])
    assert reply["status"] == "declined", reply
    assert "'ledger-anchor'" in reply["reason"] and "repeated" in reply["reason"], reply
    assert "\n" not in reply["reason"]
    assert _state_files(state) == before


@pytest.mark.parametrize("change, words", [
    (lambda state: {"w": state[next(iter(state))]}, "lacks"),                      # another model's tensors
    (lambda state: {**state, "extra.weight": state[next(iter(state))]}, "holds 1 tensor(s)"),
    (lambda state: {**state, next(iter(state)): state[next(iter(state))][..., :1]}, "has shape"),
    (lambda state: {**state, "w": torch.zeros(3)}, "holds 1 tensor(s)"),
], ids=["other-model", "extra-tensor", "wrong-shape", "unknown-name"])
def test_a_school_declines_a_global_model_that_does_not_fit_its_model_in_one_line(tmp_path, change, words):
    """A coordinator's model whose tensors are not the school's model's: load_state_dict raised RuntimeError out of
    the ClientApp (a traceback in the school's log); now the school declines in one line, before spending anything."""
    from school_fixtures import school_context, train_message, write_school

    from client import app as client_app
    from shared_models.config import load_config
    from shared_models.models import registry

    cfg = load_config(None, ["train.batch_size=2", "federation.rounds=2"])
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    school = write_school(tmp_path / "school", [f"s{i}" for i in range(4)])
    message = train_message(change(model.state_dict()), tmp_path / "run")
    status = client_app.train(message, school_context(school, tmp_path / "state", cfg)).content["status"]
    assert status["status"] == "declined" and words in status["reason"], dict(status)
    assert "\n" not in status["reason"] and len(status["reason"]) <= 500
    assert not (tmp_path / "state" / "ledger.jsonl").exists()


@pytest.mark.parametrize("change, words", [
    (lambda state: {"w": state[next(iter(state))]}, "lacks"),
    (lambda state: {**state, next(iter(state)): state[next(iter(state))][..., :1]}, "has shape"),
], ids=["other-model", "wrong-shape"])
def test_the_evaluation_node_declines_a_global_model_that_does_not_fit_in_one_line(tmp_path, change, words):
    """The evaluation node got the same model check as a school only in train(): load_state_dict's RuntimeError went
    out of evaluate() as a traceback (session 25's fuzz pass). Now a one-line decline the server records."""
    from school_fixtures import train_message

    from client import app as client_app
    from shared_models.config import load_config
    from shared_models.models import registry

    cfg = load_config(None, ["federation.rounds=2"])
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    context = Context(run_id=1, node_id=2, node_config={"role": "evaluator", "data-dir": str(tmp_path / "public")},
                      state=RecordDict(), run_config=dict(cfg))
    status = client_app.evaluate(train_message(change(model.state_dict()), tmp_path / "run"), context).content["status"]
    assert status["status"] == "declined" and words in status["reason"], dict(status)
    assert "\n" not in status["reason"] and len(status["reason"]) <= 500


def test_a_malformed_bundle_to_the_evaluation_node_or_the_role_query_is_declined_not_raised(tmp_path):
    from school_fixtures import train_message

    from client import app as client_app
    from shared_models.config import load_config
    from shared_models.models import registry

    cfg = load_config(None, ["federation.rounds=2"])
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    message = train_message(model.state_dict(), tmp_path / "run")
    content = bundle(pack_content(message.content))
    name = next(iter(content.config_records))
    content[name] = ConfigRecord({**dict(content[name]), "manifest": "not a manifest"})   # does not match its parts
    message.content = content
    context = Context(run_id=1, node_id=2, node_config={"role": "evaluator", "data-dir": str(tmp_path / "public")},
                      state=RecordDict(), run_config=dict(cfg))
    for handler in (client_app.evaluate, client_app.query):
        status = handler(message, context).content["status"]
        assert status["status"] == "declined" and "message" in status["reason"], dict(status)


def test_an_evaluation_nodes_decline_is_recorded_with_its_reason(tmp_path):
    """It was recorded as 'reply without metrics', hiding why (a model that does not fit, a malformed message)."""
    from server.strategy import RoundRecord

    run, _, strategy = _setup(tmp_path)
    request = Message(RecordDict({}), dst_node_id=9, message_type=MessageType.EVALUATE)
    declined = RecordDict({"status": ConfigRecord({"status": "declined", "reason": "the global model's 'w' has\nshape"})})
    assert strategy._record_evaluation(_reply(request, declined), RoundRecord(1)) is None
    event = json.loads(run.events_path.read_text().splitlines()[-1])
    assert event["event"] == "evaluator-error" and event["reason"] == "declined: the global model's 'w' has shape"
