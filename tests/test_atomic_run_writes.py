"""Every file a run directory keeps is replaced all at once (shared_models/atomic_files.py): a coordinator killed,
or a disk filling up, in the middle of a write leaves the old file or the new one — never a torn one that a
resume or the report then stumbles on, and no temp file beside it. These writes did not go through it: the
run's pinned school keys (`keys/<school>.pub`, server/strategy.py), `config.yaml` (shared_models/config.py
dump_yaml: written only while missing, so a torn one stayed) and `report.md` (a temp file without fsync, left
behind when its write failed).

A write cut short is made real with a file-size limit (RLIMIT_FSIZE): the write that crosses it is cut there
and fails (EFBIG), as on a full disk."""

from __future__ import annotations

import contextlib
import resource
import signal
from pathlib import Path

import pytest
import yaml

from shared_models.config import load_config


@contextlib.contextmanager
def writes_cut_after(limit: int):
    """Any file write of this process past `limit` bytes fails, the bytes before it written."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # else the kernel ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _cfg(tmp_path: Path) -> dict:
    return load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "privacy.enabled=false"])


@pytest.mark.usefixtures("serverapp_identity")
def test_a_pinned_school_key_cut_short_leaves_the_key_it_replaces(tmp_path):
    from privacy.signing import load_or_create_signing_key, load_public_key, public_key_pem
    from server.run_dir import RunDirectory
    from server.strategy import NodeInfo, SchoolFedAvg

    cfg = _cfg(tmp_path)
    run = RunDirectory.create(cfg)
    key = load_or_create_signing_key(tmp_path / "school-a")
    strategy = SchoolFedAvg(cfg, run)
    node = NodeInfo("school", "school-a", public_key_pem(key))
    assert strategy._pin_key(node) == ""   # first contact: the run pins the key
    with writes_cut_after(40), pytest.raises(OSError):
        strategy._pin_key(node)              # a resumed run pins it again, and the disk is full
    assert load_public_key(run.key_path("school-a")).public_bytes_raw() == key.public_key().public_bytes_raw()
    assert not [p.name for p in run.key_path("school-a").parent.iterdir() if p.name.startswith(".")]


def test_a_config_yaml_cut_short_is_written_again_whole(tmp_path):
    from server.run_dir import RunDirectory

    cfg = _cfg(tmp_path)
    with writes_cut_after(30), pytest.raises(OSError):
        RunDirectory.create(cfg)
    run = RunDirectory.create(cfg)   # the command run again
    written = yaml.safe_load(run.config_path.read_text(encoding="utf-8"))
    assert written["run"]["name"] == "t" and written["federation"]["rounds"] == cfg["federation.rounds"]


def test_a_report_cut_short_leaves_the_old_report_and_no_temp_file(tmp_path, monkeypatch):
    from server import report
    from test_report import write_run

    run = write_run(tmp_path / "run", [1, 2])
    monkeypatch.setattr(report, "write_plots", lambda data: {})   # the report text alone
    before = report.build_report(run).read_text(encoding="utf-8")
    with writes_cut_after(100), pytest.raises(ValueError, match="cannot write the report"):
        report.build_report(run)
    assert (run / "report.md").read_text(encoding="utf-8") == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
