"""A deployed school's ε store (privacy/accounting.py `epsilon_store`): PRV/RDP compositions kept in
the school's state directory, so a fresh process per message need not compose them again, and composed
for the next round after the reply has gone (client/school_round.py `prepare_next_round`)."""

from __future__ import annotations

import json

import pytest

import privacy.accounting as accounting
from privacy.accounting import EPSILON_STORE_FILE, SchoolAccountant, epsilon_report, epsilon_store, school_dataset_id

HISTORY = [(0.9, 0.05, 20), (1.1, 0.02, 10)]


@pytest.fixture()
def composed(monkeypatch):
    """Every composition that actually ran (not answered by a cache or the store)."""
    calls: list[tuple] = []
    original = accounting._compose_report

    def spy(hist, delta, kind):
        calls.append((hist, delta, kind))
        return original(hist, delta, kind)

    monkeypatch.setattr(accounting, "_compose_report", spy)
    accounting._epsilon_report.cache_clear()
    yield calls
    accounting._epsilon_report.cache_clear()


def test_a_stored_result_is_used_only_for_exactly_its_history(tmp_path, composed):
    with epsilon_store(tmp_path):
        first = epsilon_report(HISTORY, 1e-5)
    assert len(composed) == 1 and (tmp_path / EPSILON_STORE_FILE).is_file()
    accounting._epsilon_report.cache_clear()        # a new process: only the store remembers
    with epsilon_store(tmp_path):
        assert epsilon_report(list(reversed(HISTORY)), 1e-5) == first   # same history, any order
        assert len(composed) == 1
        epsilon_report(HISTORY, 2e-5)                                    # another δ
        epsilon_report(HISTORY + [(0.9, 0.05, 1)], 1e-5)                # one step more
        epsilon_report(HISTORY, 1e-5, "rdp")                             # another accountant
    assert len(composed) == 4
    accounting._epsilon_report.cache_clear()
    epsilon_report(HISTORY, 1e-5)                   # outside the block the store is not read
    assert len(composed) == 5


def test_a_malformed_store_entry_is_composed_again(tmp_path, composed):
    with epsilon_store(tmp_path):
        good = epsilon_report(HISTORY, 1e-5)
    path = tmp_path / EPSILON_STORE_FILE
    stored = json.loads(path.read_text())
    for bad in (["0.1", "prv", ""], [-1.0, "prv", ""], [0.1, "made-up", ""], [0.1], "0.1"):
        path.write_text(json.dumps({key: bad for key in stored}))
        accounting._epsilon_report.cache_clear()
        with epsilon_store(tmp_path):
            assert epsilon_report(HISTORY, 1e-5) == good
    path.write_text("{ not json")
    accounting._epsilon_report.cache_clear()
    with epsilon_store(tmp_path):
        assert epsilon_report(HISTORY, 1e-5) == good
    assert len(composed) == 7


def _deployed_school(tmp_path):
    from client.node import NodeIdentity
    from privacy.policy import policy_from_defaults
    from shared_models.config import defaults, load_config
    from simulations.bench.deploy import real_overrides

    cfg = load_config(None, [f"{k}={v}" for k, v in real_overrides(3, 10).items()])
    policy = policy_from_defaults(defaults(), 100, source="test")
    node = NodeIdentity(role="school", school_id="school-00", state_dir=tmp_path, policy=policy, simulated=False)
    return node, cfg


def test_the_next_round_finds_its_compositions_done(tmp_path, composed):
    from client.school_round import prepare_next_round
    from privacy.policy import agree_round

    node, cfg = _deployed_school(tmp_path)
    with epsilon_store(tmp_path):                    # round 1, as run_round does it
        terms = agree_round(node.policy, cfg, node.school_id)
    plan = terms.plan
    accountant = SchoolAccountant(tmp_path, node.school_id, school_dataset_id(tmp_path, node.school_id))
    accountant.record(plan.noise_multiplier, plan.sample_rate, plan.steps, privacy_unit=plan.unit, delta=terms.delta)
    prepare_next_round(node, cfg)                    # round 1's reply has gone
    accounting._epsilon_report.cache_clear()         # round 2 runs in a fresh process
    before = len(composed)
    with epsilon_store(tmp_path):
        again = agree_round(node.policy, cfg, node.school_id)
        reopened = SchoolAccountant(tmp_path, node.school_id, school_dataset_id(tmp_path, node.school_id))
        guard = reopened.epsilon_if(plan.noise_multiplier, plan.sample_rate, plan.steps, terms.delta, kind="prv")
        rdp = reopened.epsilon_if(plan.noise_multiplier, plan.sample_rate, plan.steps, terms.delta, kind="rdp")
    assert len(composed) == before                   # policy check, budget guard, ledger ε and RDP: all stored
    accounting._epsilon_report.cache_clear()         # and they are what the accountant composes
    assert again.round_epsilon == agree_round(node.policy, cfg, node.school_id).round_epsilon
    assert guard == reopened.epsilon_if(plan.noise_multiplier, plan.sample_rate, plan.steps, terms.delta, kind="prv")
    assert rdp == reopened.epsilon_if(plan.noise_multiplier, plan.sample_rate, plan.steps, terms.delta, kind="rdp")


def test_a_simulated_school_keeps_no_store(tmp_path):
    from dataclasses import replace

    from client.school_round import prepare_next_round

    node, cfg = _deployed_school(tmp_path)
    prepare_next_round(replace(node, simulated=True), cfg)
    assert not (tmp_path / EPSILON_STORE_FILE).exists()
