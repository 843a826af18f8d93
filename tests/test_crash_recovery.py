"""What a crash leaves on disk, and that nothing already recorded is lost after it (simulations/crash_test.py
finds these states by killing real federations; each test here builds one directly)."""

from __future__ import annotations

import json
import os

import pytest

from server.run_dir import RunDirectory, read_jsonl
from shared_models import atomic_files


def test_a_line_appended_after_a_torn_last_line_is_kept(tmp_path):
    """A crash mid-write leaves metrics.jsonl ending in half a line; the resumed run's next line must not be
    glued onto it (it was: the round's line became one unparseable line with the fragment and was lost)."""
    run = RunDirectory(tmp_path)
    run.append_metrics({"round": 1, "train": {}})
    whole = json.dumps({"round": 2, "train": {"school-00": {"status": "ok"}}}, sort_keys=True)
    with open(run.metrics_path, "a", encoding="utf-8") as f:
        f.write(whole[: len(whole) // 2])   # the crash
    run.append_metrics({"round": 2, "train": {}})
    run.append_metrics({"round": 3, "train": {}})
    assert [m["round"] for m in run.metrics()] == [1, 2, 3]
    run.event("resumed", round=1)
    assert [e["event"] for e in read_jsonl(run.events_path)] == ["resumed"]


def test_append_line_writes_everything_when_the_kernel_takes_part(tmp_path, monkeypatch):
    """os.write may write fewer bytes than asked (a signal, a full disk's last blocks): the rest is written."""
    real_write = os.write

    def short_write(fd, data):
        return real_write(fd, data[:7])

    monkeypatch.setattr(atomic_files.os, "write", short_write)
    path = tmp_path / "metrics.jsonl"
    atomic_files.append_line(path, json.dumps({"round": 1, "long": "x" * 100}))
    monkeypatch.undo()
    assert json.loads(path.read_text().splitlines()[0])["round"] == 1
