"""A school whose WHOLE state folder was put back from an old backup refuses to train (`ledger-behind`).

An old backup of the whole state folder (ledger, accountant, signing_key.has-ledger and own-model.pt, all from an
earlier day) agrees with itself, so every check at the school passed and it trained from its older, lower ε; only
the coordinator's anchor rejected the update (truncated-tail), after the update had left the school. Now each
train message carries what the coordinator's anchor holds of that school's chain (entries, last hash), and the
school refuses before anything is trained, signed or sent when its ledger lacks that entry; the server leaves it
out for the run and its finishing line says why. A school on its first round, a fresh enrolment, a key rotation
or a key recovery still trains, and so does one whose reply the coordinator never received (a gap). A coordinator
that sends a wrong head can only make the school refuse. The documented way back — move the old ledger aside,
`fedfer deploy restore-ledger` — works over the old accountant too.

The rounds are real: SchoolFedAvg builds the train messages and the server's grid (PackedGrid, bundled) carries
them to the real ClientApp, whose replies the strategy validates and anchors.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from grid_fixtures import FakeGrid, _delivered
from school_fixtures import school_context, train_message
from test_ledger_restore import BASE, SCHOOL, District

from client import app as client_app
from fedfer.cli import main as fedfer_main
from privacy.ledger import read_ledger_file
from privacy.signing import approve_recovery_key, load_or_create_signing_key, public_key_pem, retire_public_key
from server.transport import PackedGrid
from shared_models.config import from_run_config, load_config
from shared_models.wire import BUNDLE_RECORD, unbundle

pytestmark = pytest.mark.usefixtures("serverapp_identity")   # the strategy makes Messages as a ServerApp does

NODE = 7   # the school's node id
LEDGER_ANCHOR_RECORD = "ledger-anchor"   # the record's name on the wire (shared_models/wire.py)


class Coordinator:
    """One run of the real strategy (keys from the district's keyring) talking to the district's school through
    the server's bundled grid and the real ClientApp. `tamper(content)` may change a train message on its way."""

    def __init__(self, district: District, run_name: str, tamper=None) -> None:
        from server.run_dir import RunDirectory
        from server.strategy import SchoolFedAvg

        self.district = district
        self.cfg = load_config(None, [f"run.root={district.root / 'runs'}", f"run.name={run_name}",
                                      f"privacy.keyring={district.keys}", "federation.fraction_train=1.0",
                                      "federation.min_train_schools=1", "federation.rounds=4",
                                      "federation.max_update_norm=1e9", *BASE])   # a tiny school, a noisy update
        self.run = RunDirectory.create(self.cfg)
        self.strategy = SchoolFedAvg(self.cfg, self.run)
        self.tamper = tamper
        self.sent: list[RecordDict] = []   # the train messages as the school received them (bundled)
        self.grid = PackedGrid(FakeGrid([NODE], self._answer), bundled=True)

    def _answer(self, nid: int, message: Message) -> Message:
        run_config = from_run_config(dict(o.split("=", 1) for o in BASE))
        context = school_context(self.district.school, self.district.state, run_config)
        delivered = _delivered(message)
        if message.metadata.message_type == MessageType.QUERY:
            return client_app.query(delivered, context)
        if self.tamper is not None:
            self.tamper(delivered.content)
        self.sent.append(delivered.content)
        return client_app.train(delivered, context)

    def round(self, server_round: int) -> dict:
        """One round: the train messages, the school's replies, their validation; then the check between rounds
        (where the finishing line is said). Returns the school's outcome in metrics.jsonl's words."""
        arrays = ArrayRecord(self.district.model)
        messages = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))
        replies = list(self.grid.send_and_receive(messages))
        self.strategy.aggregate_train(server_round, replies)
        self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid)
        return self.strategy.record.train.get(SCHOOL, {"status": "not sent"})

    def anchor_sent(self) -> dict | None:
        """The ledger-anchor record of the last train message the school received, or None."""
        record = self.sent[-1].config_records.get(LEDGER_ANCHOR_RECORD)
        return dict(record) if record is not None else None

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.run.events_path.read_text().splitlines()] \
            if self.run.events_path.exists() else []


def _files(state: Path) -> dict[str, bytes]:
    """The state folder's files that record spending or training (not locks, not the school's own timing log)."""
    return {p.name: p.read_bytes() for p in state.iterdir()
            if p.is_file() and not p.name.endswith(".lock") and p.name != "round-timing.jsonl"}


