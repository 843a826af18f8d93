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


# ---------------------------------------------------------------- durability of the writes that skipped it
@pytest.fixture()
def fsynced(monkeypatch):
    """The descriptors os.fsync is called on, as the paths they name ('/proc/self/fd' resolved)."""
    import os

    synced: list[str] = []
    real = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", recording)
    return synced


def test_two_writers_of_a_plot_do_not_share_a_temp_file_and_the_plot_is_fsynced(tmp_path, fsynced):
    """save_figure wrote every plot through `<name>.tmp.png`, a fixed name: a second writer of the same plot
    (the report rebuilt while a run writes it) could rename the other's half-written file, or fail on it; and
    nothing was fsynced. Now the project's atomic write: its own temp file, fsync, rename, fsync of the folder."""
    from shared_models.plotting import pyplot, save_figure

    plt = pyplot()
    fig = plt.figure(figsize=(1, 1))
    path = tmp_path / "plots" / "accuracy.png"
    path.parent.mkdir()
    (path.parent / "accuracy.png.tmp.png").mkdir()   # the fixed temp name, taken (by another writer's file)
    save_figure(fig, path)
    plt.close(fig)
    assert path.read_bytes().startswith(b"\x89PNG")
    assert str(path.parent) in fsynced and any(p.startswith(str(path.parent / ".accuracy.png.")) for p in fsynced)


def test_the_epsilon_store_is_fsynced_before_it_replaces_the_old_one(tmp_path, fsynced):
    """The ε-store (privacy/accounting.py) renamed a temp file it never fsynced: after a power cut the rename
    could survive without the data (an empty store; a cache, so it cost a composition, but it was the one write
    of the state directory that skipped the project's atomic write)."""
    from privacy.accounting import EPSILON_STORE_FILE, epsilon_of, epsilon_store

    with epsilon_store(tmp_path):
        epsilon_of([(1.1, 0.25, 12)], 1e-5, "rdp")
    assert (tmp_path / EPSILON_STORE_FILE).is_file()
    assert str(tmp_path) in fsynced and any(p.startswith(str(tmp_path / f".{EPSILON_STORE_FILE}.")) for p in fsynced)


def test_a_private_key_write_is_durable_and_never_readable_by_others(tmp_path, fsynced):
    """write_private (server/deploy/credentials.py) fsynced the file but not the folder after the rename: a
    crash could lose the new key's directory entry. Now the project's atomic write, 0600 from the start."""
    import stat

    from server.deploy.credentials import write_private

    path = tmp_path / "deploy" / "ca.key"
    path.parent.mkdir()
    path.write_bytes(b"old")
    path.chmod(0o644)   # a file that was looser: the new one is 0600 all the same
    write_private(path, b"secret")
    assert path.read_bytes() == b"secret" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path.parent) in fsynced


def test_a_runs_pinned_school_key_is_written_0644_by_the_ledger_copy_and_the_server_alike(tmp_path):
    """keys/<school>.pub was written 0600 by privacy/ledger.py (ServerLedgerCopy) and 0644 by server/strategy.py.
    A public key is no secret, and an officer auditing a run with --trust-run-keys may be another account:
    0644, by one writer (privacy/signing.py write_public_key), like the keyring's keys."""
    import stat

    from privacy.ledger import ServerLedgerCopy
    from privacy.signing import load_or_create_signing_key

    key = load_or_create_signing_key(tmp_path / "school-a")
    path = ServerLedgerCopy.store_public_key(tmp_path / "run", "school-a", key.public_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
