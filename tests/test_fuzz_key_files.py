"""Hostile or damaged files where fedfer reads keys, anchors and policies (the ledger-key rotation's new
surfaces): a retired-key folder, the keyring, a run's keys, a school's state directory, the server's anchors.
Each must end in one line naming the file (the audit: a finding and exit 2), never hang on a named pipe, read
a symlink to /dev/zero, crash on an unknown key type, or be taken for "no file" and overwritten.

Found by the session-22 fuzzing; each case here failed before its fix: a pipe hung the audit, an unknown key type was an
internal error, a deep anchor or events line a RecursionError, a keyring key that was a pipe was replaced
without being retired, a ledger that was a broken link was started afresh.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from fedfer.cli import main as fedfer_main
from shared_models.small_files import SmallFileError, read_small_file
from test_ledger_key_rotation import _rotated_federation, _rotated_keyring, enrolled_school

pytestmark = pytest.mark.timeout(120)   # a case that blocks on a named pipe fails instead of hanging the suite

# a well-formed PEM of a key type `cryptography` does not know (OID 1.2.3.4): UnsupportedAlgorithm, not ValueError
UNKNOWN_KEY_TYPE_PEM = (b"-----BEGIN PUBLIC KEY-----\n"
                        + base64.encodebytes(bytes.fromhex("302a300506032a0304032100") + bytes(32))
                        + b"-----END PUBLIC KEY-----\n")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """school-a trained run-1 under its first key, rotated, trained run-2; the keyring and the school's state
    keep the retired key (`keys/school-a.retired/`, `signing_key.retired/`), as the commands do."""
    from privacy.signing import retire_public_key

    root = tmp_path_factory.mktemp("rotated")
    school, _first, _second, old = _rotated_federation(root)
    _rotated_keyring(root, school, old)
    retire_public_key(school.state / "signing_key.pub", old)
    return root


@pytest.fixture
def world(template, tmp_path) -> Path:
    shutil.copytree(template, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def _replace(path: Path, make) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    make(path)


BAD_FILES = {
    "pipe": os.mkfifo,
    "directory": Path.mkdir,
    "unknown-key-type": lambda p: p.write_bytes(UNKNOWN_KEY_TYPE_PEM),
    "oversized": lambda p: p.write_bytes(b"A" * (1 << 20)),
    "dev-zero": lambda p: os.symlink("/dev/zero", p),
}
KEYRING = ["runs/run-2", "--keys", "deploy/keys"]
RUN_KEYS = ["runs/run-2", "--trust-run-keys"]
STATE_DIR = ["schools/school-a", "--trust-run-keys", "--anchors", "runs/anchors"]
# (file, how the audit is asked to read it)
KEY_FILES = {
    "keyring-retired": ("deploy/keys/school-a.retired/planted.pub", KEYRING),
    "keyring-current": ("deploy/keys/school-a.pub", KEYRING),
    "run-retired": ("runs/run-2/keys/school-a.retired/planted.pub", RUN_KEYS),
    "state-retired": ("schools/school-a/signing_key.retired/planted.pub", STATE_DIR),
    "anchor": ("runs/anchors/school-a.json", STATE_DIR),
    "keyring-policy": ("deploy/keys/school-a.policy.json", KEYRING),
    "state-policy": ("schools/school-a/policy.json", STATE_DIR),
}


def _audit(capsys, world: Path, args: list[str]) -> tuple[int, str]:
    cwd = os.getcwd()
    os.chdir(world)   # relative paths: the messages name the files as the officer typed them
    try:
        code = fedfer_main(["privacy", "audit", *args])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("bad", sorted(BAD_FILES))
@pytest.mark.parametrize("where", sorted(KEY_FILES))
def test_audit_names_a_bad_key_anchor_or_policy_file_and_exits_2(world, capsys, where, bad):
    rel, args = KEY_FILES[where]
    if bad == "unknown-key-type" and where in ("anchor", "keyring-policy", "state-policy"):
        pytest.skip("a key type means nothing in a JSON file")   # "not JSON" is covered by the anchor tests
    _replace(world / rel, BAD_FILES[bad])
    code, out = _audit(capsys, world, args)
    assert code == 2 and "internal error" not in out and "Traceback" not in out, out
    assert any(rel in line for line in out.splitlines()), out   # the finding names the file


@pytest.mark.parametrize("text", ["[" * 100_000, "{not json"])
def test_a_deeply_nested_or_broken_anchor_is_a_finding(world, capsys, text):
    (world / "runs/anchors/school-a.json").write_text(text)
    code, out = _audit(capsys, world, STATE_DIR)
    assert code == 2 and "internal error" not in out and "runs/anchors/school-a.json" in out, out


@pytest.mark.parametrize("data", [bytes(range(256)), b"[" * 100_000 + b"\n", b'{"round": ' + b"9" * 5000 + b"}\n"])
def test_a_damaged_events_log_does_not_stop_the_audit(world, capsys, data):
    """events.jsonl is the coordinator's log the audit reads for anchor rejections: lines that do not parse
    are skipped (they were an internal error: UnicodeDecodeError, RecursionError)."""
    (world / "runs/run-2/events.jsonl").write_bytes(data)
    code, out = _audit(capsys, world, RUN_KEYS)
    assert code == 0 and "internal error" not in out, out


def test_read_small_file_refuses_devices_pipes_and_oversize_without_reading_them(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "big").write_bytes(b"x" * 101)
    (tmp_path / "ok").write_bytes(b"x" * 100)
    for name, why in (("zero", "a device or socket, not a regular file"), ("pipe", "a named pipe, not a regular file"),
                      ("big", "larger than 100 bytes"), ("missing", "missing")):
        with pytest.raises(SmallFileError) as exc:
            read_small_file(tmp_path / name, 100)
        assert exc.value.why == why and str(exc.value) == f"{tmp_path / name}: {why}"
    assert read_small_file(tmp_path / "ok", 100) == b"x" * 100


# ----------------------------------------------------------------------------------- the school's rotation
def _school_key(capsys, state: Path) -> tuple[int, str]:
    code = fedfer_main(["deploy", "school-key", "--state-dir", str(state), "--new-ledger-key"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _snapshot(folder: Path) -> dict[str, object]:
    return {p.relative_to(folder).as_posix(): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file()
                                               else "other") for p in sorted(folder.rglob("*"))}


def test_school_key_rotation_refuses_a_ledger_that_is_a_broken_link_and_keeps_it(world, capsys):
    """A ledger.jsonl symlinked to a volume that is not mounted was taken for "no ledger": the rotation signed
    a new chain from genesis over the link."""
    state = world / "schools/school-a"
    _replace(state / "ledger.jsonl", lambda p: os.symlink(world / "unmounted/ledger.jsonl", p))
    before = _snapshot(state)
    code, out = _school_key(capsys, state)
    assert code == 2 and "ledger.jsonl" in out and len(out.strip().splitlines()) == 1, out
    assert _snapshot(state) == before


@pytest.mark.parametrize("bad", ["pipe", "directory"])
def test_school_key_rotation_says_the_signing_key_is_not_a_file(world, capsys, bad):
    state = world / "schools/school-a"
    _replace(state / "signing_key.pem", BAD_FILES[bad])
    code, out = _school_key(capsys, state)
    assert code == 2 and "signing_key.pem: not a regular file" in out and len(out.strip().splitlines()) == 1, out


def test_school_ledger_refuses_a_ledger_that_is_a_looping_link(world):
    from privacy.ledger import LedgerError, SchoolLedger
    from privacy.signing import load_or_create_signing_key

    state = world / "schools/school-a"
    _replace(state / "ledger.jsonl", lambda p: os.symlink("ledger.jsonl", p))
    with pytest.raises(LedgerError, match="ledger.jsonl: cannot read"):
        SchoolLedger(state, "school-a", load_or_create_signing_key(state))
    assert os.readlink(state / "ledger.jsonl") == "ledger.jsonl"


# ----------------------------------------------------------------------------------- the coordinator's rotation
@pytest.fixture
def deployment(tmp_path, capsys) -> tuple[list[str], Path, Path]:
    """A deployment with school `lincoln` whose own state made its keys, then a new ledger key: (the rotate
    command, the keyring, the new key)."""
    dep, state = enrolled_school(tmp_path)
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(state), "--new-ledger-key"]) == 0
    capsys.readouterr()
    rotate = ["deploy", "rotate", "lincoln", "--ledger-key", str(state / "signing_key.pub"), "--dir", str(dep.root),
              "--flwr-home", str(tmp_path / "home")]
    return rotate, dep.keyring, state / "signing_key.pub"


@pytest.mark.parametrize("bad", ["pipe", "unknown-key-type"])
def test_rotate_refuses_a_keyring_key_it_cannot_read_instead_of_replacing_it_unretired(deployment, capsys, bad):
    rotate, keyring, _new = deployment
    _replace(keyring / "lincoln.pub", BAD_FILES[bad])
    code = fedfer_main(rotate)
    err = capsys.readouterr().err
    assert code == 2 and "lincoln.pub" in err and len(err.strip().splitlines()) == 1 and "internal" not in err, err
    assert not (keyring / "lincoln.retired").exists()
    assert (keyring / "lincoln.pub").is_fifo() if bad == "pipe" else (keyring / "lincoln.pub").read_bytes() == UNKNOWN_KEY_TYPE_PEM


def test_rotate_says_the_retired_folder_is_not_a_folder(deployment, capsys):
    rotate, keyring, _new = deployment
    old = (keyring / "lincoln.pub").read_bytes()
    (keyring / "lincoln.retired").write_text("x")
    code = fedfer_main(rotate)
    err = capsys.readouterr().err
    assert code == 2 and "lincoln.retired: not a directory" in err and len(err.strip().splitlines()) == 1, err
    assert (keyring / "lincoln.pub").read_bytes() == old


# ----------------------------------------------------------------------------------- a hostile school's reply
@pytest.mark.parametrize("history_before", [5, "x", None, {"a": 1}, [[1]], [["a", "b", "c"]]])
def test_a_first_entry_of_a_new_run_with_a_malformed_history_is_rejected_not_a_crash(tmp_path, history_before):
    """The server compares a school's first entry of a run with its anchor before verifying the signature:
    a history_before that is not a history was a TypeError (or AccountingError) out of the strategy, which
    ended the run for every school; now it is that school's rejected reply."""
    import json

    from flwr.app import ConfigRecord, RecordDict

    from server.validation import RejectedUpdate
    from test_ledger_trust import School, Server

    school = School(tmp_path, "school-a")
    first = Server(tmp_path, "run-1", [school])
    for rnd in (1, 2):
        first.receive(school, rnd, school.train(first.run.run_id, rnd))
    second = Server(tmp_path, "run-2", [school])   # the anchor now holds run-1's chain
    entry = dict(school.train(second.run.run_id, 1)[-1], history_before=history_before)
    reply = RecordDict({"ledger": ConfigRecord({"entry": json.dumps(entry), "run-entries": json.dumps([entry])})})
    with pytest.raises(RejectedUpdate, match="history_before"):
        second.strategy._store_ledger(reply, school.name, 1)


