"""What the coordinator's log says about the rounds: read by an admin watching a run, so it must say what
happened — the federation stopping when no school can train any more (no round lines for rounds that never
trained), and counts in words that agree with them ("1 round", "2 rounds").

Drives the real SchoolFedAvg + RoundWriter under Flower's own round loop (FedAvg.start) on the fake grid of
tests/grid_fixtures.py, and reads the log lines Flower's logger printed: no SuperLink, no Ray.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from grid_fixtures import FakeGrid, _record, _reply, _state, _train_reply

pytestmark = pytest.mark.usefixtures("serverapp_identity")

SCHOOLS = {101: "school-a", 202: "school-b"}


class LogLines(logging.Handler):
    """Every message Flower's logger ("flwr", where the server's `log` calls go) printed while attached."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


@pytest.fixture()
def log_lines():
    handler = LogLines()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


def _answerer(keys: dict[int, str], trains: dict[int, int], declines: str = "budget-exhausted", setting: str = ""):
    """The fake schools: each answers the role query, trains while it has budget for `trains[node]` rounds,
    then declines every later round with `declines` (budget-exhausted, as client/school_round.py does)."""
    trained = {nid: 0 for nid in trains}

    def answer(nid, message):
        kind = message.metadata.message_type
        if kind == MessageType.QUERY:
            info = {"role": "school", "school-id": SCHOOLS[nid], "public-key": keys[nid]}
            return _reply(message, RecordDict({"node": ConfigRecord(info)}))
        assert kind == MessageType.TRAIN
        if trained[nid] >= trains[nid]:
            return _reply(message, RecordDict({"status": ConfigRecord(
                {"status": declines, "reason": "target ε spent", **({"setting": setting} if setting else {})})}))
        trained[nid] += 1
        return _train_reply(message, _state(nid))
    return answer


class ComingBackGrid(FakeGrid):
    """Nodes that go offline once they have answered round 1 and, when `back_after` is a number, are online again
    after the server has asked the SuperLink for its nodes that many times while they were away."""

    def __init__(self, node_ids, answer, back_after: int | None) -> None:
        super().__init__(node_ids, answer)
        self.everyone, self.back_after, self.asked_while_away = list(node_ids), back_after, 0

    def get_node_ids(self):
        if not self.node_ids and self.back_after is not None:
            self.asked_while_away += 1
            if self.asked_while_away > self.back_after:
                self.node_ids = list(self.everyone)
        return list(self.node_ids)


def _run(tmp_path, rounds: int, trains: dict[int, int], *extra: str, wrap=None, leave_after_round_1: bool = False,
         back_after: int | None = None, leave_after_check: bool = False, declines: str = "budget-exhausted",
         setting: str = ""):
    """A federation of len(trains) schools over `rounds` rounds, run by Flower's round loop as server/app.py
    runs it (`wrap`: around a wrapper, as client-level DP's; `leave_after_round_1`: every node goes offline
    once it has answered round 1, and comes back after `back_after` node-list requests if given;
    `leave_after_check`: every node goes offline right after round 1's check between rounds found them online);
    returns the run directory."""
    from privacy.signing import load_or_create_signing_key, public_key_pem
    from server.round_writer import RoundWriter
    from server.run_dir import RunDirectory
    from server.strategy import SchoolFedAvg, run_rounds
    from shared_models.config import load_config

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "privacy.enabled=false",
                             "federation.min_train_schools=1", "federation.max_update_norm=1000",
                             "federation.fraction_train=1.0", f"federation.rounds={rounds}", *extra])
    run = RunDirectory.create(cfg)
    keys = {nid: public_key_pem(load_or_create_signing_key(tmp_path / SCHOOLS[nid])) for nid in trains}

    class Writer(RoundWriter):
        def evaluate_in_process(self, arrays):   # no model to score: the fake schools train a float vector
            return {"synthetic-rafdb": {"accuracy": 0.5, "n": 100}}

    writer = Writer(run, cfg)
    writer.model_info = {"name": "fake", "preset": "", "num_classes": 7}
    strategy = SchoolFedAvg(cfg, run, rounds=writer)
    answer = _answerer(keys, trains, declines, setting)
    grid = ComingBackGrid(list(trains), answer, back_after)
    if leave_after_round_1:
        left: set[int] = set()

        def answer_then_leave(nid, message):
            reply = answer(nid, message)
            if message.metadata.message_type == MessageType.TRAIN and nid not in left:
                left.add(nid)
                grid.node_ids = [n for n in grid.node_ids if n != nid]
            return reply
        grid.answer = answer_then_leave
    if leave_after_check:
        check = strategy.configure_evaluate

        def check_then_leave(server_round, *args, **kwargs):
            messages = check(server_round, *args, **kwargs)
            if server_round == 1:
                grid.node_ids = []
            return messages
        strategy.configure_evaluate = check_then_leave
    runner = wrap(strategy) if wrap is not None else strategy
    run_rounds(runner, strategy, grid, _record(_state(0)), num_rounds=rounds, timeout=5)
    return run


