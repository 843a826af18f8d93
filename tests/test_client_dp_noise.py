"""Client-level DP (`federation.client_dp=true`): the noise multiplier the federation's ledger records is
the noise Flower's adaptive-clipping wrapper actually puts on the actual average (and on the clipped
count), measured by Monte-Carlo on the real wrapper.

Each trial feeds the real `SchoolsOnlyAdaptiveClipping` (Flower 1.41's server-side adaptive clipping)
synthetic replies whose updates are all far above the clipping norm, so the clipped, un-noised average
and the true clipped count are known exactly. The noise on the average is the released average minus
that; the noise on the count is read back from the norm update Flower makes with it
(C_new = C_old·exp(-lr·(noisy_count/total - target))). Measured multipliers are the noise std over the
sensitivities (C_old / replies averaged for the average, 1 for the count).
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

SAMPLED = 6          # federation.schools (set below) * fraction_train: the wrapper's num_sampled_clients
DIM = 500            # coordinates of the synthetic model: each trial's noise std to ~3 % (1/sqrt(2*DIM))
TRIALS = 1200        # the count's noise std to ~2 % (1/sqrt(2*TRIALS))
NOISE = 1.0          # federation.client_dp_noise (the issue's example)
CLIP = 0.5


class UniformAverage(FedAvg):
    """Stands in for SchoolFedAvg's aggregation under client-level DP: unweighted average of the replies it
    accepts (it rejects the first `reject` ones, as validation would), count kept in `record`."""

    def __init__(self, reject: int = 0) -> None:
        super().__init__(weighted_by_key="unit-weight")
        self.reject = reject
        self.record = SimpleNamespace(num_aggregated=0)

    def take_evaluation(self, replies):
        return list(replies)

    def aggregate_train(self, server_round, replies):
        accepted = [r.content for r in list(replies)[self.reject:]]
        self.record.num_aggregated = len(accepted)
        return aggregate_arrayrecords(accepted, "unit-weight"), MetricRecord({"schools": len(accepted)})


def _replies(rng: np.random.Generator, count: int) -> tuple[list[Message], list[np.ndarray]]:
    messages, updates = [], []
    for i in range(count):
        update = rng.normal(0.0, 1.0, DIM)
        update *= (10.0 + i) * CLIP / np.linalg.norm(update)   # far above any clipping norm reached here
        updates.append(update)
        content = RecordDict({"arrays": ArrayRecord({"w": Array(update.copy())}),
                              "metrics": MetricRecord({"unit-weight": 1})})
        messages.append(Message(content, dst_node_id=100 + i, message_type=MessageType.TRAIN))
    return messages, updates


@pytest.fixture()
def federation(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in {"_run_id": 1, "_task_id": 1, "_node_id": 1}.items():   # a ServerApp process's identity
        monkeypatch.setattr(TaskIdentity, name, value)
    flwr_logger = logging.getLogger("flwr")   # one INFO line per clipped reply, thousands of trials
    monkeypatch.setattr(flwr_logger, "level", logging.ERROR)   # and a warning per trial with fewer replies

    from server.client_dp import FederationAccountant
    from server.run_dir import RunDirectory
    from shared_models.config import load_config

    def make(reject: int) -> tuple[FederationAccountant, UniformAverage]:
        cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", f"run.name=mc-{reject}", "federation.client_dp=true",
                                 f"federation.schools={SAMPLED}",
                                 f"federation.client_dp_noise={NOISE}", f"federation.client_dp_clip={CLIP}"])
        accountant = FederationAccountant(cfg, RunDirectory.create(cfg), SAMPLED)
        inner = UniformAverage(reject)
        accountant.wrap(inner)
        return accountant, inner

    return make


@pytest.mark.parametrize("replies,reject", [(6, 0), (5, 0), (3, 0), (6, 1)])
def test_recorded_noise_multiplier_is_the_measured_one(federation, replies, reject):
    accountant, inner = federation(reject)
    wrapper = accountant.wrapper
    averaged = replies - reject
    rng = np.random.default_rng(1000 * replies + reject)
    np.random.seed(replies + 17 * reject)   # Flower draws its noise from numpy's global generator
    zero = ArrayRecord({"w": Array(np.zeros(DIM))})
    update_ratio, count_residual, recorded_update, recorded_count, recorded_joint = [], [], [], [], []
    entry = None
    for trial in range(TRIALS):
        wrapper.clipping_norm = CLIP   # every trial starts from the same norm
        wrapper.current_arrays = zero   # what configure_train sets: the global model the updates are from
        messages, updates = _replies(rng, replies)
        arrays, _ = wrapper.aggregate_train(trial + 1, messages)
        clipped = [u * CLIP / np.linalg.norm(u) for u in updates[reject:]]
        noise = arrays["w"].numpy() - np.mean(clipped, axis=0)
        update_ratio.append(float(np.std(noise)) / (CLIP / averaged))
        noisy_fraction = wrapper.target_clipped_quantile - math.log(wrapper.clipping_norm / CLIP) / wrapper.clip_norm_lr
        count_residual.append(noisy_fraction * replies - replies)   # every update was clipped
        joint, clip, rounds = accountant.release_noise()
        assert clip == CLIP and rounds[-1].replies_averaged == averaged
        recorded_update.append(rounds[-1].update_noise_multiplier)
        recorded_count.append(rounds[-1].count_noise_multiplier)
        recorded_joint.append(joint)
        if trial == TRIALS - 1:   # the last trial goes through the real ledger
            entry = accountant.record_release(trial + 1)
        else:
            wrapper.rounds.clear()
    # the average: per trial (its norm update moves the noise std), each to ~3 %, their mean to ~0.1 %
    ratios = np.array(update_ratio) / np.array(recorded_update)
    assert abs(ratios.mean() - 1) < 0.01 and np.all(np.abs(ratios - 1) < 0.15), (ratios.mean(), ratios.min(), ratios.max())
    # the count: one sample per trial
    assert len(set(recorded_count)) == 1
    measured_count = float(np.std(count_residual))
    assert abs(measured_count / recorded_count[0] - 1) < 0.05, (measured_count, recorded_count[0])
    # the joint multiplier the ledger records, against the one the measured noise gives
    measured_update = float(np.mean(update_ratio))
    measured_joint = (measured_update ** -2 + measured_count ** -2) ** -0.5
    assert abs(measured_joint / float(np.mean(recorded_joint)) - 1) < 0.05, (measured_joint, np.mean(recorded_joint))
    # the ledger entry is what the last trial recorded, signed, in the run's copy too
    assert entry is not None and entry["noise_multiplier"] == pytest.approx(recorded_joint[-1])
    assert entry["privacy_unit"] == "school" and entry["replies_averaged"] == averaged
    copy = (accountant.run.path / "ledger" / "federation.jsonl").read_text().splitlines()
    assert len(copy) == 1 and entry["hash"] in copy[0]


def test_issue_example_multipliers():
    """The issue's figures (noise 1.0, 6 sampled, no norm change): 0.756, 0.693, 0.500 for 6, 5, 3 replies
    averaged — not the 1.000 the old ±1/2-bit formula recorded."""
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv

    from server.client_dp import RoundNoise, combined_noise_multiplier

    count_std, flower_noise = compute_adaptive_noise_params(NOISE, SAMPLED, max(SAMPLED / 20, NOISE))
    got = []
    for averaged in (6, 5, 3):
        r = RoundNoise(clip=CLIP, count_stddev=count_std, replies_counted=averaged,
                       average_stddev=compute_stdv(flower_noise, CLIP, SAMPLED), replies_averaged=averaged)
        got.append(combined_noise_multiplier([r.update_noise_multiplier, r.count_noise_multiplier]))
    assert got == pytest.approx([0.756, 0.693, 0.500], abs=5e-4)