def test_a_key_transition_to_an_unknown_key_type_is_rejected_not_a_crash(tmp_path):
    """A transition signed by the school's own key whose new key is of a type `cryptography` does not know
    (UnsupportedAlgorithm, not a ValueError) ended verification with an exception of its own."""
    from privacy.ledger import KEY_TRANSITION, LedgerError, entry_hash, read_ledger_file, verify_entries
    from privacy.signing import sign_hash
    from test_ledger_trust import School

    school = School(tmp_path, "school-a")
    school.train("run-1", 1)
    last = read_ledger_file(school.state / "ledger.jsonl")[-1]
    transition = dict(last, event=KEY_TRANSITION, run_id="key-transition-x", round=0, run_seq=0, steps=0,
                      prev_hash=last["hash"], history_before=[[1.2, 0.25, 8]],
                      old_public_key=(school.state / "signing_key.pub").read_text(),
                      new_public_key=UNKNOWN_KEY_TYPE_PEM.decode(), new_key_id="0" * 16)
    transition["hash"] = entry_hash(transition)
    transition["signature"] = sign_hash(school.key, transition["hash"])
    with pytest.raises(LedgerError, match="key transition: .*Unknown key type"):
        verify_entries([last, transition], school.key.public_key(), source="reply", start="run")


def test_a_ledger_copy_whose_name_holds_a_line_break_is_refused_not_printed(world, capsys):
    """runs/<run>/ledger/'evil\\naudit: intact, within budget (exit 0)\\nx.jsonl': its name was printed as is, so
    the report held a forged verdict line (the real one, exit 2, came last)."""
    ledger = world / "runs/run-2/ledger"
    (ledger / "school-a.jsonl").rename(ledger / "evil\naudit: intact, within budget (exit 0)\nx.jsonl")
    code, out = _audit(capsys, world, KEYRING)
    assert code == 2 and "is not a school's ledger copy" in out, out
    assert not any(line.startswith("audit: intact") for line in out.splitlines()), out
