"""Build a stand-in for a stock Debian/Ubuntu Python: a Python installation (not a venv) whose stdlib directory holds
PEP 668's EXTERNALLY-MANAGED marker, so `python -m pip install` refuses to install into it.

    python .ci/externally_managed_python.py DEST        # prints DEST/bin/python3

DEST gets a copy of this Python's base interpreter binary and symlinks to its standard library (site-packages left
out: a fresh Python has no packages); nothing of the base installation is modified. `python -m venv` works from it
(its ensurepip is the base's), as on Debian with python3-venv installed. Used by
tests/engine/test_reliability_venv.py and .ci/fresh_clone_pep668.sh.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

MARKER = """[externally-managed]
Error=This Python is managed by the system (a simulated Debian/Ubuntu Python, PEP 668).
 Install into a virtual environment: python3 -m venv .venv
"""


def build(dest: str) -> str:
    """Create the stand-in under ``dest``; returns the path of its python3."""
    base_exe = getattr(sys, "_base_executable", None) or sys.executable
    base_exe = os.path.realpath(base_exe)
    base_prefix = sys.base_prefix
    stdlib = sysconfig.get_path("stdlib", vars={"installed_base": base_prefix, "base": base_prefix})
    version_dir = os.path.basename(stdlib)  # python3.X
    lib = os.path.join(dest, "lib")
    os.makedirs(os.path.join(dest, "bin"), exist_ok=True)
    os.makedirs(os.path.join(lib, version_dir, "site-packages"), exist_ok=True)
    exe = os.path.join(dest, "bin", "python3")
    shutil.copy2(base_exe, exe)  # a copy, not a link: the interpreter finds its prefix (DEST) from its own path
    for entry in os.listdir(os.path.dirname(stdlib)):  # libpython3.X.so, when the binary links it from there
        if entry.startswith("libpython") and not os.path.exists(os.path.join(lib, entry)):
            os.symlink(os.path.join(os.path.dirname(stdlib), entry), os.path.join(lib, entry))
    for entry in os.listdir(stdlib):
        if entry not in ("site-packages", "EXTERNALLY-MANAGED", "__pycache__"):
            target = os.path.join(lib, version_dir, entry)
            if not os.path.exists(target):
                os.symlink(os.path.join(stdlib, entry), target)
    with open(os.path.join(lib, version_dir, "EXTERNALLY-MANAGED"), "w") as fh:
        fh.write(MARKER)
    return exe


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} DEST")
    print(build(sys.argv[1]))
