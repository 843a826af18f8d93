"""The definition of done for what a school sends (issue 12, docs/privacy.md "What a reply carries").

Two school folders that differ by exactly one student — all of that student's frames — each run one
round, with the same randomness for everything public: same seed, same global model, same signing key,
same dataset id, same clock. Every field of the two replies and of their ledger entries must then be
identical, or be the DP-noised weights (the only output of the DP mechanism). A count, a realised batch
size, an un-noised loss, a duration or a hash of the data in any field makes this fail.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import pytest
import torch
from school_fixtures import school_context, train_message, write_school

from client import app as client_app
from client import school_round
from privacy.accounting import DATASET_ID_FILE, school_dataset_id
from privacy.signing import SIGNING_KEY_FILE, load_or_create_signing_key
from shared_models.models import registry
from shared_models.config import load_config

STUDENTS = [f"s{i}" for i in range(7)]
DP_OUTPUT = "arrays"   # the one record whose values may differ: the weights after DP-SGD's noise


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("neighbours")
    cfg = load_config(None, ["train.batch_size=2", "federation.rounds=2", "train.frames_per_student=2"])
    torch.manual_seed(0)
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    # everything public is shared: the school's key and dataset id (random, made once per state dir)
    load_or_create_signing_key(tmp / "state-with")
    school_dataset_id(tmp / "state-with")
    (tmp / "state-without").mkdir()
    for name in (SIGNING_KEY_FILE, DATASET_ID_FILE):
        shutil.copy2(tmp / "state-with" / name, tmp / "state-without" / name)
    fixed = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    replies = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(school_round, "_now", lambda: fixed)
        for label, students in (("with", STUDENTS), ("without", STUDENTS[:-1])):
            school = write_school(tmp / f"school-{label}", students)
            context = school_context(school, tmp / f"state-{label}", cfg)
            replies[label] = client_app.train(train_message(global_state, tmp / "run"), context)
    return tmp, replies


def _records(message):
    content = message.content
    return ({k: dict(v) for k, v in content.config_records.items()},
            {k: dict(v) for k, v in content.metric_records.items()},
            {k: v for k, v in content.array_records.items()})


def test_neighbouring_schools_send_identical_replies_but_for_the_dp_weights(neighbours):
    tmp, replies = neighbours
    with_one, without = replies["with"], replies["without"]
    assert with_one.content["status"]["status"] == "ok" and without.content["status"]["status"] == "ok"
    configs_a, metrics_a, arrays_a = _records(with_one)
    configs_b, metrics_b, arrays_b = _records(without)

    # public values: status, school id, ε, σ, q, steps, FedAvg weight, the signed ledger entries
    assert set(configs_a) == set(configs_b) == {"status", "ledger"}
    assert configs_a == configs_b
    assert metrics_a == metrics_b
    assert set(metrics_a["metrics"]) == {"epsilon", "epsilon-rdp", "noise-multiplier", "sample-rate", "steps", "unit-weight",
                                      "declared-units"}
    entry_a, entry_b = json.loads(configs_a["ledger"]["entry"]), json.loads(configs_b["ledger"]["entry"])
    assert entry_a == entry_b   # every field, the hash and the (deterministic Ed25519) signature included
    assert entry_a["sample_rate"] == pytest.approx(2 / 8)   # batch / declared size, for both

    # DP output: same names, shapes and dtypes; the values are DP-SGD's noised release
    assert set(arrays_a) == set(arrays_b) == {DP_OUTPUT}
    state_a, state_b = arrays_a[DP_OUTPUT].to_torch_state_dict(), arrays_b[DP_OUTPUT].to_torch_state_dict()
    assert {k: (v.shape, v.dtype) for k, v in state_a.items()} == {k: (v.shape, v.dtype) for k, v in state_b.items()}


def test_neighbouring_schools_keep_identical_ledgers_and_accountants(neighbours):
    tmp, _ = neighbours
    for name in ("ledger.jsonl", f"accountant-{school_dataset_id(tmp / 'state-with')[:16]}.json"):
        assert (tmp / "state-with" / name).read_bytes() == (tmp / "state-without" / name).read_bytes(), name
