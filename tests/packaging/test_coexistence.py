"""This project installs beside Hugging Face's ``kernels`` distribution (issue 17): the core case, in CI.

``tools/check_coexistence.sh --quick``: one fresh venv with torch 2.13.0 (CPU), this project as a non-editable
wheel (--no-build-isolation), then HF ``kernels``; ``from kernels import get_kernel`` and
``AutoModelForCausalLM.from_pretrained`` work, ``atesd.kernels.fused_linear_kl`` runs on the native backend,
``python -m atesd.engine.train --steps 1`` runs; then a checkout (not installed, its root as working directory)
beside HF kernels: the same checks with ``python -m engine.train``. About 4-6 minutes (a venv, torch and the
project's dependencies from the package index or pip's cache); the whole matrix (both install orders,
uninstalling either) is the script without ``--quick``, its output in the README.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_installs_and_runs_beside_hf_kernels(tmp_path):
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(
        os.path.join(ROOT, ".git")
    ):
        pytest.skip("needs a git checkout (the script copies the tracked files)")
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "ATESD_DISABLE_NATIVE", "ATESD_NATIVE_LIBRARY"):
        env.pop(var, None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "check_coexistence.sh"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "all coexistence checks passed" in out
    assert out.count("hf ok:") >= 2 and out.count("atesd ok:") >= 2
    assert "loss backend: native" in out
