"""Helpers for the school-side privacy tests: a tiny school folder, a train message, a node context."""

from __future__ import annotations

import csv
import zlib
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from PIL import Image

POLICY = {"unit": "student", "delta": 1e-5, "budget": 8.0, "max-round-epsilon": 8.0, "declared-students": 8}


def write_school(root: Path, students: list[str], frames: int = 3, seed: int = 0) -> Path:
    """A school folder: ``frames`` random 32x32 faces per student, each student's frames its own."""
    (root / "images").mkdir(parents=True)
    rows = []
    for student in students:
        rng = np.random.default_rng(zlib.crc32(f"{seed}/{student}".encode()))
        for f in range(frames):
            name = f"images/{student}-{f}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name)
            rows.append({"path": name, "label": ["happy", "sad", "angry"][f % 3], "student_id": student})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "student_id"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def train_message(state_dict, run_dir: Path, server_round: int = 1, run_id: str = "run-test") -> Message:
    config = ConfigRecord({"server-round": server_round, "run-id": run_id, "run-dir": str(run_dir)})
    metadata = Metadata(run_id=1, message_id=f"m{server_round}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id=str(server_round), created_at=time.time(), ttl=3600, message_type="train")
    return make_message(metadata, RecordDict({"arrays": ArrayRecord(state_dict), "config": config}))


def school_context(school_dir: Path, state_dir: Path, run_config, **policy) -> Context:
    node_config = {"role": "school", "school-id": "school-x", "data-dir": str(school_dir), "state-dir": str(state_dir),
                   **POLICY, **policy}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


# -- a school whose student ids and file names are easy to spot in a reply (privacy boundary tests)
SECRET_STUDENTS = [f"pupil-SECRET-{i:03d}" for i in range(5)]


def _write_school(root, rng, corrupt: bool = False):
    (root / "images").mkdir(parents=True)
    rows = []
    for s, student in enumerate(SECRET_STUDENTS):
        for f in range(4):
            name = f"images/{student}-frame{f}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name)
            rows.append({"path": name, "label": ["happy", "sad", "angry", "neutral"][f], "student_id": student})
    if corrupt:
        (root / "images" / "broken.png").write_bytes(b"not a png")
        rows.append({"path": "images/broken.png", "label": "happy", "student_id": SECRET_STUDENTS[0]})
        rows.append({"path": rows[0]["path"], "label": "smirk", "student_id": SECRET_STUDENTS[0]})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "student_id"])
        writer.writeheader()
        writer.writerows(rows)
    np.save(root / "landmarks.npy", rng.normal(size=(len(rows), 68, 2)).astype(np.float32))


def _train_message(model, run_dir) -> Message:
    config = ConfigRecord({"server-round": 1, "run-id": "run-test", "run-dir": str(run_dir)})
    # A message as the ClientApp receives it: with the metadata Flower fills in on delivery.
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600, message_type="train")
    return make_message(metadata, RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}))


def _context(tmp_path, school_dir, run_config) -> Context:
    node_config = {"role": "school", "school-id": "school-x", "data-dir": str(school_dir),
                   "state-dir": str(tmp_path / "state"), "unit": "student", "delta": 1e-5, "budget": 8.0,
                   "max-round-epsilon": 8.0, "declared-students": 10}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def small_school_train(tmp_path: Path, encode) -> tuple:
    """A small school on disk and the real train handler's reply to one round's message whose content
    went through `encode` (the wire form under test). Returns (the model sent, the reply's content)."""
    from client import app as client_app
    from shared_models.config import load_config
    from shared_models.models import registry

    school = tmp_path / "school"
    _write_school(school, np.random.default_rng(0))
    cfg = load_config(None, ["train.batch_size=2", "train.local_epochs=1", "federation.rounds=2",
                             "train.frames_per_student=2"])
    model = registry.build(str(cfg["model.name"]), 7, str(cfg["model.preset"]))
    request = _train_message(model, tmp_path / "run")
    request.__dict__["_content"] = encode(request.content)
    return model, client_app.train(request, _context(tmp_path, school, cfg)).content
