"""Privacy by construction: what a school's ClientApp sends back contains no face, landmark, label
list, student id, count or file path — only model weights, public metrics and its signed ledger entry.

The train handler runs in-process on a tiny school the test writes, with student ids and file names
chosen so that any leak is easy to spot in the reply.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client import app as client_app
from shared_models.models import registry
from shared_models.config import load_config

from school_fixtures import SECRET_STUDENTS, _context, _train_message, _write_school


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


@pytest.fixture()
def reply(tmp_path):
    rng = np.random.default_rng(0)
    school = tmp_path / "school"
    _write_school(school, rng, corrupt=True)
    cfg = load_config(None, ["train.batch_size=2", "train.local_epochs=1", "federation.rounds=2",
                             "train.frames_per_student=2"])
    from shared_models.datasets.school_folder import load_school

    assert len(load_school(school)) == 20  # the corrupt and unknown-label rows are skipped at the school
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    out = client_app.train(_train_message(model, tmp_path / "run"), _context(tmp_path, school, cfg))
    return model, out


def test_reply_carries_only_weights_public_metrics_and_ledger(reply):
    model, out = reply
    content = out.content
    assert set(content.array_records) == {"arrays"}
    sent = content["arrays"].to_torch_state_dict()
    expected = model.state_dict()
    assert set(sent) == set(expected)
    assert all(sent[k].shape == expected[k].shape for k in expected)  # weights only, nothing image-shaped
    for value in content["metrics"].values():
        assert isinstance(value, (int, float)), value  # scalars: no per-student or per-frame lists
    assert set(content.config_records) == {"status", "ledger"}
    entry = json.loads(content["ledger"]["entry"])
    text = " ".join(_strings({k: dict(v) for k, v in content.config_records.items()}) ) + json.dumps(entry)
    for student in SECRET_STUDENTS:
        assert student not in text
    assert "SECRET" not in text and ".png" not in text and "landmark" not in text
    # public values only: no count of frames or students, no loss, no duration
    assert set(content["metrics"]) == {"epsilon", "epsilon-rdp", "noise-multiplier", "sample-rate", "steps", "unit-weight",
                                       "declared-units"}
    assert content["metrics"]["sample-rate"] == pytest.approx(2 / 10)  # batch / declared size, not / 5 students
    assert content["metrics"]["steps"] == 5 and content["metrics"]["unit-weight"] == 1


def test_ledger_entry_has_only_the_accounting_fields(reply):
    _, out = reply
    entry = json.loads(out.content["ledger"]["entry"])
    allowed = {"schema", "event", "school_id", "dataset_fingerprint", "run_id", "round", "privacy_unit",
               "sample_rate", "noise_multiplier", "max_grad_norm", "steps", "delta", "accountant", "epsilon",
               "epsilon_rdp", "budget", "timestamp", "prev_hash", "hash", "signature", "history_before",
               "run_seq", "key_id"}
    assert set(entry) <= allowed, set(entry) - allowed
    assert entry["privacy_unit"] == "student" and entry["school_id"] == "school-x"


def test_the_school_keeps_its_own_model_the_weights_it_sent_and_nothing_else(reply, tmp_path):
    """train.keep_own_model: <state dir>/own-model.pt holds exactly the weights of the reply (the DP release,
    so no further privacy cost), as a checkpoint `fedfer evaluate` reads without running code."""
    from client.school_round import OWN_MODEL
    from server.run_dir import load_checkpoint_file, model_from_checkpoint

    _, out = reply
    path = tmp_path / "state" / OWN_MODEL
    kept = load_checkpoint_file(path)
    sent = out.content["arrays"].to_torch_state_dict()
    assert set(kept["state_dict"]) == set(sent)
    assert all(torch.equal(kept["state_dict"][k], sent[k]) for k in sent)
    assert kept["round"] == 1 and kept["school"] == "school-x"
    assert kept["epsilon"] == pytest.approx(out.content["metrics"]["epsilon"])
    assert kept["config"]["train.batch_size"] == 2   # the run-config: `fedfer evaluate` finds synthetic data by it
    model_from_checkpoint(kept, path)   # the registry rebuilds it


def _one_round(tmp_path, *overrides: str):  # noqa: ANN202
    """A small school's first round with the default config plus `overrides`; the config and the reply."""
    school = tmp_path / "school"
    _write_school(school, np.random.default_rng(0))
    cfg = load_config(None, ["train.batch_size=2", "federation.rounds=2", *overrides])
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    return cfg, client_app.train(_train_message(model, tmp_path / "run"), _context(tmp_path, school, cfg))