@pytest.fixture
def rolled_back(tmp_path) -> tuple[District, Path]:
    """A school that trained round 1 of run-1 (backed up then), then rounds 2-3: its whole state folder is then
    put back from the backup. Returns the district and the newest state folder (kept aside)."""
    district = District(tmp_path)
    first = Coordinator(district, "run-1")
    assert first.round(1)["status"] == "ok"
    assert first.anchor_sent() is None   # a first round: the anchor holds nothing, and nothing is sent
    backup = tmp_path / "backup"
    shutil.copytree(district.state, backup)
    for rnd in (2, 3):
        assert first.round(rnd)["status"] == "ok"
    newest = tmp_path / "newest"
    shutil.copytree(district.state, newest)
    shutil.rmtree(district.state)
    shutil.copytree(backup, district.state)
    return district, newest


def test_a_state_folder_put_back_from_an_old_backup_declines_before_training(rolled_back, caplog):
    district, _ = rolled_back
    before = _files(district.state)
    assert "own-model.pt" in before and any(n.startswith("accountant-") for n in before)
    second = Coordinator(district, "run-2")

    with caplog.at_level(logging.INFO, logger="flwr"):
        outcome = second.round(1)

    assert outcome["status"] == "ledger-behind", outcome
    assert "restore-ledger" in outcome["reason"]
    assert second.anchor_sent() == {"entries": 3, "head": read_ledger_file(district.root / "newest" / "ledger.jsonl")[-1]["hash"]}
    assert _files(district.state) == before   # nothing trained, recorded or signed: own model and accountant as they were
    assert not (second.run.path / "ledger" / f"{SCHOOL}.jsonl").exists()   # no entry left the school
    declined = [e for e in second.events() if e.get("event") == "declined"]
    assert [e["status"] for e in declined] == ["ledger-behind"]
    assert not [e for e in second.events() if e.get("event") in ("rejected", "ledger-anchor")]
    finished = [e for e in second.events() if e.get("event") == "finished"]
    assert len(finished) == 1 and "ledger-behind" in finished[0]["why"] and SCHOOL in finished[0]["why"], finished
    assert any("no school can train any more" in r.getMessage() and "ledger-behind" in r.getMessage()
               and SCHOOL in r.getMessage() for r in caplog.records)


def test_the_documented_restore_over_the_old_backup_brings_it_back_with_every_round_counted(rolled_back, capsys):
    district, newest = rolled_back
    newest_epsilon = float(read_ledger_file(newest / "ledger.jsonl")[-1]["epsilon"])
    assert Coordinator(district, "run-2").round(1)["status"] == "ledger-behind"

    # docs/deployment.md, 'A lost ledger': move the old ledger aside, restore from the coordinator's run copies
    (district.state / "ledger.jsonl").rename(district.root / "ledger.old-backup.jsonl")
    code = fedfer_main(["deploy", "restore-ledger", "--state-dir", str(district.state), "--school", SCHOOL,
                        "--from", str(district.root / "runs")])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    assert read_ledger_file(district.state / "ledger.jsonl") == read_ledger_file(newest / "ledger.jsonl")
    # the old accountant was brought up to the restored ledger: it counts what the newest one counted
    (acct,) = district.state.glob("accountant-*.json")
    assert json.loads(acct.read_text())["history"] and \
        _history(acct) == _history(next(newest.glob("accountant-*.json")))

    third = Coordinator(district, "run-3")
    outcome = third.round(1)
    assert outcome["status"] == "ok", outcome
    assert outcome["epsilon"] > newest_epsilon   # on from the newest ε, not from the backup's


def _history(accountant: Path) -> dict:
    from privacy.ledger import history_key

    return history_key(json.loads(accountant.read_text())["history"])


def test_the_next_run_of_an_intact_school_sends_the_anchor_and_trains(tmp_path):
    district = District(tmp_path)
    first = Coordinator(district, "run-1")
    for rnd in (1, 2):
        assert first.round(rnd)["status"] == "ok"
    second = Coordinator(district, "run-2")
    assert second.round(1)["status"] == "ok"
    assert second.anchor_sent() == {"entries": 2, "head": read_ledger_file(district.state / "ledger.jsonl")[1]["hash"]}
    assert second.round(2)["status"] == "ok"
    assert second.anchor_sent()["entries"] == 3   # within the run too: the anchor moved with the last reply


