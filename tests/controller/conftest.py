import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The controller's tensors are tiny; on a busy 2-core box thread hand-offs dominate. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