def test_the_log_shows_the_federation_stop_when_no_school_can_train(tmp_path, log_lines):
    """Both schools train round 1 and decline round 2 (budget spent): nobody is left after round 2, and the log
    ends there — no round lines for rounds 3-5, which never trained."""
    run = _run(tmp_path, 5, {101: 1, 202: 1})
    assert [line["round"] for line in run.metrics()] == [1, 2]
    assert log_lines.matching("no school can train any more")
    assert not [line for line in log_lines.lines if line.startswith(("[ROUND 3/5]", "[ROUND 4/5]", "[ROUND 5/5]"))]
    # neither a refusal ("round 3: 0 accepted replies") nor a progress line ("round 3/5 | ...") for them
    assert not [line for line in log_lines.lines if re.match(r"\[fedfer\] round [345]\b", line)]
    assert log_lines.matching("[fedfer] federation stopped after round 2 of 5: no school can train any more "
                              "(3 planned rounds not run)")
    # the server knows why: both declined on their budget (it said "budgets exhausted or none connected")
    assert log_lines.matching(f"[fedfer] no school can train any more (2 schools declined on budget (budget-exhausted): "
                              f"{', '.join(sorted(SCHOOLS.values()))}): finishing"), log_lines.lines
    assert [e["round"] for e in map(json.loads, run.events_path.read_text().splitlines()) if e["event"] == "finished"] == [3]
    # round 2 did send training: its refusal is logged (with the count in words), as before
    assert log_lines.matching("[fedfer] round 2: 0 accepted replies (at least 1 needed): global model unchanged")


def test_the_stop_ends_the_loop_of_the_client_dp_wrapper_too(tmp_path, log_lines):
    """Under client-level DP server/app.py runs Flower's loop of the wrapper around the strategy."""
    from server.client_dp import SchoolsOnlyAdaptiveClipping

    def wrap(strategy):
        return SchoolsOnlyAdaptiveClipping(strategy, noise_multiplier=0.0, num_sampled_clients=2,
                                           initial_clipping_norm=100.0, clipped_count_stddev=1.0)

    run = _run(tmp_path, 5, {101: 1, 202: 1}, wrap=wrap)
    assert [line["round"] for line in run.metrics()] == [1, 2]
    assert log_lines.matching("federation stopped after round 2 of 5") and not log_lines.matching("[ROUND 3/5]")


@pytest.fixture()
def quick_polls(monkeypatch):
    import server.strategy as module

    monkeypatch.setattr(module, "OFFLINE_POLL_S", 0.01)


