"""What a crash leaves on disk, and that nothing already recorded is lost after it (simulations/crash_harness.py
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


def test_a_crash_while_the_signing_key_is_made_does_not_lock_the_school_out(tmp_path, monkeypatch):
    """The key file was created empty and filled afterwards: a crash in between left a 0-byte
    signing_key.pem, refused at every later start (the school could never sign, so never train again)."""
    from privacy import signing

    def crash(fd):
        raise OSError("killed")

    monkeypatch.setattr(signing.os, "fsync", crash)
    with pytest.raises(OSError):
        signing.load_or_create_signing_key(tmp_path)
    monkeypatch.undo()
    key = signing.load_or_create_signing_key(tmp_path)
    assert signing.load_public_key(tmp_path / signing.PUBLIC_KEY_FILE).public_bytes_raw() == key.public_key().public_bytes_raw()
    assert signing.load_or_create_signing_key(tmp_path).private_bytes_raw() == key.private_bytes_raw()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file left


def test_a_school_whose_public_key_was_not_written_gets_it_back(tmp_path):
    """A crash between the private and the public key file: the public half (what an audit of the school's
    own ledger with --trust-run-keys reads) is written again from the private key."""
    from privacy import signing

    key = signing.load_or_create_signing_key(tmp_path)
    (tmp_path / signing.PUBLIC_KEY_FILE).unlink()
    signing.load_or_create_signing_key(tmp_path)
    assert signing.load_public_key(tmp_path / signing.PUBLIC_KEY_FILE).public_bytes_raw() == key.public_key().public_bytes_raw()


def test_an_empty_key_file_left_by_an_older_fedfer_is_replaced_only_while_nothing_was_signed(tmp_path):
    from privacy import signing

    (tmp_path / signing.SIGNING_KEY_FILE).touch(mode=0o600)
    signing.load_or_create_signing_key(tmp_path)   # no ledger: nothing was ever signed with it
    assert (tmp_path / signing.SIGNING_KEY_FILE).stat().st_size > 0
    other = tmp_path / "other"
    other.mkdir()
    (other / signing.SIGNING_KEY_FILE).touch(mode=0o600)
    (other / "ledger.jsonl").write_text("{}\n")
    with pytest.raises(signing.SigningKeyError, match="empty"):
        signing.load_or_create_signing_key(other)


def test_resuming_a_run_killed_while_its_report_was_written_writes_the_report(tmp_path):
    """Killed after its last round, while report.md was drawn: the resume found the run finished and
    returned without a report, so the run never got one (`fedfer report` by hand was the only way)."""
    from types import SimpleNamespace

    from flwr.common.config import flatten_dict

    import server.app as server_app
    from shared_models.config import load_config, nest
    from shared_models.models import registry

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "federation.rounds=1", "model.pretrain="])
    run = RunDirectory.create(cfg)
    run.save_checkpoint(1, registry.build_from_config(cfg).state_dict(), registry.model_info(cfg), cfg,
                        {"exhausted": [], "momentum": None})
    run.append_metrics({"round": 1, "aggregated": True, "train": {}, "evaluation": {}, "timing": {"round_seconds": 1.0}})
    (run.path / "plots").mkdir()   # the crash: plots begun, no report.md
    context = SimpleNamespace(run_config=flatten_dict(nest({**cfg, "run.resume": str(run.path)})))
    server_app.main(None, context)
    assert (run.path / "report.md").is_file()


def test_a_process_started_with_stop_with_parent_ends_when_its_starter_is_killed(tmp_path):
    """`fedfer simulate` SIGKILLed alone left its SuperLink (own session) running the federation to the end
    and then idling forever, with a SuperExec; a resume started meanwhile raced it on the same run."""
    import signal
    import subprocess
    import sys
    import time

    starter = ("import subprocess, sys, time\n"
               "from server.processes import stop_with_parent\n"
               "child = subprocess.Popen(['sleep', '60'], start_new_session=True, preexec_fn=stop_with_parent)\n"
               "print(child.pid, flush=True)\n"
               "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{child}") and \
            open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)
    alive = os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive


def test_the_crash_harness_tells_a_lagging_run_copy_from_a_damaged_ledger(tmp_path):
    """simulations/crash_harness.py: right after a crash the audit may only find the run's ledger copy behind a
    school's own ledger; a torn line is reported as torn, a bad complete line as a problem."""
    from simulations.crash_harness import lagging_copy, read_lines, tear

    note = ("school school-00: run 'crash': schools/school-00/ledger.jsonl holds 1 entry after the last one "
            "ledger/school-00.jsonl holds: replies the server never stored (a crash or a lost reply); …")
    assert lagging_copy(["school  unit …", note]) and not lagging_copy(["school  unit …"])
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, "train": {}}\n')
    tear(path)
    records, problems = read_lines(path)
    assert [r["round"] for r in records] == [1] and problems == ["torn last line (no newline, 12 bytes)"]


def _finished_run(tmp_path, rounds: int = 1):
    from shared_models.config import load_config
    from shared_models.models import registry

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", f"federation.rounds={rounds}", "model.pretrain="])
    run = RunDirectory.create(cfg)
    run.save_checkpoint(1, registry.build_from_config(cfg).state_dict(), registry.model_info(cfg), cfg,
                        {"exhausted": [], "momentum": None})
    run.append_metrics({"round": 1, "aggregated": True, "train": {}, "evaluation": {}, "timing": {"round_seconds": 1.0}})
    return cfg, run


def test_a_run_still_being_run_is_not_resumed_beside_it(tmp_path, capsys):
    """A resume started while the run's own ServerApp still runs (a `fedfer simulate` killed alone left its
    Flower processes finishing the run, or a second resume) would train and write the same run twice: the
    ServerApp holds <run>/run.lock while it runs, and a resume of a held run is refused in one line."""
    import argparse
    from types import SimpleNamespace

    from flwr.common.config import flatten_dict

    import server.app as server_app
    from fedfer.commands.simulate import _config
    from shared_models.config import nest

    cfg, run = _finished_run(tmp_path, rounds=2)
    context = SimpleNamespace(run_config=flatten_dict(nest({**cfg, "run.resume": str(run.path)})))
    with run.hold():
        with pytest.raises(ValueError, match="is being run by another process"):
            server_app.main(None, context)
        args = argparse.Namespace(overrides=[f"run.resume={run.path}"], config=None, references=False)
        assert _config(args) is None
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is being run by another process" in err[0]
    events = (run.path / "events.jsonl")
    assert not events.exists()   # nothing written into the held run


def test_holding_a_run_sweeps_the_temp_files_a_killed_checkpoint_write_left(tmp_path):
    _, run = _finished_run(tmp_path, rounds=2)
    folder = run.path / "checkpoints"
    stale = [folder / ".round-0002.pt.abc123.tmp", folder / ".latest.json.def456.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    report_tmp = run.path / ".report.md.77.tmp"   # not the ServerApp's: `fedfer report` may be writing it
    report_tmp.write_text("…")
    with run.hold():
        assert not any(path.exists() for path in stale)
    assert report_tmp.exists()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))   # the checkpoints stay
