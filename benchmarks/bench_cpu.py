"""CPU: native C++ kernel vs the tiled torch path vs naive torch, forward + backward time and peak extra memory.

    pytest benchmarks/bench_cpu.py --benchmark -s

Forward KL at temperature 1.1, clip 0.05, fp32, frozen head (the LoRA case: gradient w.r.t. the student hidden
states only). Each (shape, implementation) runs in a fresh subprocess: one warm-up call on 8 tokens, then one timed
forward + backward; peak extra memory is the growth of the subprocess's own peak resident set (VmHWM, reset before
the call: ``benchmarks/peak_memory.py``; ru_maxrss would start at the parent's peak) over that call, which sees
every allocation (torch's CPU allocator included, which tracemalloc does not), and inputs are allocated before the
baseline is read. The table is printed at the end and written to $ATESD_BENCH_OUT when set.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.peak_memory import run_probe

SHAPES = [(n, h, v) for n in (512, 2048) for h in (256, 1024) for v in (32768, 151936)]
IMPLS = ("native", "torch-tiled", "naive")
RESULTS: dict[tuple, dict] = {}

SCRIPT = r"""
import json, os, sys, time
impl, n, h, v = sys.argv[1], *map(int, sys.argv[2:5])
if impl == "torch-tiled":
    os.environ["ATESD_DISABLE_NATIVE"] = "1"
import torch
from atesd import kernels
assert kernels.backend_for("cpu") == {"native": "native", "torch-tiled": "torch"}.get(impl, kernels.backend_for("cpu"))
fn = kernels.reference.linear_kl if impl == "naive" else kernels.fused_linear_kl
g = torch.Generator().manual_seed(0)
hs = torch.randn(n, h, generator=g).requires_grad_(True)
ht = torch.randn(n, h, generator=g).mul_(0.5).add_(hs.detach())
w = torch.randn(v, h, generator=g).div_(h**0.5)  # in place: a transient copy of w would raise the baseline peak
fn(hs[:8], ht[:8], w, temperature=1.1, clip=0.05).backward()
hs.grad = None
reset_peak()
before = rss_mib("VmHWM")
t0 = time.perf_counter()
fn(hs, ht, w, temperature=1.1, clip=0.05).backward()
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "extra_mib": rss_mib("VmHWM") - before}))
"""


def _run(impl: str, n: int, h: int, v: int) -> dict:
    return run_probe(SCRIPT, impl, str(n), str(h), str(v))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
def test_cpu_fwd_bwd(benchmark, shape, impl):
    from atesd import kernels

    if impl == "native" and not kernels.native_cpu_available():
        pytest.skip("native kernel not built")
    res = benchmark.pedantic(_run, args=(impl, *shape), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    RESULTS[(shape, impl)] = res


def teardown_module() -> None:
    if not RESULTS:
        return
    lines = ["| N | H | V | native s | torch-tiled s | naive s | native MiB | torch-tiled MiB | naive MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        row = [RESULTS.get((shape, i)) for i in IMPLS]
        secs = [f"{r['seconds']:.2f}" if r else "-" for r in row]
        mib = [f"{r['extra_mib']:.0f}" if r else "-" for r in row]
        lines.append("| {} | {} | {} | ".format(*shape) + " | ".join(secs + mib) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("ATESD_BENCH_OUT"):
        with open(os.environ["ATESD_BENCH_OUT"], "w") as f:
            f.write(table + "\n")
