"""A school whose ledger.jsonl is lost must not train again from ε 0 (fail closed).

Before this check a state folder that lost its ledger *and* its accountant (or everything but the signing key)
trained again with a fresh budget: a new chain at genesis, ε counted from 0 — the budget guard reset. A lost
ledger with the accountant kept trained the whole round and only failed when the entry was signed, and a lost
ledger *and* key made a new key, overwriting the lost key's public half. Now the round is declined before
anything is trained or any key is made, and the node does not start, each in one line naming the ledger.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from school_fixtures import school_context, train_message, write_school

from client import app as client_app
from client.runtime.preflight import NodeStartError, check_school_folders
from privacy.signing import SigningKeyError, load_or_create_signing_key
from privacy.state_folder import LEDGER_MARKER
from shared_models.config import from_run_config, load_config
from shared_models.models import registry

BASE = ["train.batch_size=2", "federation.rounds=3", "train.frames_per_student=2"]
STUDENTS = [f"s{i}" for i in range(6)]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A school folder and a state folder after one trained round, and the global model."""
    root = tmp_path_factory.mktemp("lost-ledger")
    cfg = load_config(None, BASE)
    torch.manual_seed(0)
    global_state = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"])).state_dict()
    school = write_school(root / "school", STUDENTS)
    state = root / "state"
    out = _train(school, state, global_state, 1)
    assert out.content["status"]["status"] == "ok"
    return school, state, global_state


def _train(school: Path, state: Path, global_state: dict, server_round: int):
    run_config = from_run_config(dict(o.split("=", 1) for o in BASE))
    return client_app.train(train_message(global_state, school.parent / "run", server_round=server_round),
                            school_context(school, state, run_config))


def _wipe_all_but_keys(state: Path) -> None:
    for path in state.iterdir():
        if not path.name.startswith("signing_key"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


LOSSES = {
    "ledger deleted": lambda s: (s / "ledger.jsonl").unlink(),
    "ledger emptied": lambda s: (s / "ledger.jsonl").write_text(""),
    "ledger and accountant deleted": lambda s: [p.unlink() for p in [s / "ledger.jsonl", *s.glob("accountant-*.json")]],
    "ledger and signing key deleted": lambda s: [(s / n).unlink() for n in ("ledger.jsonl", "signing_key.pem")],
    "everything but the keys wiped": _wipe_all_but_keys,
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_a_school_whose_ledger_is_lost_does_not_train_again(trained_once, tmp_path, loss):
    school, trained_state, global_state = trained_once
    state = tmp_path / "state"
    shutil.copytree(trained_state, state)
    public_before = (state / "signing_key.pub").read_bytes()
    LOSSES[loss](state)
    kept = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file() and not p.name.endswith(".lock")}

    out = _train(school, state, global_state, 2)

    assert out.content["status"]["status"] == "ledger-lost", dict(out.content["status"])
    assert "ledger is lost" in out.content["status"]["reason"]
    assert not out.content.array_records and "ledger" not in out.content.config_records   # nothing sent
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file() and not p.name.endswith(".lock")}
    after.pop("round-timing.jsonl", None), kept.pop("round-timing.jsonl", None)
    assert after == kept   # no ledger started, no key made, nothing recorded
    assert (state / "signing_key.pub").read_bytes() == public_before   # the lost key's public half is kept


def test_the_refusal_is_one_line_in_the_schools_log_and_at_node_start(trained_once, tmp_path):
    _, trained_state, _ = trained_once
    state = tmp_path / "state"
    shutil.copytree(trained_state, state)
    (state / "ledger.jsonl").unlink()
    node_config = {"data-dir": str(tmp_path), "state-dir": str(state), "school-id": "school-x"}
    with pytest.raises(NodeStartError) as refused:
        check_school_folders(node_config, "node-config.toml")
    message = str(refused.value)
    assert "\n" not in message and f"{state / 'ledger.jsonl'}: missing" in message and "school-x" in message
    assert "fedfer deploy restore-ledger" in message
    # the command it gives runs as printed: restore-ledger requires --school
    assert f"restore-ledger --state-dir {state} --school school-x --from DIR" in message
    (state / "signing_key.pem").unlink()
    with pytest.raises(SigningKeyError, match="ledger.jsonl: missing"):   # no new key over the lost one's .pub
        load_or_create_signing_key(state)


def test_the_first_entry_marks_the_folder_beside_the_key(trained_once):
    _, state, _ = trained_once
    assert (state / LEDGER_MARKER).is_file()


def test_a_school_that_never_trained_still_starts_and_trains(trained_once, tmp_path):
    """A key made at enrolment (`fedfer deploy school-key`) is not a sign of training: no false refusal."""
    from server.deploy.commands import make_school_keys

    school, _, global_state = trained_once
    state = tmp_path / "state"
    make_school_keys(state)
    check_school_folders({"data-dir": str(tmp_path), "state-dir": str(state), "school-id": "school-x"}, "node-config")
    out = _train(school, state, global_state, 1)
    assert out.content["status"]["status"] == "ok", dict(out.content["status"])
    assert json.loads(out.content["ledger"]["entry"])["prev_hash"] == "0" * 64


def test_a_ledger_older_than_the_folders_last_entry_is_refused(trained_once, tmp_path):
    """An old backup of the ledger and the accountant put back (the keys and the marker beside them kept): the
    accountant agrees with the old ledger, so only the marker's record of the last entry shows it. Before, the
    school trained on from the older, lower ε."""
    school, trained_state, global_state = trained_once
    state = tmp_path / "state"
    shutil.copytree(trained_state, state)
    backup = {p.name: p.read_bytes() for p in [state / "ledger.jsonl", *state.glob("accountant-*.json")]}
    assert _train(school, state, global_state, 2).content["status"]["status"] == "ok"
    for name, data in backup.items():
        (state / name).write_bytes(data)
    out = _train(school, state, global_state, 3)
    assert out.content["status"]["status"] == "ledger-lost" and "older than its last signed entry" in \
        out.content["status"]["reason"] and not out.content.array_records
    assert len((state / "ledger.jsonl").read_text().splitlines()) == 1   # nothing signed on the old ledger


def test_the_node_start_check_refuses_a_ledger_older_than_the_folders_last_entry(trained_once, tmp_path):
    """The start check (start.sh -> preflight) caught a missing ledger but let an old backup through: the node
    started and every round it was asked was declined ledger-lost. Now it stops at start, in one line naming
    the ledger and `fedfer deploy restore-ledger`; the newest ledger put back starts again."""
    school, trained_state, global_state = trained_once
    state = tmp_path / "state"
    shutil.copytree(trained_state, state)
    node_config = {"data-dir": str(tmp_path), "state-dir": str(state), "school-id": "school-x"}
    backup = (state / "ledger.jsonl").read_bytes()
    assert _train(school, state, global_state, 2).content["status"]["status"] == "ok"
    newest = (state / "ledger.jsonl").read_bytes()
    check_school_folders(node_config, "node-config.toml")   # the current ledger starts
    (state / "ledger.jsonl").write_bytes(backup)
    with pytest.raises(NodeStartError) as refused:
        check_school_folders(node_config, "node-config.toml")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{state / 'ledger.jsonl'}: holds 1 entry"), message
    assert "fedfer deploy restore-ledger" in message and LEDGER_MARKER in message
    (state / "ledger.jsonl").write_bytes(newest)
    check_school_folders(node_config, "node-config.toml")
