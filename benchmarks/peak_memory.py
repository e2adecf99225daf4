"""Peak extra memory of one call, measured in a fresh subprocess (the memory tests and CPU benchmarks of both ops).

The subprocess reads its own peak resident set (VmHWM in /proc/self/status), reset to the current RSS just before
the call (``clear_refs`` 5, Linux >= 4.0). ``ru_maxrss`` would not do: Linux carries it across exec from the parent,
so a child of a large pytest process starts at the parent's peak and hides any growth below it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# prepended to every measured script: rss_mib(field) and reset_peak()
PROBE = r'''
def rss_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
'''


def run_probe(script: str, *args: str, timeout: float = 600) -> dict:
    """Run ``PROBE + script`` with ``args`` in a fresh interpreter; returns the JSON object it prints last."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROBE + script, *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
