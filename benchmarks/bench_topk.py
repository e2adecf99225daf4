"""CPU: the top-k op (served teacher) - native C++ kernel vs its tiled torch path vs materialised torch logits.

    OMP_NUM_THREADS=1 pytest benchmarks/bench_topk.py --benchmark -s

Forward KL against the teacher's top K=64 log-probs with the tail bucket, temperature 1.1, clip 0.05, fp32, frozen
head (the LoRA case: gradient w.r.t. the student hidden states only), V = 151936 (Qwen3). Implementations:
- native        ``fused_linear_kl_topk``, native C++ kernel (the default CPU backend)
- torch-tiled   ``fused_linear_kl_topk`` on its tiled torch path (never N x V)
- materialised  full [N, V] student logits, log_softmax, gather at the ids, TRL's tail bucket (the way verl's and
                TRL's served-teacher losses compute it; same math)
- full op       the full-vocabulary ``fused_linear_kl`` (native) with the teacher's hidden states, for scale: the
                top-k op has no teacher GEMM to do
Time: per shape, one subprocess runs the four implementations interleaved, three rounds after a warm-up, and reports
each one's median forward + backward time: the machine's load (shared, it swings over minutes) then weighs on all
four alike. Memory: per (shape, implementation), a fresh subprocess measures the growth of its own peak resident set
over one forward + backward (VmHWM in /proc/self/status, reset to the current RSS just before the call: ru_maxrss
of a spawned process starts at its parent's peak, which can hide the growth). The table is printed at the end and
written to $ATESD_BENCH_OUT when set.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.peak_memory import run_probe

V, K = 151936, 64
SHAPES = [(512, 256), (512, 1024), (2048, 256)]  # (N, H)
IMPLS = ("native", "torch-tiled", "materialised", "full op")
ROUNDS = 3
RESULTS: dict[tuple, float] = {}  # (shape, impl, "seconds" | "extra_mib") -> value

SCRIPT = r"""
import json, math, statistics, sys, time

import torch

from atesd import kernels
from atesd.kernels import _ops
from atesd.kernels.reference import pointwise_divergence, teacher_tail_logprob

mode, n, h, v, k, rounds = sys.argv[1], *map(int, sys.argv[2:7])
impls = sys.argv[7:]
assert kernels.backend_for("cpu") == "native"
native_backend_for = _ops.backend_for


def materialised(hs, w, ids, t, temperature, clip):
    log_ps = torch.log_softmax(hs @ w.T / temperature, dim=-1)
    a = log_ps.gather(1, ids)
    a = torch.cat([a, torch.log(-torch.expm1(a.logsumexp(-1, keepdim=True).clamp(max=-1e-7)))], 1)
    b = torch.cat([t, teacher_tail_logprob(t)[:, None]], 1)
    return pointwise_divergence(a, b, 0.0).clamp(max=clip).sum(-1).mean()


g = torch.Generator().manual_seed(0)
hs = torch.randn(n, h, generator=g).requires_grad_(True)
w = torch.randn(v, h, generator=g).div_(h**0.5)  # in place: no transient copy of w
ht = torch.randn(n, h, generator=g).mul_(0.5).add_(hs.detach())
ids = (torch.arange(k) * 2371 + torch.randint(0, 2371, (n, 1), generator=g)) % v  # k distinct ids per row
t = torch.randn(n, k, generator=g).log_softmax(-1) + math.log(0.9)  # 90% of the teacher's mass in its top-k


def call(impl, rows):
    _ops.backend_for = (lambda device: "torch") if impl == "torch-tiled" else native_backend_for
    if impl == "full op":
        loss = kernels.fused_linear_kl(hs[rows], ht[rows], w, temperature=1.1, clip=0.05)
    elif impl == "materialised":
        loss = materialised(hs[rows], w, ids[rows], t[rows], 1.1, 0.05)
    else:
        loss = kernels.fused_linear_kl_topk(hs[rows], w, ids[rows], t[rows], temperature=1.1, clip=0.05, tail=True)
    loss.backward()
    hs.grad = None


for impl in impls:
    call(impl, slice(0, 8))  # warm-up: allocator pools, lazy imports
if mode == "memory":
    reset_peak()
    before = rss_mib("VmHWM")
    call(impls[0], slice(None))
    print(json.dumps({"extra_mib": rss_mib("VmHWM") - before}))
else:
    seconds = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            t0 = time.perf_counter()
            call(impl, slice(None))
            seconds[impl].append(time.perf_counter() - t0)
    print(json.dumps({impl: statistics.median(s) for impl, s in seconds.items()} | {"calls": seconds}))
"""


def _run(mode: str, n: int, h: int, impls: tuple[str, ...]) -> dict:
    return run_probe(SCRIPT, mode, str(n), str(h), str(V), str(K), str(ROUNDS), *impls, timeout=1800)


def _need_native() -> None:
    from atesd import kernels

    if not kernels.native_cpu_available():
        pytest.skip("native kernel not built")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}".format(*s))
def test_topk_cpu_time(benchmark, shape):
    _need_native()
    res = benchmark.pedantic(_run, args=("time", *shape, IMPLS), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    for impl in IMPLS:
        RESULTS[(shape, impl, "seconds")] = res[impl]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}".format(*s))
def test_topk_cpu_memory(benchmark, shape, impl):
    _need_native()
    res = benchmark.pedantic(_run, args=("memory", *shape, (impl,)), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    RESULTS[(shape, impl, "extra_mib")] = res["extra_mib"]


def teardown_module() -> None:
    if not RESULTS:
        return
    lines = [f"| N | H | V | K | {' | '.join(f'{i} s' for i in IMPLS)} | {' | '.join(f'{i} MiB' for i in IMPLS)} |",
             "|---|---|---|---|" + "---|" * (2 * len(IMPLS))]
    for n, h in SHAPES:
        secs = [RESULTS.get(((n, h), i, "seconds")) for i in IMPLS]
        mib = [RESULTS.get(((n, h), i, "extra_mib")) for i in IMPLS]
        cells = ["-" if x is None else f"{x:.2f}" for x in secs] + ["-" if x is None else f"{x:.0f}" for x in mib]
        lines.append(f"| {n} | {h} | {V} | {K} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("ATESD_BENCH_OUT"):
        with open(os.environ["ATESD_BENCH_OUT"], "w") as f:
            f.write(table + "\n")