def test_a_reply_the_coordinator_never_received_still_trains(tmp_path):
    """The school's entry of a round whose reply was lost is in its ledger, not in the anchor: the anchored head
    is then one line later than its count; the school trains on."""
    district = District(tmp_path)
    first = Coordinator(district, "run-1")
    assert first.round(1)["status"] == "ok"
    # round 2 trained at the school, and its reply never reached the coordinator
    run_config = from_run_config(dict(o.split("=", 1) for o in BASE))
    lost = client_app.train(train_message(district.model, tmp_path / "runs" / "run-1", server_round=2, run_id="run-1"),
                            school_context(district.school, district.state, run_config))
    assert lost.content["status"]["status"] == "ok"
    assert len(read_ledger_file(district.state / "ledger.jsonl")) == 2
    second = Coordinator(district, "run-2")
    outcome = second.round(1)
    assert outcome["status"] == "ok", outcome
    assert second.anchor_sent()["entries"] == 1


def test_a_fresh_enrolment_trains_on_its_first_round(tmp_path):
    district = District(tmp_path)
    coordinator = Coordinator(district, "run-1")
    assert coordinator.round(1)["status"] == "ok" and coordinator.anchor_sent() is None


def _keyring_after(district: District, retired, *recovery) -> None:
    """The keyring after `fedfer deploy rotate NAME --ledger-key NEW.pub [--recovered]`: the school's new key
    current, the old one retired (and, for a recovery, the new one approved as a recovery key)."""
    current = district.keys / f"{SCHOOL}.pub"
    current.write_text(public_key_pem(load_or_create_signing_key(district.state)))
    retire_public_key(current, retired)
    for key in recovery:
        approve_recovery_key(current, key)


def test_a_school_trains_after_a_key_rotation(tmp_path, capsys):
    district = District(tmp_path)
    first = Coordinator(district, "run-1")
    assert first.round(1)["status"] == "ok"
    old = load_or_create_signing_key(district.state).public_key()
    assert fedfer_main(["deploy", "school-key", "--state-dir", str(district.state), "--new-ledger-key"]) == 0
    _keyring_after(district, old)
    second = Coordinator(district, "run-2")
    outcome = second.round(1)
    assert outcome["status"] == "ok", outcome
    assert second.anchor_sent()["entries"] == 1   # the chain anchored under the retired key


def test_a_school_trains_after_a_key_recovery(tmp_path):
    from server.deploy.commands import recover_school_ledger_key

    district = District(tmp_path)
    first = Coordinator(district, "run-1")
    assert first.round(1)["status"] == "ok"
    lost = load_or_create_signing_key(district.state).public_key()
    (district.state / "signing_key.pem").unlink()
    recover_school_ledger_key(district.state)
    new = load_or_create_signing_key(district.state)
    _keyring_after(district, lost, new)
    second = Coordinator(district, "run-2")
    outcome = second.round(1)
    assert outcome["status"] == "ok", outcome
    assert second.anchor_sent()["entries"] == 1


def test_an_anchor_the_server_cannot_read_leaves_the_school_out_before_it_trains(tmp_path):
    """Before, the school trained and the server rejected its update at the anchor check; now it is not sent the
    round (an `ledger-anchor` event names the file), so nothing is spent on a reply that would be refused."""
    district = District(tmp_path)
    assert Coordinator(district, "run-1").round(1)["status"] == "ok"
    (district.root / "runs" / "anchors" / f"{SCHOOL}.json").write_text("{not json")
    before = _files(district.state)
    second = Coordinator(district, "run-2")
    assert second.round(1) == {"status": "not sent"}
    assert second.sent == [] and _files(district.state) == before
    (event,) = [e for e in second.events() if e.get("event") == "ledger-anchor"]
    assert event["school"] == SCHOOL and "unreadable" in event["reason"]


def _set_anchor(entries, head):
    def tamper(content: RecordDict) -> None:
        content[LEDGER_ANCHOR_RECORD] = ConfigRecord({"entries": entries, "head": head})
    return tamper


@pytest.mark.parametrize("case", ["unknown head", "head at an earlier count", "more entries than the ledger",
                                  "malformed head", "malformed count"])
