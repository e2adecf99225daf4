"""The GPU session scripts' CPU dry run (issue 23): every step of benchmarks/gpu_session.sh and gpu_session_2.sh runs
on the CPU at tiny shapes (GPU_SESSION_DRY=1), so a lent GPU's few minutes are never lost to a typo.

Each test runs the script as a lent session would (bash, the repository root, $OUT), with the interpreter running
this suite, and checks every step ended ok and wrote its table. ~30 s each on 2 idle cores (the Python start-ups
and imports of 5 steps); Liger's row is measured when its wheel is in .whl/ (`gpu_session.sh --prepare`), else
marked as skipped. A short session's step list (GPU_SESSION_STEPS) runs the steps it names in its order; a bad list
stops the script before any step. The profile's control kernel (benchmarks/profile_op.py) is compiled for sm_90 as
well, since the interpreter never compiles it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def session(script: str, tmp_path: Path, **env_vars: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = dict(os.environ, GPU_SESSION_DRY="1", OUT=str(out), TMPDIR=str(tmp_path), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", **env_vars)
    env.pop("ATESD_TRITON_CONFIG", None)
    if "GPU_SESSION_STEPS" not in env_vars:
        env.pop("GPU_SESSION_STEPS", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    return proc, out


def dry_run(script: str, tmp_path: Path, **env_vars: str) -> tuple[Path, str]:
    proc, out = session(script, tmp_path, **env_vars)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, summary


def outcomes(summary: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([a-z]-[a-z-]+) \| ([^|]+) \|", summary, re.M))


def check_profile(profile: str) -> None:
    """profile.md of benchmarks/profile_op.py at the dry run's 64x32x300: every row and section, in the interpreter."""
    assert "N=64, H=32, V=300, bf16, T 1.1, clip 0.06" in profile and "matmul peak" in profile, profile
    assert "workspace backward: blocks of 64 rows (ATESD_TRITON_BWD_WORKSPACE_MIB 512)" in profile, profile
    number = r"-?[\d.]+(?:e[-+]?\d+)?"
    rows = [("torch.mm hs W^T (same logits shape)", "", "2NVH"), ("_stats_kernel", "", "4NVH"),
            ("_loss_kernel", "", "4NVH"), ("forward torch glue (split merge)", "", ""),
            ("forward (launcher)", "", "8NVH"), ("_bwd_kernel", "frozen", "6NVH"), ("_bwd_kernel", "trainable", "8NVH"),
            ("backward, fused (launcher)", "trainable", "8NVH"),
            ("forward + backward, fused (launchers)", "frozen", "14NVH"),
            ("forward + backward, fused (launchers)", "trainable", "16NVH"),
            ("_dz_kernel (workspace backward)", "frozen", "4NVH"),
            ("_dz_kernel (workspace backward)", "trainable", "4NVH"),
            ("cuBLAS dz W + glue (workspace backward - _dz_kernel)", "frozen", "2NVH"),
            ("cuBLAS dz W, dz^T hs + glue (workspace backward - _dz_kernel)", "trainable", "4NVH"),
            ("backward, workspace (launcher)", "frozen", "6NVH"),
            ("forward + backward, workspace (launchers)", "frozen", "14NVH"),
            ("forward + backward, workspace (launchers)", "trainable", "16NVH"),
            ("dz^T hs + its atomics (trainable - frozen _bwd_kernel)", "trainable", "2NVH"),
            ("_bwd_kernel, every row masked (recompute + pointwise; every tile filtered)", "frozen", "4NVH"),
            ("dz W + its atomics (_bwd_kernel - masked)", "frozen", "2NVH"),
            ("logits only, both sides (control kernel, the stats config)", "", "4NVH"),
            ("logits only, student side (control kernel, the stats config)", "", "2NVH"),
            ("rows path: cuBLAS fp32-out logits, dz1 W (forward)", "frozen", "6NVH"),
            ("rows path: forward + backward", "frozen", "6NVH"),
            ("rows path: cuBLAS fp32-out logits again (backward)", "trainable", "4NVH"),
            ("rows path: forward + backward", "trainable", "12NVH")]
    for part, head, flops in rows:
        assert re.search(rf"^\| {re.escape(part)} \| {head} \| {number} \| {flops} \|", profile, re.M), (part, profile)
    # the interpreter's single config, its programs (2 token tiles x 5 splits), no compiled facts
    stats = r"^\| _stats_kernel \|  \| .* \| 32x64x32, 4, 1 \| 10 \(-\) \| n/a \(interpreter\) \|"
    assert re.search(stats, profile, re.M), profile
    assert "- _stats_kernel: 2 exp/log per pair" in profile, profile
    assert "- measured: _stats_kernel - logits-only control" in profile, profile
    for kernel in ("_rows_fwd_kernel frozen", "_rows_fwd_kernel trainable", "_rows_dz_kernel trainable"):
        assert re.search(rf"^- rows path, {kernel}: BLOCK_R \d+, .* GB/s$", profile, re.M), profile
    assert re.search(r"Gradient filter at these inputs .*: \d+ of 5 vocab tiles skipped", profile)
    assert re.search(r"^\| aten::\S+ \| \d+ \| " + number + r" \|$", profile, re.M)  # torch.profiler's table


