"""CPU: the top-k op (served teacher) - native C++ kernel vs its tiled torch path vs materialised torch logits.

    OMP_NUM_THREADS=1 pytest benchmarks/bench_topk.py --benchmark -s

Forward KL against the teacher's top K=64 log-probs with the tail bucket, temperature 1.1, clip 0.05, fp32, frozen
head (the LoRA case: gradient w.r.t. the student hidden states only), V = 151936 (Qwen3). Implementations:
- native        ``fused_linear_kl_topk``, native C++ kernel (the default CPU backend)
- torch-tiled   ``fused_linear_kl_topk`` with ATESD_DISABLE_NATIVE=1 (tiled torch, never N x V)
- materialised  full [N, V] student logits, log_softmax, gather at the ids, TRL's tail bucket (the way verl's and
                TRL's served-teacher losses compute it; same math)
- full op       the full-vocabulary ``fused_linear_kl`` (native) with the teacher's hidden states, for scale: the
                top-k op has no teacher GEMM to do
Each (shape, implementation) runs in a fresh subprocess: one warm-up call on 8 tokens, then one timed forward +
backward; peak extra memory is the growth of the subprocess's peak resident set (ru_maxrss) over that call, with
inputs allocated before the baseline is read (no N x V tensor before it). The table is printed at the end and
written to $ATESD_BENCH_OUT when set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

V, K = 151936, 64
SHAPES = [(512, 256), (512, 1024), (2048, 256)]  # (N, H)
IMPLS = ("native", "torch-tiled", "materialised", "full op")
RESULTS: dict[tuple, dict] = {}

SCRIPT = r"""
import json, math, os, resource, sys, time
impl, n, h, v, k = sys.argv[1], *map(int, sys.argv[2:6])
if impl == "torch-tiled":
    os.environ["ATESD_DISABLE_NATIVE"] = "1"
import torch
from atesd import kernels
from atesd.kernels.reference import pointwise_divergence, teacher_tail_logprob
assert kernels.backend_for("cpu") == ("torch" if impl == "torch-tiled" else "native")

def materialised(hs, w, ids, t, temperature, clip):
    log_ps = torch.log_softmax(hs @ w.T / temperature, dim=-1)
    a = log_ps.gather(1, ids)
    a = torch.cat([a, torch.log(-torch.expm1(a.logsumexp(-1, keepdim=True).clamp(max=-1e-7)))], 1)
    b = torch.cat([t, teacher_tail_logprob(t)[:, None]], 1)
    return pointwise_divergence(a, b, 0.0).clamp(max=clip).sum(-1).mean()

g = torch.Generator().manual_seed(0)
hs = torch.randn(n, h, generator=g).requires_grad_(True)
w = torch.randn(v, h, generator=g).div_(h**0.5)  # in place: a transient copy of w would raise the baseline peak
ht = torch.randn(n, h, generator=g).mul_(0.5).add_(hs.detach())
ids = (torch.arange(k) * 2371 + torch.randint(0, 2371, (n, 1), generator=g)) % v  # k distinct ids per row
t = torch.randn(n, k, generator=g).log_softmax(-1) + math.log(0.9)  # 90% of the teacher's mass in its top-k
if impl == "full op":
    run = lambda s, r: kernels.fused_linear_kl(s, ht[r], w, temperature=1.1, clip=0.05)
elif impl == "materialised":
    run = lambda s, r: materialised(s, w, ids[r], t[r], 1.1, 0.05)
else:
    run = lambda s, r: kernels.fused_linear_kl_topk(s, w, ids[r], t[r], temperature=1.1, clip=0.05, tail=True)
run(hs[:8], slice(0, 8)).backward()
hs.grad = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
run(hs, slice(None)).backward()
seconds = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "extra_mib": (after - before) / 1024}))
"""


def _run(impl: str, n: int, h: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT, impl, str(n), str(h), str(V), str(K)], capture_output=True,
                         text=True, env=env, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} N={n} H={h} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}".format(*s))
def test_topk_cpu_fwd_bwd(benchmark, shape, impl):
    from atesd import kernels

    if impl in ("native", "full op") and not kernels.native_cpu_available():
        pytest.skip("native kernel not built")
    res = benchmark.pedantic(_run, args=(impl, *shape), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    RESULTS[(shape, impl)] = res


def teardown_module() -> None:
    if not RESULTS:
        return
    lines = [f"| N | H | V | K | {' | '.join(f'{i} s' for i in IMPLS)} | {' | '.join(f'{i} MiB' for i in IMPLS)} |",
             "|---|---|---|---|" + "---|" * (2 * len(IMPLS))]
    for n, h in SHAPES:
        row = [RESULTS.get(((n, h), i)) for i in IMPLS]
        secs = [f"{r['seconds']:.2f}" if r else "-" for r in row]
        mib = [f"{r['extra_mib']:.0f}" if r else "-" for r in row]
        lines.append(f"| {n} | {h} | {V} | {K} | " + " | ".join(secs + mib) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("ATESD_BENCH_OUT"):
        with open(os.environ["ATESD_BENCH_OUT"], "w") as f:
            f.write(table + "\n")
