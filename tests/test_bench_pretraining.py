"""simulations/bench/pretraining.py's server-side post-processing: FedAvgM and the tail average of rounds."""

import torch

from simulations.bench.pretraining import fedavgm, tail_average


def test_tail_average_is_the_mean_of_the_rounds_models_with_integer_buffers_rounded():
    rounds = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)},
              {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(2)},
              {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(4)}]
    mean = tail_average(rounds)
    assert torch.allclose(mean["w"], torch.tensor([3.0, 3.0])) and mean["w"].dtype == torch.float32
    assert int(mean["n"]) == 2 and mean["n"].dtype == torch.int64   # 7/3 rounds to 2
    assert torch.equal(tail_average(rounds[-1:])["w"], rounds[-1]["w"])


def test_fedavgm_adds_the_momentum_share_of_the_previous_step():
    start = {"w": torch.tensor([0.0])}
    velocity: dict[str, torch.Tensor] = {}
    first = fedavgm(start, [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}], velocity, momentum=0.5)
    assert torch.allclose(first["w"], torch.tensor([2.0]))          # plain average in round 1
    second = fedavgm(first, [{"w": torch.tensor([3.0])}], velocity, momentum=0.5)
    assert torch.allclose(second["w"], torch.tensor([4.0]))         # step 1 + 0.5 x previous step 2