def test_schools_gone_offline_are_waited_for_then_the_federation_stops_before_the_next_round(tmp_path, log_lines,
                                                                                             quick_polls):
    """Offline is not out of budget: between rounds the server waits `federation.offline_wait` for a school to come
    back, then stops with a line that says so — before Flower starts the next round (no "[ROUND 2/4]" header, no
    round line for a round that never trained), the last round evaluated in its own exchange."""
    run = _run(tmp_path, 4, {101: 5, 202: 5}, "federation.offline_wait=0.3", leave_after_round_1=True)
    assert [line["round"] for line in run.metrics()] == [1]
    assert not log_lines.matching("[ROUND 2/4]")
    assert log_lines.matching("[fedfer] after round 1 no school that can train is online (school-a, school-b offline): "
                              "waiting up to 0.3 s for one to come back (federation.offline_wait)")
    assert log_lines.matching("[fedfer] federation stopped after round 1 of 4: no school that can train came back "
                              "online within 0.3 s (3 planned rounds not run)")
    assert not [line for line in log_lines.lines if re.match(r"\[fedfer\] round [234]\b", line)]
    finished = [e for e in map(json.loads, run.events_path.read_text().splitlines()) if e["event"] == "finished"]
    assert [(e["round"], e["reason"]) for e in finished] == [(2, "no school online")]
    assert finished[0]["why"] == f"2 schools offline: {', '.join(sorted(SCHOOLS.values()))}"
    assert run.metrics()[0]["timing"]["offline_wait_s"] >= 0.3
    from server.report import load_run   # the report says why it stopped: not out of budget, offline

    assert load_run(run.path).notes == ["the federation stopped after round 1 of 4: no school that could train was "
                                        "online (federation.offline_wait); 1 round recorded"]


def test_schools_that_come_back_within_the_wait_keep_the_federation_going(tmp_path, log_lines, quick_polls):
    run = _run(tmp_path, 3, {101: 5, 202: 5}, "federation.offline_wait=60", leave_after_round_1=True, back_after=3)
    assert [line["round"] for line in run.metrics()] == [1, 2, 3]
    assert log_lines.matching("[fedfer] back online after 0 s: school-a, school-b")
    assert not log_lines.matching("federation stopped") and not log_lines.matching("no school can train")
    assert all(o["status"] == "ok" for line in run.metrics() for o in line["train"].values())


def test_schools_that_leave_just_after_the_check_are_waited_for_in_the_next_round(tmp_path, log_lines, quick_polls):
    """The moment between the check after round 1 and round 2's configure_train: round 2 (its header printed)
    waits for them too, and trains when they are back; without them it stops there, saying so."""
    run = _run(tmp_path / "back", 2, {101: 5, 202: 5}, "federation.offline_wait=60", leave_after_check=True, back_after=2)
    assert [line["round"] for line in run.metrics()] == [1, 2]
    assert log_lines.matching("[fedfer] after round 1 no school that can train is online (school-a, school-b offline)")
    assert log_lines.matching("[fedfer] back online after 0 s: school-a, school-b")
    run = _run(tmp_path / "gone", 3, {101: 5, 202: 5}, "federation.offline_wait=0.05", leave_after_check=True)
    assert [line["round"] for line in run.metrics()] == [1]
    assert log_lines.matching("federation stopped after round 1 of 3: no school that can train came back online "
                              "within 0.05 s (2 planned rounds not run)")


def test_offline_wait_0_stops_at_once(tmp_path, log_lines):
    run = _run(tmp_path, 4, {101: 5, 202: 5}, "federation.offline_wait=0", leave_after_round_1=True)
    assert [line["round"] for line in run.metrics()] == [1] and not log_lines.matching("waiting up to")
    assert log_lines.matching("federation stopped after round 1 of 4: no school that can train is online (3 planned rounds not run)")


def test_a_stop_with_one_round_left_says_round_not_rounds(tmp_path, log_lines):
    _run(tmp_path, 3, {101: 1})   # trains round 1, declines round 2, nobody in round 3
    assert log_lines.matching("federation stopped after round 2 of 3: no school can train any more (1 planned round not run)")
    assert not log_lines.matching("rounds not run")


