"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: the models under test are small, and on the shared 2-core machine a second
    OpenMP thread that gets descheduled stalls every op (measured 10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
