"""Fused clipped-KL op vs the alternatives: forward+backward time, tokens/s, peak extra memory, TFLOP/s.

    pytest benchmarks/bench_kernels.py --benchmark -s              # CUDA if present, else small CPU shapes
    python -m benchmarks.bench_kernels --shapes 8192x4096x151936 --impls ours,liger,chunked \
        --heads frozen,trainable --out OUT/kernels.md                # what benchmarks/gpu_session.sh runs

Implementations, all computing forward KL(teacher || student) at temperature 1.1 over one LM head [V, H]:
- ours     kernels.fused_linear_kl, clip 0.06 (Triton on CUDA, native/tiled on CPU)
- ours-rows  the same op on the Triton rows path (kernels/triton_kl_rows.py: cuBLAS logits for blocks of rows
           within ATESD_TRITON_ROWS_MIB, 512 unless the command sets it); on CPU the same as ``ours``
- liger    liger-kernel's chunked ``LigerFusedLinearJSDLoss`` (beta 0 = forward KL, soft loss only; no clipping;
           it computes the head's gradient in its forward whether the head is trainable or not; torch.compile'd
           chunks on CUDA, eager on CPU)
- chunked  logits materialised for row chunks (1024 x V), autograd per chunk: the usual memory-saving torch trick
- naive    kernels.reference.linear_kl: materialised fp32 logits, the way TRL's default path computes it; skipped,
           with the reason in the table, where its ~12 fp32 N x V tensors do not fit in free memory
``head``: frozen (gradient to the student hidden states only) or trainable (the head's gradient too).

FLOP counts (matmul FLOPs, 2 per multiply-add; DESIGN 3.2). One logits matmul is 2NVH. The op recomputes logits
instead of storing them: with a finite clip (or 0 < beta < 1) its forward runs two passes over V (statistics, then
the clipped loss), each computing student and teacher logits (4NVH each), and its backward recomputes both again
(4NVH) before grad_hs = dz W (2NVH) and, for a trainable head, grad_W = dz^T hs (2NVH): 14NVH frozen, 16NVH
trainable (10 and 12 without the second pass). The rows path forms each logits block once (cuBLAS, fp32 out), reads
it back from memory for every pass, and with a frozen head forms grad_hs in its forward: 6NVH frozen, 12NVH
trainable (the backward recomputes the logits: 4 + 4 + 2 + 2). A single-pass chunked method (Liger, chunked torch)
does 6NVH frozen (8 trainable; Liger always 8). The table reports TFLOP/s on each implementation's own count, its
share of the bf16 matmul peak measured in the same run (torch.mm 8192^3), and TFLOP/s on the 6NVH yardstick, which
compares implementations by useful work per second (the same ranking as tokens/s).

Rows are appended to the output file as they are measured (a timeout loses only the row in progress); the header
names device, versions and date. ``max rel err`` compares the gradient of 64 rows with the plain-torch reference
of what the implementation computes (clipped for ours/chunked/naive, unclipped for Liger).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from atesd import kernels
from atesd.kernels.reference import linear_kl

log = logging.getLogger("benchmarks.kernels")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TEMPERATURE = 1.1
CLIP = 0.06
V_FULL = 151936
NAIVE_TENSORS = 12  # fp32 N x V tensors the materialising reference holds at its peak (forward + backward)
IMPLS = ("ours", "ours-rows", "liger", "chunked", "naive")
ROWS_MIB = "512"  # the rows path's budget in this benchmark (ours-rows), unless ATESD_TRITON_ROWS_MIB says
HEADS = ("frozen", "trainable")
if CUDA:  # (N, H, V): Qwen3-8B head at several token counts, then the 1.7B and 4B heads
    SHAPES = [(8192, 4096, V_FULL), (1024, 4096, V_FULL), (4096, 4096, V_FULL), (16384, 4096, V_FULL),
              (4096, 2048, V_FULL), (4096, 2560, V_FULL)]
else:
    SHAPES = [(1024, 256, 32768)]


# ------------------------------------------------------------------------------------------------ FLOP counts
def op_flops(n: int, h: int, v: int, *, trainable_head: bool, clip: float | None = CLIP, beta: float = 0.0) -> float:
    """Matmul FLOPs of one fused_linear_kl forward + backward (module docstring): (10|14 + 2 trainable) N V H."""
    passes = 2 if (clip is not None and math.isfinite(clip)) or 0.0 < beta < 1.0 else 1
    matmuls = 2 * passes + 2 + 1 + int(trainable_head)  # forward passes x (student, teacher), recompute, dz W, dz^T hs
    return 2.0 * matmuls * n * v * h


def impl_flops(impl: str, n: int, h: int, v: int, trainable_head: bool) -> float:
    """Each implementation's own matmul FLOPs: ours as :func:`op_flops`; single-pass ones 6NVH (+2 trainable;
    Liger computes the head's gradient either way)."""
    if impl == "ours":
        return op_flops(n, h, v, trainable_head=trainable_head)
    if impl == "ours-rows" and CUDA:
        return 2.0 * (6 if trainable_head else 3) * n * v * h
    if impl == "ours-rows":
        return op_flops(n, h, v, trainable_head=trainable_head)
    return 2.0 * (3 + int(trainable_head or impl == "liger")) * n * v * h


