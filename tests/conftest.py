import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: intra-op threads only add hand-offs (and thrash on a loaded 2-core box). Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
