"""The Makefile on an externally-managed Python (PEP 668, a stock Debian/Ubuntu Python), fast part (issue 18 item 8).

A stand-in for such a Python (.ci/externally_managed_python.py: this interpreter's binary and standard library with
the EXTERNALLY-MANAGED marker, no venv) refuses a bare `pip install`; the Makefile creates .venv from it and
every install and run goes through .venv/bin/python, whose pip installs. The end-to-end check (a fresh clone,
`make run` and `make test`, minutes) is .ci/fresh_clone_pep668.sh, documented in the README.
"""

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or sys.platform == "win32", reason="needs make and a POSIX Python"
)


def _probe_wheel(directory) -> str:
    """A minimal pure-Python wheel, installable offline."""
    files = {
        "atesd_probe.py": b"VALUE = 42\n",
        "atesd_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: atesd-probe\nVersion: 0.1\n",
        "atesd_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
        f"{len(data)}\n"
        for name, data in files.items()
    )
    files["atesd_probe-0.1.dist-info/RECORD"] = (record + "atesd_probe-0.1.dist-info/RECORD,,\n").encode()
    path = os.path.join(directory, "atesd_probe-0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_makefile_works_where_a_bare_pip_install_is_refused(tmp_path):
    # where pip lives, asked of a child: importing pip here would switch setuptools' distutils shim off for the rest
    # of the session (_distutils_hack.spec_for_pip), and a later torch.compile on CPU (inductor imports setuptools)
    # would fail
    pip_dir = subprocess.run(
        [sys.executable, "-c", "import os, pip; print(os.path.dirname(pip.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, ".ci", "externally_managed_python.py"), str(tmp_path / "debian")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    system_python = out.stdout.strip()
    probe = system_python + " -c 'import sys; print(sys.prefix == sys.base_prefix)'"
    assert subprocess.run(probe, shell=True, capture_output=True, text=True).stdout.strip() == "True"  # not a venv

    # 1. a bare pip install into it is refused (pip lent from this interpreter, as Debian's python3-pip would be)
    lent = tmp_path / "pip-only"
    lent.mkdir()
    os.symlink(pip_dir, lent / "pip")
    bare = subprocess.run(
        [system_python, "-m", "pip", "install", "--no-index", _probe_wheel(tmp_path)],
        capture_output=True, text=True, env={**env, "PYTHONPATH": str(lent)},
    )  # fmt: skip
    assert bare.returncode != 0 and "externally-managed-environment" in bare.stderr, bare.stderr

    # 2. the Makefile (in a fresh directory, as in a fresh clone) makes .venv from it...
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Makefile", "pyproject.toml", "CMakeLists.txt"):
        shutil.copy(os.path.join(ROOT, name), clone / name)
    make = subprocess.run(
        ["make", "-C", str(clone), f"PYTHON={system_python}", ".venv/bin/python"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert make.returncode == 0, make.stderr
    venv_python = str(clone / ".venv" / "bin" / "python")
    # ... whose pip installs (offline: a local wheel), where the system Python's refused
    inside = subprocess.run(
        [venv_python, "-m", "pip", "install", "--no-index", _probe_wheel(tmp_path)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert inside.returncode == 0, inside.stderr
    check = subprocess.run([venv_python, "-c", "import atesd_probe; print(atesd_probe.VALUE)"], capture_output=True)
    assert check.stdout.strip() == b"42"

    # 3. every command of run / test / bench / lint uses .venv's python; none installs with the system Python
    plan = subprocess.run(
        ["make", "-n", "-C", str(clone), f"PYTHON={system_python}", "run", "test", "bench", "lint"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    commands = [ln.strip() for ln in plan.splitlines() if " -m " in ln and not ln.lstrip().startswith("#")]
    assert commands and all(".venv/bin/python -m " in c for c in commands), commands
    for target in ("-m engine.train", "-m pytest -q", "-m pytest benchmarks/ --benchmark -v", "-m ruff check"):
        assert any(target in c for c in commands), target
    assert "make bench: finished in" in plan  # make bench states its duration
