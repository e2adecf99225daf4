"""The rows path of the Triton backend: cuBLAS logits for a bounded block of rows, Triton for the pointwise math.

Opt-in (``ATESD_TRITON_ROWS_MIB`` > 0; default 0: the tile path of ``triton_kl.py``). Same contract (``_ops.py``),
different trade: the tile path recomputes logits inside its own Triton matmul loops (two forward passes plus the
backward's recompute, at most 67% of the bf16 matmul peak on an H200, RESULTS.md section 17), while this path
lets cuBLAS write a block's logits once, in fp32, into a workspace of at most ``ATESD_TRITON_ROWS_MIB`` MiB
(rows x V x 10 bytes for bf16/fp16 inputs, 12 for fp32: fp32 zs and zt, and dz in the input dtype; the size never
grows with N), and reads them back from memory as often as the clip needs:

    forward, per block of rows:   zs = hs W^T, zt = ht Wt^T            (cuBLAS, fp32 out: 4 R V H FLOPs)
                                  _rows_fwd_kernel: pass 1 lse, argmax; pass 2 loss, kl, g, entropy;
                                  with ``want_grad_hs``, pass 3 dz1 = (c gp - ps g) / T and gh1 = dz1 W (cuBLAS)
    backward, per block of rows:  zs, zt again (cuBLAS), _rows_dz_kernel: dz = grad (c gp - ps g) / T,
                                  grad_hs = dz W, grad_w += dz^T hs (cuBLAS), grad_b += column sums of dz

``want_grad_hs`` is the frozen-head case (``linear_kl.py``: hs needs a gradient, the head and bias do not): the
forward then returns gh1 = d(sum_n loss[n])/d hs [N, H] fp32 too and the backward only scales its rows by
grad[n] (dz is linear in grad[n]), so the frozen head costs 6NVH of cuBLAS work in all instead of the tile path's
14NVH; a trainable head costs 12NVH (its grad_w needs grad[n], known only in the backward). The pointwise passes
read 8 bytes per logit each, memory-bound work beside the matmuls.

Why a separate path and not the default: it has not run on a GPU yet (benchmarks/gpu_session.sh measures it,
``ours-rows`` in step c, and checks it in step b); the tile path's figures are measured.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from atesd.kernels.triton_kl import (
    _INTERPRET,
    _NEG,
    _accumulate_grad_w,
    _check,
    _clipped_sums,
    _common,
    _log_once,
    _pointwise,
)

_MM_FP32_OK: dict = {}
_DIRECT_MIB = 512.0  # the budget of a direct call (tests, benchmarks) while the knob is 0


def rows_mib() -> float:
    """ATESD_TRITON_ROWS_MIB as a number (default 0: the tile path); a one-line error for anything else."""
    raw = os.environ.get("ATESD_TRITON_ROWS_MIB", "0").strip() or "0"
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"ATESD_TRITON_ROWS_MIB must be a number of MiB (0: the tile path), got {raw!r}") from None
    if not math.isfinite(mib) or mib < 0:
        raise ValueError(f"ATESD_TRITON_ROWS_MIB must be finite and >= 0, got {raw!r}")
    return mib


def block_rows(n: int, v: int, dtype: torch.dtype, mib: float | None = None) -> int:
    """Rows per block within ``mib`` (default ATESD_TRITON_ROWS_MIB): mib // (V x (8 + dz element) bytes), a
    multiple of 64 (at least 64), at most n; 0 when the path is off."""
    mib = rows_mib() if mib is None else mib
    if mib <= 0:
        return 0
    row_bytes = v * (8 + torch.empty((), dtype=dtype).element_size())
    return min(max(64, int(mib * 2**20) // row_bytes // 64 * 64), n)


# ----------------------------------------------------------------------------------------------------------
# kernels: one program per BLOCK_R rows, walking the stored logits BLOCK_V columns at a time


def _row_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_R": 2, "BLOCK_V": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_R": r, "BLOCK_V": bv}, num_warps=w)
            for r, bv, w in ((1, 2048, 8), (1, 4096, 8), (2, 2048, 8), (1, 1024, 4))]


@triton.jit
def _load_logits(z_ptr, b_ptr, offs, cols, valid, V, inv_t, HAS_B: tl.constexpr):
    """fp32 (z + b) / T on a [BLOCK_R, BLOCK_V] tile of stored logits; -inf outside ``valid``."""
    z = tl.load(z_ptr + offs, mask=valid, other=0.0)
    if HAS_B:
        z += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return tl.where(valid, z * inv_t, float("-inf"))


@triton.jit
def _dz_tile(zs, zt, lse_s, lse_t, gn, valid, clip, beta, log_beta, log_1mbeta, MODE: tl.constexpr,
             HAS_CLIP: tl.constexpr):
    """c gp - ps g[n] on a tile (the logit gradient before the grad[n] / T scale); 0 outside ``valid``."""
    lv, gp, ps = _pointwise(zs, zt, lse_s, lse_t, valid, beta, log_beta, log_1mbeta, MODE)
    if HAS_CLIP:
        gp = tl.where(lv > clip, 0.0, gp)
    return tl.where(valid, gp - ps * gn[:, None], 0.0)


@triton.autotune(configs=_row_configs(), key=["V", "MODE", "HAS_CLIP", "WRITE_DZ"])
@triton.jit
def _rows_fwd_kernel(zs_ptr, zt_ptr, bs_ptr, bt_ptr, out_ptr, dz_ptr, N, V, out_stride, inv_t, clip, beta, log_beta,
                     log_1mbeta, MODE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
                     WRITE_DZ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Contract forward outputs of N rows of stored logits into out_ptr [8, out_stride] (loss, kl, lse_s, lse_t, g,
    agree, maxp, ent); with WRITE_DZ, dz_ptr [N, V] (its dtype) gets (c gp - ps g) / T of every row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    row_off = rows.to(tl.int64) * V
    ms = tl.full((BLOCK_R,), _NEG, tl.float32)
    mt = tl.full((BLOCK_R,), _NEG, tl.float32)
    ds = tl.zeros((BLOCK_R,), tl.float32)
    dt = tl.zeros((BLOCK_R,), tl.float32)
    es = tl.zeros((BLOCK_R,), tl.float32)  # sum exp(zs - ms)(zs - ms): the entropy from differences to the max
    idx_s = tl.zeros((BLOCK_R,), tl.int32)
    idx_t = tl.zeros((BLOCK_R,), tl.int32)
    for v0 in range(0, V, BLOCK_V):  # pass 1: online max, sum-exp, first arg-max (and the entropy's sum)
        cols = v0 + tl.arange(0, BLOCK_V)
        valid = rmask[:, None] & (cols < V)[None, :]
        offs = row_off[:, None] + cols[None, :]
        zs = _load_logits(zs_ptr, bs_ptr, offs, cols, valid, V, inv_t, HAS_BS)
        zt = _load_logits(zt_ptr, bt_ptr, offs, cols, valid, V, inv_t, HAS_BT)
        tmax_s = tl.max(zs, 1)
        tmax_t = tl.max(zt, 1)
        # NaN reads as -inf for the arg-max only; strict '>' keeps the first index on ties across tiles
        idx_s = tl.where(tmax_s > ms, tl.argmax(tl.where(zs == zs, zs, float("-inf")), 1) + v0, idx_s)
        idx_t = tl.where(tmax_t > mt, tl.argmax(tl.where(zt == zt, zt, float("-inf")), 1) + v0, idx_t)
        ms_new = tl.maximum(ms, tmax_s)
        mt_new = tl.maximum(mt, tmax_t)
        a_s = tl.exp(ms - ms_new)
        xs = tl.where(valid, zs - ms_new[:, None], 0.0)
        us = tl.where(valid, tl.exp(xs), 0.0)
        es = a_s * (es + (ms - ms_new) * ds) + tl.sum(us * xs, 1)  # re-based to the new max, as in _stats_kernel
        ds = a_s * ds + tl.sum(us, 1)
        dt = dt * tl.exp(mt - mt_new) + tl.sum(tl.where(valid, tl.exp(zt - mt_new[:, None]), 0.0), 1)
        ms = ms_new
        mt = mt_new
    ds = tl.where(rmask, ds, 1.0)  # rows past N: no log(0)
    lse_s = ms + tl.log(ds)
    lse_t = mt + tl.log(tl.where(rmask, dt, 1.0))
    loss = tl.zeros((BLOCK_R,), tl.float32)
    kl = tl.zeros((BLOCK_R,), tl.float32)
    g = tl.zeros((BLOCK_R,), tl.float32)
    for v0 in range(0, V, BLOCK_V):  # pass 2: the pointwise terms at the final log-sum-exps
        cols = v0 + tl.arange(0, BLOCK_V)
        valid = rmask[:, None] & (cols < V)[None, :]
        offs = row_off[:, None] + cols[None, :]
        zs = _load_logits(zs_ptr, bs_ptr, offs, cols, valid, V, inv_t, HAS_BS)
        zt = _load_logits(zt_ptr, bt_ptr, offs, cols, valid, V, inv_t, HAS_BT)
        lv, gp, ps = _pointwise(zs, zt, lse_s, lse_t, valid, beta, log_beta, log_1mbeta, MODE)
        kl += tl.sum(lv, 1)
        loss_tile, g_tile = _clipped_sums(lv, gp, clip, HAS_CLIP)
        loss += loss_tile
        g += g_tile
    out = out_ptr + rows
    tl.store(out, loss, mask=rmask)
    tl.store(out + out_stride, kl, mask=rmask)
    tl.store(out + 2 * out_stride, lse_s, mask=rmask)
    tl.store(out + 3 * out_stride, lse_t, mask=rmask)
    tl.store(out + 4 * out_stride, g, mask=rmask)
    tl.store(out + 5 * out_stride, (idx_s == idx_t).to(tl.float32), mask=rmask)
    tl.store(out + 6 * out_stride, tl.exp(ms - lse_s), mask=rmask)
    tl.store(out + 7 * out_stride, tl.log(ds) - es / ds, mask=rmask)  # -sum ps log ps, |z| ~ 1e4 included
    if WRITE_DZ:  # pass 3: the logit gradient at unit upstream gradient
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            valid = rmask[:, None] & (cols < V)[None, :]
            offs = row_off[:, None] + cols[None, :]
            zs = _load_logits(zs_ptr, bs_ptr, offs, cols, valid, V, inv_t, HAS_BS)
            zt = _load_logits(zt_ptr, bt_ptr, offs, cols, valid, V, inv_t, HAS_BT)
            dz = _dz_tile(zs, zt, lse_s, lse_t, g, valid, clip, beta, log_beta, log_1mbeta, MODE, HAS_CLIP) * inv_t
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=valid)


@triton.autotune(configs=_row_configs(), key=["V", "MODE", "HAS_CLIP"])
@triton.jit
def _rows_dz_kernel(zs_ptr, zt_ptr, bs_ptr, bt_ptr, grad_ptr, lse_s_ptr, lse_t_ptr, g_ptr, dz_ptr, N, V, inv_t, clip,
                    beta, log_beta, log_1mbeta, MODE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BS: tl.constexpr,
                    HAS_BT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """The backward's dz [N, V] (its dtype) = grad[n] (c gp - ps g[n]) / T from stored logits; exactly 0 on rows
    with grad[n] == 0, whatever their logits hold."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    row_off = rows.to(tl.int64) * V
    lse_s = tl.load(lse_s_ptr + rows, mask=rmask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=rmask, other=0.0)
    gn = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=rmask, other=0.0)
    live = rmask & (grad != 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        inside = rmask[:, None] & (cols < V)[None, :]
        valid = live[:, None] & inside
        offs = row_off[:, None] + cols[None, :]
        zs = _load_logits(zs_ptr, bs_ptr, offs, cols, valid, V, inv_t, HAS_BS)
        zt = _load_logits(zt_ptr, bt_ptr, offs, cols, valid, V, inv_t, HAS_BT)
        dz = _dz_tile(zs, zt, lse_s, lse_t, gn, valid, clip, beta, log_beta, log_1mbeta, MODE, HAS_CLIP)
        tl.store(dz_ptr + offs, (dz * (grad * inv_t)[:, None]).to(dz_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------------------
# host wrappers


def _fp32_mm_kind(device: torch.device) -> str | None:
    """Which one-call fp32-output product for bf16 operands runs on this device: "mm" (``aten::mm.dtype_out``,
    torch >= 2.8), "addmm" (``aten::addmm.dtype_out`` with beta 0, what the workspace backward runs) or None;
    checked once per device type on a small case against an fp32 product (outside autocast, which would round the
    reference to bf16; the check reads one value back to the host, once per process)."""
    if device.type not in _MM_FP32_OK:
        kind = None
        with torch.autocast(device.type, enabled=False):
            a = torch.randn(64, 48, device=device).to(torch.bfloat16)
            b = torch.randn(48, 32, device=device).to(torch.bfloat16)
            want = a.float() @ b.float()
            for name in ("mm", "addmm"):
                out = torch.full((64, 32), float("nan"), device=device)  # beta 0 must ignore what out held
                try:
                    _FP32_MM[name](a, b, out)
                    if torch.allclose(out, want, rtol=1e-4, atol=1e-4):
                        kind = name
                        break
                except Exception:  # noqa: BLE001 (an overload missing from this torch, or no kernel for the device)
                    continue
        _MM_FP32_OK[device.type] = kind
    return _MM_FP32_OK[device.type]


_FP32_MM = {
    "mm": lambda a, b, out: torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out),
    "addmm": lambda a, b, out: torch.ops.aten.addmm.dtype_out(out, a, b, torch.float32, beta=0, out=out),
}
_COPY_SLICE = 8192  # the fallback's fp32 copies: at most this many vocabulary entries of an operand at a time


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out [M, P] fp32 = a [M, K] @ b [K, P] with fp32 accumulation, whatever the operands' float dtype (fp32
    operands: torch.mm under torch's own matmul precision setting). Where the device has no fp32-output product for
    half operands, through fp32 copies of slices of the vocabulary dimension (P for the logits, K for dz W), so the
    extra memory stays bounded (logged once: slower)."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
        return
    kind = _fp32_mm_kind(a.device)
    if kind:
        _FP32_MM[kind](a, b, out)
        return
    _log_once("rows-fp32-out", f"the rows path multiplies through fp32 copies on {a.device.type} (no "
              f"{a.dtype} x {a.dtype} -> fp32 mm there): slower", slower=True)
    if b.shape[1] >= b.shape[0]:  # the vocabulary is P: fill out by column slices
        a32 = a.float()
        for lo in range(0, b.shape[1], _COPY_SLICE):
            torch.mm(a32, b[:, lo:lo + _COPY_SLICE].float(), out=out[:, lo:lo + _COPY_SLICE])
    else:  # the vocabulary is K: sum the slices' products
        out.zero_()
        for lo in range(0, b.shape[0], _COPY_SLICE):
            out.addmm_(a[:, lo:lo + _COPY_SLICE].float(), b[lo:lo + _COPY_SLICE].float())


class _Blocks:
    """The rows path's workspace and per-block logits: fp32 zs, zt [R, V] and dz [R, V] in the input dtype."""

    def __init__(self, hs, ht, w, wt, bs, bt, temperature, clip, beta) -> None:
        self.hs, self.ht, self.w = hs.contiguous(), ht.contiguous(), w.contiguous()
        self.wt = self.w if wt is None else wt.contiguous()
        self.n, self.v = hs.shape[0], w.shape[0]
        self.rows = rows = (block_rows(self.n, self.v, hs.dtype)
                            or block_rows(self.n, self.v, hs.dtype, _DIRECT_MIB))
        ptrs, sc = _common(hs, ht, w, wt, bs, bt, temperature, clip, beta)  # the tile path's scalars, as they are
        self.bias = ptrs[4:]
        self.scalars = tuple(sc[k] for k in ("inv_t", "clip", "beta", "log_beta", "log_1mbeta"))
        self.flags = {k: sc[k] for k in ("MODE", "HAS_CLIP", "HAS_BS", "HAS_BT")}
        dev = hs.device
        self.zs = torch.empty((rows, self.v), device=dev, dtype=torch.float32)
        self.zt = torch.empty((rows, self.v), device=dev, dtype=torch.float32)
        self.dz = torch.empty((rows, self.v), device=dev, dtype=hs.dtype)
        _log_once("rows", f"the fused op's rows path materialises logits for {rows} rows at a time "
                  f"({rows * self.v * (8 + hs.element_size()) / 2**20:.3g} MiB, ATESD_TRITON_ROWS_MIB)")

    def __iter__(self):
        """(lo, hi, zs, zt, dz) per block, zs and zt holding the block's raw logits (before bias and 1/T)."""
        for lo in range(0, self.n, self.rows):
            hi = min(lo + self.rows, self.n)
            zs, zt, dz = self.zs[:hi - lo], self.zt[:hi - lo], self.dz[:hi - lo]
            _mm_fp32(self.hs[lo:hi], self.w.t(), zs)
            _mm_fp32(self.ht[lo:hi], self.wt.t(), zt)
            yield lo, hi, zs, zt, dz


def forward(hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, wt: torch.Tensor | None, bs: torch.Tensor | None,
            bt: torch.Tensor | None, temperature: float, clip: float, beta: float, want_grad_hs: bool = False):
    """Contract forward (``_ops.py``): 8 [N] fp32 tensors; with ``want_grad_hs`` a 9th, gh1 [N, H] fp32 =
    d(sum_n loss[n]) / d hs (unit upstream gradient on every row, NaN rows included)."""
    _check(hs, ht, w, wt, bs, bt)
    n, h = hs.shape
    out = torch.empty((8, n), device=hs.device, dtype=torch.float32)
    gh1 = torch.empty((n, h) if want_grad_hs else (0,), device=hs.device, dtype=torch.float32)
    if n > 0:
        blocks = _Blocks(hs, ht, w, wt, bs, bt, temperature, clip, beta)
        for lo, hi, zs, zt, dz in blocks:
            grid = lambda meta: (triton.cdiv(hi - lo, meta["BLOCK_R"]),)  # noqa: E731, B023
            _rows_fwd_kernel[grid](zs, zt, *blocks.bias, out[:, lo:], dz, hi - lo, blocks.v, n, *blocks.scalars,
                                   WRITE_DZ=want_grad_hs, **blocks.flags)
            if want_grad_hs:
                _mm_fp32(dz, blocks.w, gh1[lo:hi])
    outs = tuple(t.clone() for t in out.unbind(0))  # a custom op's outputs may not alias
    return outs + (gh1,) if want_grad_hs else outs


def backward(grad: torch.Tensor, hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, wt: torch.Tensor | None,
             bs: torch.Tensor | None, bt: torch.Tensor | None, lse_s: torch.Tensor, lse_t: torch.Tensor,
             g: torch.Tensor, temperature: float, clip: float, beta: float, need_grad_w: bool, need_grad_b: bool):
    """Contract backward (``_ops.py``): grad_hs [N, H] (hs dtype), grad_w [V, H] fp32, grad_b [V] fp32."""
    _check(hs, ht, w, wt, bs, bt)
    n, v = hs.shape[0], w.shape[0]
    dev = hs.device
    gw = torch.zeros((v, hs.shape[1]) if need_grad_w else (0,), device=dev, dtype=torch.float32)
    gb = torch.zeros((v,) if need_grad_b else (0,), device=dev, dtype=torch.float32)
    grad_hs = torch.empty_like(hs)
    if n == 0:
        return grad_hs, gw, gb
    grad, lse_s, lse_t, g = (t.contiguous().float() for t in (grad, lse_s, lse_t, g))
    blocks = _Blocks(hs, ht, w, wt, bs, bt, temperature, clip, beta)
    for lo, hi, zs, zt, dz in blocks:
        grid = lambda meta: (triton.cdiv(hi - lo, meta["BLOCK_R"]),)  # noqa: E731, B023
        _rows_dz_kernel[grid](zs, zt, *blocks.bias, grad[lo:hi], lse_s[lo:hi], lse_t[lo:hi], g[lo:hi], dz, hi - lo,
                              v, *blocks.scalars, **blocks.flags)
        torch.mm(dz, blocks.w, out=grad_hs[lo:hi])
        if need_grad_w:
            _accumulate_grad_w(gw, dz, blocks.hs[lo:hi])
        if need_grad_b:
            gb += dz.sum(0, dtype=torch.float32)
    return grad_hs, gw, gb