def test_a_run_that_trains_every_round_ends_as_planned(tmp_path, log_lines):
    run = _run(tmp_path, 2, {101: 5, 202: 5})
    assert [line["round"] for line in run.metrics()] == [1, 2]
    assert log_lines.matching("[ROUND 2/2]") and not log_lines.matching("federation stopped")
    assert not log_lines.matching("no school can train")


def test_one_accepted_reply_short_of_the_minimum_is_one_reply(tmp_path, log_lines):
    _run(tmp_path, 2, {101: 5, 202: 0}, "federation.min_train_schools=2")
    assert log_lines.matching("[fedfer] round 1: 1 accepted reply (at least 2 needed): global model unchanged")


def test_counts_in_words_agree_with_their_number():
    from shared_models.wording import counted

    assert [counted(n, "round") for n in (0, 1, 2)] == ["0 rounds", "1 round", "2 rounds"]
    assert [counted(n, "reply", "replies") for n in (1, 3)] == ["1 reply", "3 replies"]


def _stopped_run(tmp_path):
    """A run directory (tests/test_report.py's) of 5 planned rounds that recorded 2 and stopped in round 3."""
    from test_report import write_run

    run = write_run(tmp_path / "run", [1, 2], planned=5)
    (run / "events.jsonl").write_text(json.dumps({"event": "finished", "round": 3, "reason": "no school can train",
                                                  "refused_at_query": 0}) + "\n")
    return run


def test_the_simulate_summary_says_the_federation_stopped(tmp_path, capsys):
    from fedfer.commands.simulate import print_summary

    assert print_summary(_stopped_run(tmp_path), 1.0) == 0
    out = capsys.readouterr().out
    assert ("rounds completed   2 of 5 planned (last: 2; the federation stopped there: no school could train "
            "any more)") in out, out
    assert "after 2 rounds in this run" in out and "round(s)" not in out, out


def test_the_report_says_the_federation_stopped_not_that_the_run_is_partial(tmp_path):
    from server.report import load_run, render_markdown

    data = load_run(_stopped_run(tmp_path))
    assert data.notes == ["the federation stopped after round 2 of 5: no school could train any more; 2 rounds recorded"]
    text = render_markdown(data, {})
    assert "2 rounds recorded (last: 2 of 5 planned)" in text and "round(s)" not in text


def test_the_report_of_a_one_round_run_says_round(tmp_path):
    from server.report import load_run, render_markdown
    from test_report import write_run

    data = load_run(write_run(tmp_path / "run", [1], planned=3))
    assert data.notes == ["partial run: 1 of 3 planned rounds recorded"]
    assert "1 round recorded (last: 1 of 3 planned)" in render_markdown(data, {})


def test_the_finishing_line_says_what_the_server_knows_about_each_school(tmp_path, log_lines):
    """Budget, policy, a rejected ledger, a resume and offline schools are each named (it said "budgets
    exhausted or none connected" whatever it knew); a long list is cut after NAMES_SHOWN names."""
    from server.run_dir import RunDirectory
    from server.strategy import NAMES_SHOWN, NodeInfo, SchoolFedAvg
    from shared_models.config import load_config

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t"])
    strategy = SchoolFedAvg(cfg, RunDirectory.create(cfg), exhausted=["s-resumed"])
    why = {f"s-budget-{i}": "budget" for i in range(NAMES_SHOWN + 2)} | {"s-policy": "policy", "s-ledger": "ledger"}
    names = [*why, "s-resumed", "s-offline"]
    strategy.nodes = {nid: NodeInfo(role="school", school_id=name) for nid, name in enumerate(names, start=1)}
    for school, reason in why.items():
        strategy._leave_out(school, reason)
    connected = set(strategy.nodes) - {len(names)}   # s-offline is not online
    strategy._finish(connected, first_round_not_run=3)
    budget = ", ".join(sorted(why)[:NAMES_SHOWN])
    assert log_lines.matching(
        f"no school can train any more ({NAMES_SHOWN + 2} schools declined on budget (budget-exhausted): {budget} and "
        f"2 more; 1 school declined on policy (policy-violation): s-policy; 1 school left out for a ledger the server "
        f"rejected (events.jsonl): s-ledger; 1 school left out before the resume (its checkpoint does not say "
        f"why): s-resumed; "
        f"1 school offline: s-offline): finishing"), log_lines.lines


