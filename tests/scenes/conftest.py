import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The renderer runs many small ops; on a shared 2-core machine two torch threads mostly wait on each other
    # (10x slower under load). One thread keeps these tests fast and their timings meaningful.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
