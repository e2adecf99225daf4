"""No silent fallback: which backend serves a device is known and said, a native library that does not load warns,
and the engine's loss never falls back to the materialising reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from atesd import kernels
from atesd.engine import loss as engine_loss
from atesd.kernels import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_describe_backend_names_the_backend_and_the_reason_for_a_fallback(monkeypatch):
    line = kernels.describe_backend("cpu")
    assert line.startswith(kernels.backend_for("cpu"))
    if kernels.native_cpu_available():
        assert "_atesd_native" in line
    monkeypatch.setattr(_ops, "_NATIVE", False)
    monkeypatch.setattr(_ops, "_NATIVE_REASON", "disabled by ATESD_DISABLE_NATIVE=1")
    assert kernels.backend_for("cpu") == "torch"
    assert "ATESD_DISABLE_NATIVE=1" in kernels.describe_backend("cpu")
    assert kernels.backend_for("meta") == "torch"
    monkeypatch.setattr(_ops, "_triton_installed", lambda: False)
    assert kernels.backend_for("cuda") == "torch"
    assert "triton is not installed" in kernels.describe_backend("cuda")
    assert engine_loss.describe_loss_backend("cpu") == kernels.describe_backend("cpu")


def test_a_native_library_that_does_not_load_warns(tmp_path):
    bad = tmp_path / "_atesd_native.so"
    bad.write_bytes(b"not a shared library")
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from atesd import kernels\n"
            "try:\n    kernels.backend_for('cpu')\nexcept RuntimeWarning as w:\n    print('WARNED', w)\n"
            "print(kernels.backend_for('cpu')); print(kernels.describe_backend('cpu'))\n")
    env = dict(os.environ, ATESD_NATIVE_LIBRARY=str(bad), PYTHONPATH=ROOT)
    env.pop("ATESD_DISABLE_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("WARNED") and "does not load" in lines[0]
    assert lines[1] == "torch" and "does not load" in lines[2]


def test_engine_loss_raises_instead_of_materialising(monkeypatch):
    def broken(*args, **kwargs):
        raise NotImplementedError("no kernel for this input")

    monkeypatch.setattr(engine_loss.kernels, "fused_linear_kl", broken)
    hs = torch.randn(4, 8)
    with pytest.raises(NotImplementedError, match="no kernel"):
        engine_loss.distillation_loss(hs, hs, torch.randn(30, 8))