def test_a_resumed_run_still_knows_why_each_school_was_left_out(tmp_path, log_lines):
    """The checkpoint keeps why each school was left out (strategy.left_out) beside the names: after a resume the
    finishing line said only "left out before the resume" for schools the run knew had declined on budget."""
    import torch

    from server.run_dir import RunDirectory, check_checkpoint
    from server.strategy import NodeInfo, SchoolFedAvg
    from shared_models.config import load_config

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t"])
    run = RunDirectory.create(cfg)
    first = SchoolFedAvg(cfg, run)
    first._leave_out("s-budget", "budget")
    first._leave_out("s-policy", "policy")
    path = run.save_checkpoint(1, {"w": torch.zeros(1)}, {"name": "hafnet", "preset": "dp", "num_classes": 7}, cfg,
                               first.state())
    saved = torch.load(path, weights_only=True)
    check_checkpoint(saved, path, for_resume=True)
    state = saved["strategy"]   # what server/app.py hands the resumed strategy
    resumed = SchoolFedAvg(cfg, run, exhausted=state["exhausted"], left_out=state["left_out"])
    resumed.nodes = {1: NodeInfo(role="school", school_id="s-budget"), 2: NodeInfo(role="school", school_id="s-policy")}
    resumed._finish(set(resumed.nodes), first_round_not_run=2)
    assert log_lines.matching("no school can train any more (1 school declined on budget (budget-exhausted): s-budget; "
                              "1 school declined on policy (policy-violation): s-policy): finishing"), log_lines.lines
    saved["strategy"]["left_out"] = ["s-budget"]
    with pytest.raises(Exception, match="strategy.left_out"):
        check_checkpoint(saved, path, for_resume=True)


def test_a_school_whose_ledger_is_lost_is_left_out_for_the_run(tmp_path, log_lines):
    """client/school_round.py declines with ledger-lost when the school's ledger is lost or an old backup; it
    declines every later round of the run too (until restored), so the server stops selecting it, as on a
    spent budget, and the finishing line says why (before, the reply was a plain "declined" and the school was
    asked again every round)."""
    run = _run(tmp_path, 5, {101: 1, 202: 1}, declines="ledger-lost")
    assert [line["round"] for line in run.metrics()] == [1, 2]
    assert log_lines.matching("federation stopped after round 2 of 5")
    assert log_lines.matching("no school can train any more (2 schools declined for a lost or out-of-date ledger "
                              f"(ledger-lost: fedfer deploy restore-ledger): {', '.join(sorted(SCHOOLS.values()))})")


@pytest.mark.parametrize("asked, setting, says", [
    ("privacy.budget=24", "privacy.budget", "the run asks privacy.budget=24"),
    ("privacy.school_budgets=school-a=30,school-b=30", "privacy.school_budgets", "the run asks privacy.school_budgets school-a=30"),
])
def test_a_policy_refusal_says_what_the_run_asked(tmp_path, log_lines, asked, setting, says):
    """A school declines a run-config asking for less privacy than its policy allows, naming only the key (its reply
    carries no numbers). In the walk-through the admin read "asks for less privacy than the school's policy allows
    (privacy.budget)" and had to work out what the run had asked: the coordinator, which set it, now says so."""
    run = _run(tmp_path, 2, {101: 0, 202: 0}, asked, declines="policy-violation", setting=setting)
    assert [line for line in log_lines.lines if line.endswith(f"[fedfer] school-a declined round 1: target ε spent; {says}")
            ], log_lines.lines
    declined = [e for e in map(json.loads, run.events_path.read_text().splitlines()) if e["event"] == "declined"]
    assert declined and all(says.replace("school-a", e["school"]) in e["reason"] for e in declined), declined
