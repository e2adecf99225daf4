"""This project installs beside Hugging Face's ``kernels`` distribution (issue 17): the core case, in CI.

``tools/check_coexistence.sh --quick``: one fresh venv with torch 2.13.0 (CPU), this project as a non-editable
wheel (--no-build-isolation), then HF ``kernels``; ``from kernels import get_kernel`` and
``AutoModelForCausalLM.from_pretrained`` work, ``atesd.kernels.fused_linear_kl`` runs on the native backend,
``python -m atesd.engine.train --steps 1`` runs; then a checkout (not installed, its root as working directory)
beside HF kernels: the op and the HF checks again. Several minutes (a venv, torch and the project's dependencies
from the package index or pip's cache, a native build, one engine step); the whole matrix (both install orders,
uninstalling either, the engine from the checkout) is the script without ``--quick``, its output in the README.
``ATESD_SKIP_COEXISTENCE=1`` skips it in local runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(os.environ.get("ATESD_SKIP_COEXISTENCE") == "1",
                    reason="ATESD_SKIP_COEXISTENCE=1 (a local shortcut; CI runs it)")
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
    assert "engine ok: python -m atesd.engine.train --steps 1 -> loss backend: native" in out
