"""Engine test fixtures: a tiny random Qwen3 and a tiny tokenizer, built here (no hub, no engine.lab)."""

import pytest
from engine_tiny import build_model, build_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny matrices: every engine test runs on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A saved tiny Qwen3 + tokenizer directory, loadable by engine.models.load_model."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    build_model(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)