def test_the_own_model_is_not_kept_when_switched_off(tmp_path):
    from client.school_round import OWN_MODEL

    _, out = _one_round(tmp_path, "train.keep_own_model=false")
    assert out.content["status"]["status"] == "ok"
    assert not (tmp_path / "state" / OWN_MODEL).exists()


def test_the_school_trains_at_the_step_size_its_rounds_sigma_calls_for(tmp_path, monkeypatch):
    """A noisier round (σ above train.lr_noise_reference) trains with a smaller lr; σ is public, the lr follows it."""
    import shared_models.training as training

    built: list[float] = []
    real = training.make_optimizer

    def recording(model, cfg, noise_multiplier=None):  # noqa: ANN001, ANN202
        optimizer = real(model, cfg, noise_multiplier)
        built.append(optimizer.param_groups[0]["lr"])
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", recording)
    cfg, out = _one_round(tmp_path, "privacy.noise_multiplier=5.0")
    assert out.content["status"]["status"] == "ok"
    assert built == [pytest.approx(training.step_size(cfg, 5.0))] and built[0] < float(cfg["train.lr"])


def test_school_without_usable_images_declines(tmp_path):
    school = tmp_path / "empty"
    school.mkdir()
    (school / "labels.csv").write_text("path,label,student_id\nimages/missing.png,happy,a\n")
    cfg = load_config(None, ["federation.rounds=2"])
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    out = client_app.train(_train_message(model, tmp_path / "run"), _context(tmp_path, school, cfg))
    status = out.content["status"]
    assert status["status"] == "no-data"
    # says what failed, never a path or a count (those go to the school's own log)
    assert "no usable images" in status["reason"]
    assert str(tmp_path) not in status["reason"] and "labels.csv" not in status["reason"] and "line" not in status["reason"]
    assert not out.content.array_records


def test_a_round_that_fails_sends_a_fixed_reason_not_the_exception(tmp_path, monkeypatch):
    """Flower sends an exception that leaves the ClientApp to the coordinator as its text, and such a text
    can carry private values (an allocation error names the bytes of the realised batch; a data error a
    path and a student). A failed round replies `failed` with a fixed reason; the details stay at the school."""
    from client import school_round

    secret = f"tried to allocate 123456 bytes for images/{SECRET_STUDENTS[0]}-frame0.png"

    def failing_train(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError(secret)

    monkeypatch.setattr(school_round, "_train", failing_train)
    school = tmp_path / "school"
    _write_school(school, np.random.default_rng(0))
    cfg = load_config(None, ["train.batch_size=2", "federation.rounds=2", "train.frames_per_student=2"])
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    out = client_app.train(_train_message(model, tmp_path / "run"), _context(tmp_path, school, cfg))
    status = out.content["status"]
    assert status["status"] == "failed" and status["school"] == "school-x"
    assert not any(part in s for s in _strings(dict(status)) for part in ("123456", SECRET_STUDENTS[0], "frame0"))
    assert not out.content.array_records and not out.content.metric_records


def test_augmentation_draws_are_secret_not_a_function_of_the_run_config(tmp_path, monkeypatch):
    """Augmentation (and anything else drawing from torch's global generator) takes its draws from one stream
    in the order frames are used, so a student's presence shifts the draws of every frame after theirs. With
    a generator seeded from run.seed, school and round — all known to the coordinator — those shifts would be
    a known function of who is in the data, and one student would move other students' clipped gradients.
    Seeded from OS entropy, each frame's draw is fresh whatever came before it (as the DP sampling and noise)."""
    import privacy.engine as engine

    draws: list[torch.Tensor] = []
    real = engine.train_private

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        draws.append(torch.rand(4))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_private", recording)
    for school in ("a", "b"):   # the same run-config, school data and round, twice
        _one_round(tmp_path / school, "train.augment=true")
    assert len(draws) == 2 and not torch.equal(draws[0], draws[1])


def test_a_temp_file_a_killed_own_model_write_left_is_removed_by_the_next_write(tmp_path):
    from client.school_round import OWN_MODEL

    (tmp_path / "state").mkdir()
    stale = tmp_path / "state" / f".{OWN_MODEL}.k1ll3d.tmp"
    stale.write_bytes(b"half a model")
    _, out = _one_round(tmp_path)
    assert out.content["status"]["status"] == "ok"
    assert (tmp_path / "state" / OWN_MODEL).is_file() and not stale.exists()
