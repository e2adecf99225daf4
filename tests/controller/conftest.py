import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    """The controller's tensors are tiny: every test here runs on one torch thread (tests/conftest.py)."""