def test_gpu_session_dry_run(tmp_path):
    out, summary = dry_run("gpu_session.sh", tmp_path)
    assert outcomes(summary) == {"a-device": "ok", "b-exactness": "ok", "c-kernels": "ok", "c-profile": "ok",
                                 "w-workspace": "ok", "s-train-step-static": "ok", "d-train-step": "ok"}, summary
    assert "`bash benchmarks/gpu_session.sh`" in summary
    assert "CPU dry run" in summary and re.search(r"^total \d+ s$", summary, re.M)
    assert "torch " in (out / "device.md").read_text()
    assert re.search(r"\b18 passed\b", (out / "session.log").read_text())  # the exactness list, both paths
    kernels = (out / "kernels.md").read_text()
    assert "matmul peak" in kernels
    for head in ("frozen", "trainable"):
        for impl in ("ours", "ours-rows", "chunked"):
            assert re.search(rf"^\| 64 \| 32 \| 300 \| {head} \| {impl} \| [\d.]+ \|", kernels, re.M), kernels
        liger = re.search(rf"^\| 64 \| 32 \| 300 \| {head} \| liger \| ([^|]+) \|", kernels, re.M)
        assert liger and (liger.group(1).strip() == "skipped: liger-kernel not installed"
                          or re.fullmatch(r"[\d.]+", liger.group(1).strip())), kernels
    assert re.search(r"^\| 64 \| 32 \| 300 \| frozen \| ours \| .* \| 14NVH \|", kernels, re.M)
    assert "; ours-rows: " in kernels  # the header names the backend each of ours' rows ran on
    check_profile((out / "profile.md").read_text())
    log = (out / "session.log").read_text()  # b's log, then c-kernels', c-profile's, ... appended
    assert "| frozen | ours |" in log and "\n=== c-profile\n" in log and "| _stats_kernel |" in log
    workspace = (out / "workspace.md").read_text()
    for head in ("frozen", "trainable"):
        assert re.search(rf"^\| {head} \| fused \(atomics\) \|  \| [\d.]+ \|", workspace, re.M), workspace
        assert re.search(rf"^\| {head} \| workspace 0.02 MiB \| 64 \| [\d.]+ \| .* \| \d\.\de-\d\d \|", workspace,
                         re.M), workspace
    assert "[bench_train_step] rollout done in" in log and "[bench_train_step] decode step 1: " in log
    train = (out / "train-step.md").read_text()
    assert "| rollout |" in train and "graphs compiled (any is a recompile)" in train
    static = (out / "train-step-static.md").read_text()
    assert "| rollout |" in static and "--rollout static" in static
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT


def test_gpu_session_step_list(tmp_path):
    """A short session's steps: only those GPU_SESSION_STEPS names, in its order (keys or full names)."""
    out, summary = dry_run("gpu_session.sh", tmp_path, GPU_SESSION_STEPS="c-profile,a")
    assert list(outcomes(summary).items()) == [("c-profile", "ok"), ("a-device", "ok")], summary
    assert "`GPU_SESSION_STEPS=c-profile,a bash benchmarks/gpu_session.sh`" in summary
    assert sorted(p.name for p in out.iterdir()) == ["device.md", "profile.md", "session.log", "summary.md"]
    check_profile((out / "profile.md").read_text())
    assert not (out / "session.log").read_text().startswith("=== ")  # its first writer: not appended to


def test_gpu_session_bad_step_list(tmp_path):
    """An unknown, repeated or empty step list stops the script at once with one line naming it; no step runs."""
    for steps, message in (("a,c-kernel", "unknown step 'c-kernel' (known steps: a (a-device), b (b-exactness), "
                                          "c (c-kernels), c-profile, w (w-workspace), s (s-train-step-static), "
                                          "d (d-train-step))"),
                           ("c,c-kernels", "step 'c-kernels' listed twice"), ("", "GPU_SESSION_STEPS is empty")):
        proc, out = session("gpu_session.sh", tmp_path, GPU_SESSION_STEPS=steps)
        assert proc.returncode == 2 and message in proc.stderr, (steps, proc.stderr)
        assert not (out / "summary.md").exists() and "===" not in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the session compiles it")
def test_profile_control_kernel_compiles_for_h100():
    """benchmarks/profile_op.py's logits-only kernel (both sides, then the student's) compiled for sm_90 with the
    ptxas in Triton's wheel: an error only the GPU compiler catches would otherwise cost a lent session its step."""
    code = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks.profile_op import _logits_only_kernel as kernel

for shared in (True, False):
    consts = dict(SHARED_W=shared, DOT_PREC="tf32", GROUP_N=8, BLOCK_N=128, BLOCK_V=128, BLOCK_K=64)
    sig = {a: "constexpr" if a in consts else "*bf16" if a in ("hs_ptr", "ht_ptr", "w_ptr") else
           "*fp32" if a == "out_ptr" else "fp32" if a == "inv_t" else "i32" for a in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
             if sig[a].startswith("*") or a in ("N", "V", "H", "HT", "split_len")}
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=8, num_stages=3))
    print("compiled", shared, compiled.asm["ptx"].count("wgmma.mma_async"))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas available to compile for sm_90")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^compiled True \d+$", proc.stdout, re.M) and "compiled False" in proc.stdout, proc.stdout


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
