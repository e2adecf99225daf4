"""The op's two backwards side by side (issue 23): the fused one (dz W and dz^T hs in the kernel, fp32 atomics) and
the workspace one (``_dz_kernel`` writes dz for a block of rows, cuBLAS multiplies), at several workspace sizes.

    python -m benchmarks.bench_bwd_workspace --out OUT/workspace.md          # CUDA: N=8192, H=4096, V=151936, bf16
    TRITON_INTERPRET=1 python -m benchmarks.bench_bwd_workspace --shape 64x32x300 --mib 0,0.02   # CPU dry run

The 2026-12-04 profile (RESULTS.md section 15) put the fused backward's ``dz W`` and its atomics at 19% of the
matmul peak and ``dz^T hs`` with its atomics at 8%: each (token tile, vocab tile) pair adds a [BLOCK_N, H] (and a
[BLOCK_V, H]) fp32 block to global memory, so the atomics, not the tensor cores, set the pace. The workspace
backward trades a bounded buffer (``ATESD_TRITON_BWD_WORKSPACE_MIB``: rows x V elements of the input dtype, whatever
N is) for cuBLAS products. Per row of the table: the backward's median ms over ``--rounds`` after a warm-up
(autotuning), the forward + backward's tokens/s (the forward measured once, the same for every row), peak memory
above the inputs and the forward's outputs during the backward (accumulators and workspace), and the largest
difference to the fused backward's grad_hs and grad_w relative to their largest entry. Inputs, T and clip are those
of ``benchmarks/bench_kernels.py``; the upstream gradient is the mean's (1/N per token).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from atesd.kernels import triton_kl
from benchmarks.bench_kernels import CLIP, TEMPERATURE, inputs, matmul_peak_tflops, parse_shape

CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _backward(mib: float, grad, hs, ht, w, saved, need_w: bool):
    os.environ["ATESD_TRITON_BWD_WORKSPACE_MIB"] = str(mib)
    out = triton_kl.backward(grad, hs, ht, w, None, None, None, *saved, TEMPERATURE, CLIP, 0.0, need_w, False)
    _sync()
    return out


def measure(shape: tuple[int, int, int], mibs: list[float], rounds: int, report) -> list[dict]:
    n, h, v = shape
    hs, ht, w = inputs(n, h, v, trainable_head=False)
    w = w.detach()
    grad = torch.full((n,), 1.0 / n, device=hs.device)
    triton_kl.forward(hs, ht, w, None, None, None, TEMPERATURE, CLIP, 0.0)  # autotune the forward
    _sync()
    t0 = time.perf_counter()
    fwd = triton_kl.forward(hs, ht, w, None, None, None, TEMPERATURE, CLIP, 0.0)
    _sync()
    fwd_s = time.perf_counter() - t0
    saved = (fwd[2], fwd[3], fwd[4])
    rows, base = [], {}
    for need_w in (False, True):
        head = "trainable" if need_w else "frozen"
        for mib in mibs:
            _backward(mib, grad, hs, ht, w, saved, need_w)  # warm-up: autotuning, cuBLAS handles
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            ghs, gw, _ = _backward(mib, grad, hs, ht, w, saved, need_w)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if CUDA else float("nan")
            times = []
            for _ in range(rounds):
                del ghs, gw
                t0 = time.perf_counter()
                ghs, gw, _ = _backward(mib, grad, hs, ht, w, saved, need_w)
                times.append(time.perf_counter() - t0)
            if mib == 0:
                base[head] = (ghs.float(), gw)
            ref_hs, ref_w = base.get(head, (None, None))

            def rel(got, want):
                if want is None or want.numel() == 0:
                    return float("nan")
                return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30))

            bwd_s = statistics.median(times)
            row = dict(head=head, mib=mib, rows=triton_kl.workspace_rows(n, v, hs.dtype), bwd_ms=bwd_s * 1e3,
                       tokens_s=n / (fwd_s + bwd_s), peak_mib=peak, err_hs=rel(ghs, ref_hs), err_w=rel(gw, ref_w))
            rows.append(row)
            report(row)
            del ghs, gw
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    shape = parse_shape(args.shape)
    mibs = [float(x) for x in args.mib.split(",")]
    if mibs[0] != 0:
        mibs = [0.0] + mibs  # the fused backward first: the reference of the error columns
    peak, peak_what = matmul_peak_tflops()
    n, h, v = shape
    given = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"device: {torch.cuda.get_device_name() if CUDA else 'cpu (interpreter: timings mean nothing)'}; "
             f"torch {torch.__version__}; N={n}, H={h}, V={v}, bf16, T {TEMPERATURE}, clip {CLIP}, beta 0; "
             f"{time.strftime('%Y-%m-%d %H:%M')}; matmul peak ({peak_what}): {peak:.0f} TFLOP/s",
             f"command: `python -m benchmarks.bench_bwd_workspace {given}`",
             "",
             "| head | backward | rows per block | backward ms | fwd+bwd tokens/s | peak extra MiB (backward) | "
             "grad_hs err vs fused | grad_w err vs fused |",
             "|---|---|---|---|---|---|---|---|"]

    def write() -> None:
        text = "\n".join(lines) + "\n"
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text)

    def report(r: dict) -> None:
        kind = "fused (atomics)" if r["mib"] == 0 else f"workspace {r['mib']:g} MiB"
        lines.append(f"| {r['head']} | {kind} | {r['rows'] or ''} | {r['bwd_ms']:.1f} | {r['tokens_s']:.0f} | "
                     f"{r['peak_mib']:.0f} | {r['err_hs']:.1e} | {r['err_w']:.1e} |")
        print(lines[-1], flush=True)
        write()

    print("\n".join(lines), flush=True)
    write()
    return measure(shape, mibs, args.rounds, report)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8192x4096x151936", help="NxHxV (default: the Qwen3-8B head at N=8192)")
    ap.add_argument("--mib", default="0,128,256,512,1024",
                    help="workspace sizes in MiB, comma-separated; 0 = the fused backward (always measured first)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="markdown file, rewritten after every row")
    return ap


if __name__ == "__main__":
    main()
