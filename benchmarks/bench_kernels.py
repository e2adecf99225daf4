"""Fused clipped-KL op vs the alternatives: forward+backward time, peak extra memory, TFLOP/s.

    pytest benchmarks/bench_kernels.py --benchmark -s            # CUDA if present, else small CPU shapes

Implementations, all computing forward KL(teacher || student) at temperature 1.1 over one LM head:
- ours     kernels.fused_linear_kl (clip as in the recipe; Triton on CUDA, native/tiled on CPU)
- naive    kernels.reference.linear_kl: materialised fp32 logits, the way TRL's default path computes it
- chunked  logits materialised for row chunks (chunk x V), autograd per chunk: the usual memory-saving torch trick
- liger    liger_kernel's LigerFusedLinearJSD(jsd_beta=0) (CUDA only; it has no clipping)
TFLOP/s counts the minimum work of DESIGN 3.2: 6*H*V per token with a frozen head (8*H*V with a trainable one).
The table is printed at the end and written to $ATESD_BENCH_OUT (default benchmarks/results/kernels-<device>.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from atesd import kernels
from atesd.kernels.reference import linear_kl

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TEMPERATURE = 1.1
CLIP = 0.06
V_FULL = 151936
if CUDA:  # (N, H, V): Qwen3-8B head at several token counts, then the 1.7B and 4B heads
    SHAPES = [(8192, 4096, V_FULL), (1024, 4096, V_FULL), (4096, 4096, V_FULL), (16384, 4096, V_FULL),
              (4096, 2048, V_FULL), (4096, 2560, V_FULL)]
else:
    SHAPES = [(1024, 256, 32768)]
ROWS: list[dict] = []


def chunked_linear_kl(hs, ht, w, *, temperature, clip, chunk=1024):
    """Row-chunked torch: each chunk materialises [chunk, V] logits; gradients are taken chunk by chunk in the
    forward and replayed in the backward (the approach of most memory-aware distillation trainers)."""

    class _Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, t, head):
            total = torch.zeros((), device=s.device, dtype=torch.float32)
            grad_s = torch.empty_like(s)
            for lo in range(0, s.shape[0], chunk):
                with torch.enable_grad():
                    sc = s[lo:lo + chunk].detach().requires_grad_(True)
                    loss = linear_kl(sc, t[lo:lo + chunk], head, temperature=temperature, clip=clip, reduction="sum")
                    (g,) = torch.autograd.grad(loss, [sc])
                total += loss.detach()
                grad_s[lo:lo + chunk] = g
            ctx.save_for_backward(grad_s)
            ctx.n = s.shape[0]
            return total / ctx.n

        @staticmethod
        def backward(ctx, grad_out):
            (grad_s,) = ctx.saved_tensors
            return grad_s * (grad_out / ctx.n).to(grad_s.dtype), None, None

    return _Chunked.apply(hs, ht, w)


def _impls():
    impls = {
        "ours": lambda s, t, w: kernels.fused_linear_kl(s, t, w, temperature=TEMPERATURE, clip=CLIP),
        "naive": lambda s, t, w: linear_kl(s, t, w, temperature=TEMPERATURE, clip=CLIP),
        "chunked": lambda s, t, w: chunked_linear_kl(s, t, w, temperature=TEMPERATURE, clip=CLIP),
    }
    if CUDA:
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD

            jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)
            impls["liger"] = lambda s, t, w: jsd(s, w, t, w, None)
        except ImportError:
            pass
    return impls


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _inputs(n, h, v):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hs = (torch.randn(n, h, device=DEVICE, generator=g) * 2).to(DTYPE)
    ht = (hs.float() + torch.randn(n, h, device=DEVICE, generator=g)).to(DTYPE)
    w = (torch.randn(v, h, device=DEVICE, generator=g) / h**0.5).to(DTYPE)
    return hs, ht, w


def _matmul_peak_tflops() -> float:
    if not CUDA:
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12


@pytest.fixture(scope="module", autouse=True)
def report():
    peak = _matmul_peak_tflops()
    yield
    lines = [
        f"device: {torch.cuda.get_device_name() if CUDA else 'CPU'}; torch {torch.__version__}; dtype {DTYPE}; "
        f"bf16 matmul peak (torch.mm 8192^3): {peak:.0f} TFLOP/s; date {time.strftime('%Y-%m-%d')}",
        "",
        "| N | H | V | impl | fwd+bwd ms | peak extra MiB | TFLOP/s (6HV/token) | % matmul peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        if r.get("error"):
            lines.append(f"| {r['N']} | {r['H']} | {r['V']} | {r['impl']} | {r['error']} | | | |")
            continue
        tf = 6 * r["H"] * r["V"] * r["N"] / (r["ms"] / 1e3) / 1e12
        pct = f"{100 * tf / peak:.0f}%" if CUDA else "n/a"
        mem = f"{r['mib']:.0f}" if r["mib"] == r["mib"] else "n/a"
        lines.append(f"| {r['N']} | {r['H']} | {r['V']} | {r['impl']} | {r['ms']:.1f} | {mem} | {tf:.1f} | {pct} |")
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(os.environ.get("ATESD_BENCH_OUT", f"benchmarks/results/kernels-{DEVICE}.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("impl", ["ours", "liger", "chunked", "naive"])
def test_fwd_bwd(benchmark, shape, impl):
    n, h, v = shape
    impls = _impls()
    if impl not in impls:
        pytest.skip(f"{impl} unavailable on {DEVICE}")
    if CUDA and impl == "naive" and n * v * 4 * 12 > torch.cuda.get_device_properties(0).total_memory:
        ROWS.append(dict(N=n, H=h, V=v, impl=impl, error="skipped: needs >12 fp32 N x V tensors (OOM)"))
        pytest.skip("naive would exceed GPU memory")
    fn = impls[impl]
    hs, ht, w = _inputs(n, h, v)

    def run():
        s = hs.detach().requires_grad_(True)
        fn(s, ht, w).backward()
        _sync()

    try:
        run()  # warm-up (Triton autotuning, allocator)
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            mib = float("nan")
        benchmark.pedantic(run, rounds=5 if CUDA else 2, iterations=1, warmup_rounds=0)
    except torch.OutOfMemoryError:
        ROWS.append(dict(N=n, H=h, V=v, impl=impl, error="OOM"))
        pytest.skip("out of memory")
    ROWS.append(dict(N=n, H=h, V=v, impl=impl, ms=benchmark.stats.stats.median * 1e3, mib=mib))
