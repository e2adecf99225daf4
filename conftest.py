"""Repository-wide pytest set-up.

Triton decides at kernel-definition time whether to interpret, so TRITON_INTERPRET must be set before any
kernel module is imported: on a machine without CUDA the Triton kernels run in the interpreter.
"""

import os

import pytest

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--benchmark", action="store_true", default=False, help="run the benchmarks/ suites")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmark: pass --benchmark to run")
    for item in items:
        if "benchmarks" in item.path.parts:
            item.add_marker(skip)