def test_a_wrong_head_from_the_coordinator_only_makes_the_school_refuse(tmp_path, case):
    """A dishonest or broken coordinator: whatever it sends, the school never trains with less protection and
    never signs anything on its word; a head it cannot find only makes it refuse (denial of service, which a
    coordinator can always cause by not sending the round)."""
    district = District(tmp_path)
    assert Coordinator(district, "run-1").round(1)["status"] == "ok"
    head = read_ledger_file(district.state / "ledger.jsonl")[-1]["hash"]
    tamper = {"unknown head": _set_anchor(1, "ab" * 32), "head at an earlier count": _set_anchor(1, head),
              "more entries than the ledger": _set_anchor(2, head), "malformed head": _set_anchor(1, "../../x"),
              "malformed count": _set_anchor(True, head)}[case]
    before = _files(district.state)
    outcome = Coordinator(district, "run-2", tamper).round(1)
    if case == "head at an earlier count":   # the entry is there: the school trains, counting its whole ledger
        assert outcome["status"] == "ok", outcome
        assert outcome["epsilon"] > float(read_ledger_file(district.state / "ledger.jsonl")[0]["epsilon"])
        return
    assert outcome["status"] == ("declined" if case.startswith("malformed") else "ledger-behind"), outcome
    assert _files(district.state) == before


def test_the_servers_grid_sends_each_school_its_own_anchor_beside_one_shared_bundle():
    from grid_fixtures import _record, _reply, _state

    seen: list[RecordDict] = []

    def answer(nid, message):
        seen.append(message.content)
        return _reply(message, RecordDict({"status": ConfigRecord({"status": "busy"})}))

    grid = PackedGrid(FakeGrid([1, 2], answer), bundled=True)
    arrays, config = _record(_state(0)), ConfigRecord({"server-round": 1})
    anchors = {1: ConfigRecord({"entries": 3, "head": "a" * 64}), 2: ConfigRecord({"entries": 5, "head": "b" * 64})}
    messages = [Message(RecordDict({"arrays": arrays, "config": config, LEDGER_ANCHOR_RECORD: anchors[nid]}),
                        message_type=MessageType.TRAIN, dst_node_id=nid) for nid in (1, 2)]
    grid.send_and_receive(messages)
    assert seen[0][BUNDLE_RECORD] is seen[1][BUNDLE_RECORD]   # the model travels once, however many schools
    assert [dict(c[LEDGER_ANCHOR_RECORD]) for c in seen] == [dict(anchors[1]), dict(anchors[2])]
    assert [dict(unbundle(c)[LEDGER_ANCHOR_RECORD]) for c in seen] == [dict(anchors[1]), dict(anchors[2])]
    assert unbundle(seen[1])["config"]["server-round"] == 1


@pytest.mark.slow   # three `fedfer simulate` runs (about a minute each on an idle 2-core machine)
def test_a_simulated_school_put_back_from_an_old_backup_declines_and_the_other_trains_on(tmp_path):
    """Two simulated schools sharing a state folder across runs (privacy.state_dir): after run-2, school-00's whole
    state folder is put back as it was after run-1. In run-3 it declines ledger-behind before training (its files
    as the backup left them, no entry of it in the run), while school-01 trains on."""
    from test_ledger_restore import _simulate

    _simulate(tmp_path, "run-1")
    state = tmp_path / "state" / "school-00"
    shutil.copytree(state, tmp_path / "backup")
    _simulate(tmp_path, "run-2")
    shutil.rmtree(state)
    shutil.copytree(tmp_path / "backup", state)
    before = {name: data for name, data in _files(state).items() if name != "school.log"}

    out = _simulate(tmp_path, "run-3")

    events = [json.loads(line) for line in (tmp_path / "runs" / "run-3" / "events.jsonl").read_text().splitlines()]
    declined = [(e["school"], e["round"], e["status"]) for e in events if e.get("event") == "declined"]
    assert declined == [("school-00", 1, "ledger-behind")], events
    assert not [e for e in events if e.get("event") in ("rejected", "ledger-anchor")], events
    assert {name: data for name, data in _files(state).items() if name != "school.log"} == before
    said = (state / "school.log").read_text()   # the school's own log says why, and what to do
    assert "not the entry the coordinator's anchor verified" in said and "fedfer deploy restore-ledger" in said, said
    assert not (tmp_path / "runs" / "run-3" / "ledger" / "school-00.jsonl").exists()
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "run-3" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train"]["school-01"]["status"] for m in metrics] == ["ok", "ok"], out[-3000:]
