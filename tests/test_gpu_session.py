"""The GPU session scripts' CPU dry run (issue 23): every step of benchmarks/gpu_session.sh and gpu_session_2.sh runs
on the CPU at tiny shapes (GPU_SESSION_DRY=1), so a lent GPU's few minutes are never lost to a typo.

Each test runs the script as a lent session would (bash, the repository root, $OUT), with the interpreter running
this suite, and checks every step ended ok and wrote its table. ~20-30 s each on 2 idle cores (the Python start-ups
and imports of 4 steps); Liger's row is measured when its wheel is in .whl/ (`gpu_session.sh --prepare`), else
marked as skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(script: str, tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "out"
    env = dict(os.environ, GPU_SESSION_DRY="1", OUT=str(out), TMPDIR=str(tmp_path), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    env.pop("ATESD_TRITON_CONFIG", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, summary


def outcomes(summary: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([a-z]-[a-z-]+) \| ([^|]+) \|", summary, re.M))


def test_gpu_session_dry_run(tmp_path):
    out, summary = dry_run("gpu_session.sh", tmp_path)
    assert outcomes(summary) == {"a-device": "ok", "b-exactness": "ok", "c-kernels": "ok", "d-train-step": "ok"}, \
        summary
    assert "CPU dry run" in summary and re.search(r"^total \d+ s$", summary, re.M)
    assert "torch " in (out / "device.md").read_text()
    assert re.search(r"\b9 passed\b", (out / "exactness.log").read_text())  # the session's exactness list
    kernels = (out / "kernels.md").read_text()
    assert "matmul peak" in kernels
    for head in ("frozen", "trainable"):
        for impl in ("ours", "chunked"):
            assert re.search(rf"^\| 64 \| 32 \| 300 \| {head} \| {impl} \| [\d.]+ \|", kernels, re.M), kernels
        liger = re.search(rf"^\| 64 \| 32 \| 300 \| {head} \| liger \| ([^|]+) \|", kernels, re.M)
        assert liger and (liger.group(1).strip() == "skipped: liger-kernel not installed"
                          or re.fullmatch(r"[\d.]+", liger.group(1).strip())), kernels
    assert re.search(r"^\| 64 \| 32 \| 300 \| frozen \| ours \| .* \| 14NVH \|", kernels, re.M)
    train = (out / "train-step.md").read_text()
    assert "| rollout |" in train and "graphs compiled (any is a recompile)" in train
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT


def test_gpu_session_2_dry_run(tmp_path):
    out, summary = dry_run("gpu_session_2.sh", tmp_path)
    assert outcomes(summary) == {"a-device": "ok", "b-rollout": "ok", "c-prefix-sharing": "ok"}, summary
    assert "| smoke | static (static (merged LoRA)) |" in (out / "rollout.md").read_text()
    prefix = (out / "prefix-sharing.log").read_text()
    assert "small shared" in prefix and "attention dense" in prefix and "2 passed" in prefix
    assert len(list(out.iterdir())) <= 8


def test_budget_skips_steps_and_timeouts_are_recorded(tmp_path):
    """A budget too small for the later steps: they are marked skipped, and a step over its limit is marked as timed
    out, without stopping the script (the step runner, on a stand-in script)."""
    script = tmp_path / "session.sh"
    script.write_text(
        f"cd {ROOT}\n"
        "source benchmarks/gpu_session_lib.sh\n"
        "start_summary test\n"
        "step a-fast 30 a.log '' -- true\n"
        "step b-slow 11 b.log '' -- sleep 30\n"
        "step c-late 30 c.log '' -- true\n"
    )
    env = dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), PYTHON=sys.executable,
               GPU_SESSION_BUDGET="25")
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, timeout=120)
    got = outcomes((tmp_path / "out" / "summary.md").read_text())
    assert got["a-fast"] == "ok" and got["b-slow"].startswith("timed out after 11 s")
    assert got["c-late"].startswith("skipped:")