def yardstick_flops(n: int, h: int, v: int) -> float:
    """6NVH: logits of both sides once and grad_hs, the least any method does (frozen head)."""
    return 6.0 * n * v * h


# ------------------------------------------------------------------------------------------- implementations
def chunked_linear_kl(hs, ht, w, *, temperature, clip, chunk=1024):
    """Row-chunked torch: each chunk materialises [chunk, V] logits; gradients (hs, and the head's when it requires
    one) are taken chunk by chunk in the forward and replayed in the backward (the approach of most memory-aware
    distillation trainers). Mean over rows."""

    class _Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, t, head):
            total = torch.zeros((), device=s.device, dtype=torch.float32)
            grad_s = torch.empty_like(s)
            grad_w = torch.zeros_like(head, dtype=torch.float32) if ctx.needs_input_grad[2] else None
            for lo in range(0, s.shape[0], chunk):
                with torch.enable_grad():
                    sc = s[lo:lo + chunk].detach().requires_grad_(True)
                    wc = head.detach().requires_grad_(grad_w is not None)
                    loss = linear_kl(sc, t[lo:lo + chunk], wc, temperature=temperature, clip=clip, reduction="sum")
                    grads = torch.autograd.grad(loss, [sc, wc] if grad_w is not None else [sc])
                total += loss.detach()
                grad_s[lo:lo + chunk] = grads[0]
                if grad_w is not None:
                    grad_w += grads[1]
            ctx.save_for_backward(grad_s, grad_w)
            ctx.n, ctx.head_dtype = s.shape[0], head.dtype
            return total / ctx.n

        @staticmethod
        def backward(ctx, grad_out):
            grad_s, grad_w = ctx.saved_tensors
            scale = grad_out / ctx.n
            gw = None if grad_w is None else (grad_w * scale).to(ctx.head_dtype)
            return grad_s * scale.to(grad_s.dtype), None, gw

    return _Chunked.apply(hs, ht, w)


