"""One object per message (shared_models/wire.py `bundle`): every record of a message travels in one
ConfigRecord, so Flower moves 3 objects per message instead of 7 (request) or 9 (reply); the records
come back exactly; a bundle that does not match its manifest is refused; the ServerApp's grid and the
real ClientApp speak it end to end. Also: a FAB Flower already installed is reused, not re-extracted
(client/runtime/app_check.py `installed_fab_dir`)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from grid_fixtures import FakeGrid, _record, _reply, _state
from server.transport import PackedGrid, fast_grid
from shared_models.wire import (
    BUNDLE_RECORD, ERROR_RECORD, PackingError, bundle, is_bundled, is_packed, pack_content, unbundle, unpack_content,
    unpack_reply,
)

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def _content(state=None) -> RecordDict:
    return RecordDict({
        "arrays": _record(state if state is not None else _state(1)),
        "config": ConfigRecord({"server-round": 3, "run-id": "r", "blob": b"\x00\x01", "flag": True,
                                "floats": [1.0, 2.5], "name": "école"}),
        "metrics": MetricRecord({"epsilon": 1.5, "steps": 4, "curve": [0.1, 0.2]}),
    })


def _same(a: RecordDict, b: RecordDict) -> None:
    assert list(a.keys()) == list(b.keys())
    for name in a.keys():
        assert type(a[name]) is type(b[name])
        if isinstance(a[name], ArrayRecord):
            assert list(a[name].keys()) == list(b[name].keys())
            for key in a[name].keys():
                x, y = a[name][key].numpy(), b[name][key].numpy()
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x, y)
        else:
            assert dict(a[name]) == dict(b[name])
            assert [type(v) for v in a[name].values()] == [type(v) for v in b[name].values()]


def test_bundle_is_one_record_and_comes_back_exactly():
    content = _content()
    for original in (content, pack_content(content)):
        bundled = bundle(original)
        assert is_bundled(bundled) and list(bundled.keys()) == [BUNDLE_RECORD]
        assert len(get_all_nested_objects(bundled)) == 2          # RecordDict + one ConfigRecord
        assert len(get_all_nested_objects(original)) >= 7
        _same(unbundle(bundled), original)
    # same content, same object: the SuperLink stores the model once for every school of the round
    assert bundle(pack_content(content))[BUNDLE_RECORD].object_id == bundle(pack_content(_content()))[BUNDLE_RECORD].object_id
    assert unbundle(content) is content                            # not bundled: unchanged


def test_a_model_over_the_limit_stays_an_array_record_next_to_the_bundle():
    content = pack_content(_content())
    bundled = bundle(content, max_array_bytes=10)
    assert set(bundled.keys()) == {"arrays", BUNDLE_RECORD} and isinstance(bundled["arrays"], ArrayRecord)
    _same(unbundle(bundled), content)


@pytest.mark.parametrize("spoil, message", [
    (lambda rec: rec.__setitem__("9:extra", 1), "belong to no record"),
    (lambda rec: rec.__setitem__("manifest", "not json"), "malformed 'manifest'"),
    (lambda rec: rec.__setitem__("manifest", '[["config", "secret"]]'), "is not [name, kind"),
    (lambda rec: rec.__setitem__("manifest", '[["a", "config"], ["a", "config"]]'), "repeated"),
    (lambda rec: rec.__setitem__("manifest", rec["manifest"].replace('"float32", [', '"float32", [-1, ')), "malformed"),
    (lambda rec: rec.__setitem__("manifest", rec["manifest"].replace('"packed-int64", ', '"packed-other", ')), "malformed"),
])
def test_a_bundle_that_does_not_match_its_manifest_is_refused(spoil, message):
    bundled = bundle(pack_content(_content()))
    record = bundled[BUNDLE_RECORD]
    spoil(record)
    with pytest.raises(PackingError, match=re.escape(message)):
        unbundle(bundled)


def test_a_bad_bundled_reply_becomes_a_packing_error_record():
    reply = _reply(Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=5,
                           message_type=MessageType.TRAIN), bundle(pack_content(_content())))
    reply.content[BUNDLE_RECORD]["9:unexpected"] = 1
    unpack_reply(reply)
    assert set(reply.content.keys()) == {ERROR_RECORD} and "belong to no record" in reply.content[ERROR_RECORD]["reason"]


def test_the_servers_grid_sends_one_shared_bundle_and_returns_plain_replies():
    state, seen = _state(1), {}

    def answer(nid, message):
        seen[nid] = message.content
        got = unpack_content(unbundle(message.content))
        trained = {k: np.asarray(v.numpy() + 1, dtype=v.numpy().dtype) for k, v in got["arrays"].items()}
        return _reply(message, bundle(pack_content(RecordDict({"arrays": _record(trained),
                                                                "metrics": MetricRecord({"w": 1})}))))

    assert isinstance(fast_grid(FakeGrid([11, 12], answer)), PackedGrid) and fast_grid(FakeGrid([], answer)).bundled
    grid = PackedGrid(FakeGrid([11, 12], answer), bundled=True)
    content = RecordDict({"arrays": _record(state), "config": ConfigRecord({"server-round": 1})})
    replies = list(grid.send_and_receive([Message(content, dst_node_id=n, message_type=MessageType.TRAIN)
                                          for n in (11, 12)], timeout=5))
    assert seen[11] is seen[12] and list(seen[11].keys()) == [BUNDLE_RECORD]   # built once per exchange
    assert dict(unbundle(seen[11])["config"]) == {"server-round": 1} and is_packed(unbundle(seen[11]))
    for reply in replies:
        assert list(reply.content.keys()) == ["arrays", "metrics"]
        for name, value in state.items():
            np.testing.assert_array_equal(reply.content["arrays"][name].numpy(), value + 1)


def test_school_clientapp_answers_a_bundled_request_bundled(tmp_path):
    from school_fixtures import SECRET_STUDENTS, small_school_train

    model, out = small_school_train(tmp_path, lambda content: bundle(pack_content(content)))
    assert list(out.keys()) == [BUNDLE_RECORD]
    plain = unpack_content(unbundle(out))
    assert set(plain.keys()) == {"arrays", "metrics", "status", "ledger"} and plain["status"]["status"] == "ok"
    expected = model.state_dict()
    assert list(plain["arrays"].keys()) == list(expected)
    assert not any(s in str(dict(out[BUNDLE_RECORD])) for s in SECRET_STUDENTS)


def test_a_fab_flower_installed_is_found_and_reused(tmp_path, monkeypatch):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    from client.runtime import app_check
    from simulations.bench.deploy import write_toy_app

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    fab = build_fab_from_disk(write_toy_app(tmp_path / "app"))
    assert app_check.installed_fab_dir(fab) is None
    assert app_check.installed_fab_dir(b"not a zip") is None
    installed = install_from_fab(fab, skip_prompt=True)
    assert app_check.installed_fab_dir(fab) == installed

    class Runtime:   # the module attribute guard_fab_install wraps, as in flwr's run_clientapp
        calls = []
        install_from_fab = staticmethod(lambda content, **kw: Runtime.calls.append(kw) or "installed")

    monkeypatch.setattr(app_check, "check_fab", lambda fab_content, root=None: None)
    app_check.guard_fab_install(Runtime)
    assert Runtime.install_from_fab(fab, skip_prompt=True) == installed and Runtime.calls == []
    changed = write_toy_app(tmp_path / "app2")
    (changed / "toyapp" / "extra.py").write_text("X = 1\n")
    assert Runtime.install_from_fab(build_fab_from_disk(changed), skip_prompt=True) == "installed"   # not installed yet: Flower's
    assert Runtime.calls == [{"skip_prompt": True}]