def _liger():
    """liger-kernel's chunked JSD loss, or None when liger-kernel is not installed."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=TEMPERATURE,
                                   compiled=CUDA)


def implementations() -> dict:
    """name -> (fn(s, t, w) -> mean loss, reference clip of what it computes); Liger only when installed."""
    impls = {
        "ours": (lambda s, t, w: kernels.fused_linear_kl(s, t, w, temperature=TEMPERATURE, clip=CLIP), CLIP),
        "ours-rows": (lambda s, t, w: kernels.fused_linear_kl(s, t, w, temperature=TEMPERATURE, clip=CLIP), CLIP),
        "chunked": (lambda s, t, w: chunked_linear_kl(s, t, w, temperature=TEMPERATURE, clip=CLIP), CLIP),
        "naive": (lambda s, t, w: linear_kl(s, t, w, temperature=TEMPERATURE, clip=CLIP), CLIP),
    }
    jsd = _liger()
    if jsd is not None:
        labels = {}

        def liger(s, t, w):
            n = s.shape[0]
            if n not in labels:
                labels[n] = torch.zeros(n, dtype=torch.long, device=s.device)  # no ignored rows
            return jsd(s, w, t, w, labels[n])

        impls["liger"] = (liger, None)
    return impls


# ------------------------------------------------------------------------------------------------ measurement
def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _describe(impl: str) -> str:
    with _path(impl):
        return kernels.describe_backend(DEVICE)


@contextlib.contextmanager
def _path(impl: str):
    """ours-rows: ATESD_TRITON_ROWS_MIB > 0 for the whole measurement (forward and backward read it); ours: 0."""
    if not impl.startswith("ours"):
        yield
        return
    old = os.environ.get("ATESD_TRITON_ROWS_MIB")
    given = old if old and float(old) > 0 else ROWS_MIB
    os.environ["ATESD_TRITON_ROWS_MIB"] = given if impl == "ours-rows" else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATESD_TRITON_ROWS_MIB")
        else:
            os.environ["ATESD_TRITON_ROWS_MIB"] = old


def inputs(n: int, h: int, v: int, trainable_head: bool):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hs = (torch.randn(n, h, device=DEVICE, generator=g) * 2).to(DTYPE)
    ht = (hs.float() + torch.randn(n, h, device=DEVICE, generator=g)).to(DTYPE)
    w = (torch.randn(v, h, device=DEVICE, generator=g) / h**0.5).to(DTYPE).requires_grad_(trainable_head)
    return hs, ht, w


def free_bytes() -> int:
    if CUDA:
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def naive_skip_reason(n: int, v: int) -> str | None:
    """Why the materialising reference cannot run at this shape (None: it fits)."""
    need, free = NAIVE_TENSORS * n * v * 4, free_bytes()
    if need > 0.9 * free:
        return f"skipped: needs ~{need / 2**30:.0f} GiB ({NAIVE_TENSORS} fp32 N x V), {free / 2**30:.0f} GiB free"
    return None


def matmul_peak_tflops() -> tuple[float, str]:
    """(TFLOP/s, what was measured): bf16 torch.mm 8192^3 on CUDA; fp32 512^3 on CPU (so the column exists)."""
    size, dtype = (8192, torch.bfloat16) if CUDA else (512, torch.float32)
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    reps = 20 if CUDA else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync()
    tflops = 2 * size**3 * reps / (time.perf_counter() - t0) / 1e12
    return tflops, f"torch.mm {str(dtype).removeprefix('torch.')} {size}^3"


def max_rel_err(fn, ref_clip, hs, ht, w, rows: int = 64) -> float:
    """max |grad - grad_ref| / max |grad_ref| over the first and last rows/2 rows of grad_hs (mean loss)."""
    n = hs.shape[0]
    idx = torch.cat([torch.arange(min(rows // 2, n)), torch.arange(max(n - rows // 2, 0), n)]).unique().to(DEVICE)
    s = hs.detach().clone().requires_grad_(True)
    fn(s, ht, w.detach()).backward()
    sr = hs[idx].detach().float().requires_grad_(True)
    ref = linear_kl(sr, ht[idx].float(), w.detach().float(), temperature=TEMPERATURE, clip=ref_clip, reduction="sum")
    (ref / n).backward()
    want = sr.grad
    return float((s.grad[idx].float() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def measure(impl: str, n: int, h: int, v: int, trainable_head: bool, rounds: int) -> dict:
    """One row: median fwd+bwd seconds over ``rounds`` after a warm-up (autotuning, compiles), peak extra memory,
    gradient error; or a row with ``error`` naming why it did not run."""
    with _path(impl):
        return _measure(impl, n, h, v, trainable_head, rounds)


def _measure(impl: str, n: int, h: int, v: int, trainable_head: bool, rounds: int) -> dict:
    row = dict(N=n, H=h, V=v, head="trainable" if trainable_head else "frozen", impl=impl)
    impls = implementations()
    if impl not in impls:
        return dict(row, error="skipped: liger-kernel not installed" if impl == "liger" else f"unknown impl {impl}")
    if impl == "naive":
        reason = naive_skip_reason(n, v)
        if reason:
            log.warning("bench_kernels: naive at N=%d V=%d %s", n, v, reason)
            return dict(row, error=reason)
    fn, ref_clip = impls[impl]
    hs, ht, w = inputs(n, h, v, trainable_head)

    def run():
        s = hs.detach().requires_grad_(True)
        w.grad = None
        fn(s, ht, w).backward()
        _sync()

    try:
        run()  # warm-up: Triton autotuning, torch.compile, the allocator
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        run()
        mib = (torch.cuda.max_memory_allocated() - base) / 2**20 if CUDA else float("nan")
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        err = max_rel_err(fn, ref_clip, hs, ht, w)
    except torch.OutOfMemoryError:
        return dict(row, error="OOM")
    finally:
        w.grad = None
    times.sort()
    return dict(row, seconds=times[len(times) // 2], mib=mib, err=err)


class Table:
    """A markdown table written row by row: the header when created, each row appended (and flushed) at once."""

    COLUMNS = ("N", "H", "V", "head", "impl", "fwd+bwd ms", "tokens/s", "peak extra MiB", "own FLOPs",
               "TFLOP/s (own)", "% of matmul peak", "TFLOP/s (6NVH)", "max rel err")

    def __init__(self, path: str | os.PathLike | None, peak: float, peak_what: str, command: str) -> None:
        self.path, self.peak = (Path(path) if path else None), peak
        try:
            import triton

            triton_v = triton.__version__
        except ImportError:
            triton_v = "none"
        device = torch.cuda.get_device_name() if CUDA else "CPU"
        head = [
            f"device: {device}; torch {torch.__version__}; triton {triton_v}; "
            f"dtype {str(DTYPE).removeprefix('torch.')}; "
            f"T {TEMPERATURE}, clip {CLIP} (ours, chunked, naive); date {time.strftime('%Y-%m-%d %H:%M')}; "
            f"ours: {_describe('ours')}; ours-rows: {_describe('ours-rows')}",
            f"matmul peak ({peak_what}): {peak:.3g} TFLOP/s; command: `{command}`",
            "",
            "| " + " | ".join(self.COLUMNS) + " |",
            "|" + "---|" * len(self.COLUMNS),
        ]
        self._write("\n".join(head) + "\n", "w")

    def _write(self, text: str, mode: str = "a") -> None:
        print(text, end="", flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, mode) as fh:
                fh.write(text)

    def add(self, r: dict) -> None:
        lead = f"| {r['N']} | {r['H']} | {r['V']} | {r['head']} | {r['impl']} |"
        if r.get("error"):
            self._write(lead + f" {r['error']} |" + " |" * (len(self.COLUMNS) - 6) + "\n")
            return
        n, h, v, sec = r["N"], r["H"], r["V"], r["seconds"]
        own = impl_flops(r["impl"], n, h, v, r["head"] == "trainable")
        tf = own / sec / 1e12
        mem = f"{r['mib']:.0f}" if r["mib"] == r["mib"] else "n/a"
        cells = [f"{sec * 1e3:.1f}", f"{n / sec:.0f}", mem, f"{own / (n * v * h):.0f}NVH", f"{tf:.3g}",
                 f"{100 * tf / self.peak:.0f}%", f"{yardstick_flops(n, h, v) / sec / 1e12:.3g}", f"{r['err']:.1e}"]
        self._write(lead + " " + " | ".join(cells) + " |\n")


def parse_shape(text: str) -> tuple[int, int, int]:
    n, h, v = (int(x) for x in text.lower().split("x"))
    return n, h, v


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="x".join(map(str, SHAPES[0])), help="comma-separated NxHxV")
    ap.add_argument("--impls", default="ours,liger,chunked,naive")
    ap.add_argument("--heads", default="frozen,trainable")
    ap.add_argument("--rounds", type=int, default=5 if CUDA else 2)
    ap.add_argument("--out", default=None, help="markdown file, written row by row (default: print only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    impls = args.impls.split(",")
    heads = args.heads.split(",")
    for name in impls + heads:
        if name not in IMPLS + HEADS:
            ap.error(f"unknown impl or head {name!r} (impls: {', '.join(IMPLS)}; heads: {', '.join(HEADS)})")
    peak, what = matmul_peak_tflops()
    command = "python -m benchmarks.bench_kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    table = Table(args.out, peak, what, command)
    for shape in map(parse_shape, args.shapes.split(",")):
        for head in heads:
            for impl in impls:
                table.add(measure(impl, *shape, head == "trainable", args.rounds))


# ------------------------------------------------------------------------------------------ pytest-benchmark
@pytest.fixture(scope="module")
def table():
    peak, what = matmul_peak_tflops()
    out = os.environ.get("ATESD_BENCH_OUT", f"benchmarks/results/kernels-{DEVICE}.md")
    return Table(out, peak, what, "pytest benchmarks/bench_kernels.py --benchmark -s")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("head", ["frozen"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd_bwd(benchmark, table, shape, head, impl):
    row = benchmark.pedantic(measure, args=(impl, *shape, head == "trainable", 5 if CUDA else 2), rounds=1,
                             iterations=1)
    table.add(row)
    if row.get("error"):
        pytest.skip(row["error"])
    benchmark.extra_info.update(row)


if __name__ == "__main__":
    main()
