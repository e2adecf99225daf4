"""Triton (GPU) backend of the top-k op's student side: ``forward``/``backward`` of the ``_ops_topk.py`` contract.

The layout, tile configurations, vocabulary splits and helpers are the full op's (``triton_kl``): a 1D grid over
(token tile of BLOCK_N rows) x (vocabulary split), logits computed tile by tile with ``tl.dot`` (fp32 accumulation)
and never stored. No N x V or chunk x V tensor exists; extra memory is [4, N, n_splits] fp32 partials, the [N, K]
gathered logits and, in the backward, the fp32 [N, H] grad_hs accumulator (and the [V, H] / [V] head and bias
gradients when they are needed).

    stats (_tail_stats_kernel): per (row, split), an online max / sum-exp / sum exp(z-m)(z-m) / first argmax over
        the vocabulary entries that are not among the row's K teacher ids (each tile's columns are compared with
        the K ids: K compares per logit, next to the 2H flops of its dot product); a non-finite logit among them
        makes the sum NaN. A few torch ops on [N, S] merge the splits into lse_tail, tail_max, tail_arg and the
        tail's entropy.
    gather (_gather_kernel): z[n, k] = (hs[n] . W[ids[n, k]] + b) / T, a (token tile, k) grid of row dot products.
    backward (_tail_bwd_kernel): recompute the logit tiles, dz = coef[n] exp(z - lse_tail[n]) outside the ids
        (coef = dLoss/dlse_tail / T), then loop over H: grad_hs[rows] += dz @ W[tile] and, if needed,
        grad_w[tile] += dz^T @ hs[rows], by fp32 atomics; grad_b by atomics of column sums. Gradient filtering as
        in the full op: a tile is skipped while the per-row tail probability mass skipped so far stays within
        ATESD_GRAD_FILTER_EPS (0 for fp32: only exact zeros are skipped; 2^-20 for bf16 / fp16), so each grad_hs
        coordinate is off by at most eps |coef[n]| max|W|. Rows with coef == 0 (masked tokens) cost nothing.
    backward (_sparse_bwd_kernel): the K entries, dz[n, ids[n, k]] = grad_z[n, k] / T: grad_hs[n] += dz W[id]
        (added onto the sweep's result), grad_w[id] += dz hs[n] and grad_b[id] += dz by atomics (ids repeat
        across rows).

Out-of-range ids (the Python layer refuses them; under torch.compile it replaces them) are never read: the gather
masks them and returns NaN.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from atesd.kernels import triton_kl
from atesd.kernels.triton_kl import _BWD_CONFIGS, _CONFIGS, _GROUP_N, _NEG, _PRUNE, _dot, _tile_ids

_NUM_STATS = 4  # m, s, e, argmax
_GATHER_N = 16  # rows per program of the gather / sparse kernels
_GATHER_H = 64  # hidden entries per step of the gather / sparse kernels


# ----------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _student_logits(hs_ptr, w_ptr, bs_ptr, rows, cols, N, V, H, inv_t, HAS_BS: tl.constexpr,
                    DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] (hs W^T + b) / T of a tile (padding rows / columns hold finite junk)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rmask = rows < N
    cmask = cols < V
    row_off = rows.to(tl.int64) * H
    col_off = cols.to(tl.int64) * H
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < H
        a = tl.load(hs_ptr + row_off[:, None] + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + col_off[None, :] + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_PREC)
    if HAS_BS:
        acc += tl.load(bs_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@triton.jit
def _outside_ids(ids_ptr, rows, cols, N, V, K, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """[BLOCK_N, BLOCK_V] bool: a vocabulary column (< V) that is none of the row's K teacher ids."""
    rmask = rows < N
    hits = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.int32)
    base = rows.to(tl.int64) * K
    for j in range(0, K):
        idj = tl.load(ids_ptr + base + j, mask=rmask, other=-1)
        hits += (idj[:, None] == cols[None, :]).to(tl.int32)
    return (hits == 0) & (cols < V)[None, :]


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.autotune(configs=_CONFIGS, key=["H", "V", "DOT_PREC"], prune_configs_by=_PRUNE)
@triton.jit
def _tail_stats_kernel(hs_ptr, w_ptr, bs_ptr, ids_ptr, part_ptr, N, V, H, K, n_splits, split_len, inv_t,
                       HAS_BS: tl.constexpr, DOT_PREC: tl.constexpr, GROUP_N: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = _tile_ids(N, n_splits, split_len, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    v_lo = pid_s * split_len
    v_hi = tl.minimum(v_lo + split_len, V)
    m = tl.full((BLOCK_N,), _NEG, tl.float32)  # finite "-inf": exp(_NEG - m) == 0, no inf - inf
    s = tl.zeros((BLOCK_N,), tl.float32)
    e = tl.zeros((BLOCK_N,), tl.float32)
    idx = tl.zeros((BLOCK_N,), tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _student_logits(hs_ptr, w_ptr, bs_ptr, rows, cols, N, V, H, inv_t, HAS_BS, DOT_PREC, BLOCK_N, BLOCK_V,
                            BLOCK_K)
        outside = _outside_ids(ids_ptr, rows, cols, N, V, K, BLOCK_N, BLOCK_V)
        keep = outside & (tl.abs(z) < float("inf"))  # False for NaN
        # a non-finite logit outside the ids (from a non-finite input) makes the row's sum NaN
        poisoned = tl.sum((outside & ~keep).to(tl.int32), 1) > 0
        zk = tl.where(keep, z, float("-inf"))
        tmax = tl.max(zk, 1)
        # strict '>' keeps the earlier index on ties across tiles
        arg = tl.argmax(zk, 1)
        idx = tl.where(tmax > m, arg + v0, idx)
        m_new = tl.maximum(m, tmax)
        alpha = tl.exp(m - m_new)
        x = tl.where(keep, z - m_new[:, None], 0.0)
        u = tl.where(keep, tl.exp(x), 0.0)
        e = alpha * (e + (m - m_new) * s) + tl.sum(u * x, 1)
        s = alpha * s + tl.sum(u, 1) + tl.where(poisoned, float("nan"), 0.0)
        m = m_new
    rmask = rows < N
    stride = N * n_splits
    base = part_ptr + rows.to(tl.int64) * n_splits + pid_s
    tl.store(base, m, mask=rmask)
    tl.store(base + stride, s, mask=rmask)
    tl.store(base + 2 * stride, e, mask=rmask)
    tl.store(base + 3 * stride, idx.to(tl.float32), mask=rmask)


@triton.jit
def _gather_kernel(hs_ptr, w_ptr, bs_ptr, ids_ptr, z_ptr, N, V, H, K, inv_t, HAS_BS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    j = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ids = tl.load(ids_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0)
    valid = rmask & (ids >= 0) & (ids < V)
    row_off = rows.to(tl.int64) * H
    id_off = ids.to(tl.int64) * H
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hm = hh < H
        a = tl.load(hs_ptr + row_off[:, None] + hh[None, :], mask=rmask[:, None] & hm[None, :], other=0.0)
        b = tl.load(w_ptr + id_off[:, None] + hh[None, :], mask=valid[:, None] & hm[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    if HAS_BS:
        acc += tl.load(bs_ptr + ids, mask=valid, other=0.0).to(tl.float32)
    tl.store(z_ptr + rows.to(tl.int64) * K + j, tl.where(valid, acc * inv_t, float("nan")), mask=rmask)


@triton.autotune(configs=_BWD_CONFIGS, key=["H", "V", "NEED_W", "DOT_PREC"],
                 reset_to_zero=["ghs_ptr", "gw_ptr", "gb_ptr"], prune_configs_by=_PRUNE)
@triton.jit
def _tail_bwd_kernel(coef_ptr, hs_ptr, w_ptr, bs_ptr, ids_ptr, lse_ptr, ghs_ptr, gw_ptr, gb_ptr, N, V, H, K,
                     n_splits, split_len, inv_t, budget,
                     HAS_BS: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, DOT_PREC: tl.constexpr,
                     GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = _tile_ids(N, n_splits, split_len, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    v_lo = pid_s * split_len
    v_hi = tl.minimum(v_lo + split_len, V)
    coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    live = rmask & (coef != 0.0)
    skipped = tl.zeros((BLOCK_N,), tl.float32)
    row_off = rows.to(tl.int64) * H
    offs_k = tl.arange(0, BLOCK_K)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _student_logits(hs_ptr, w_ptr, bs_ptr, rows, cols, N, V, H, inv_t, HAS_BS, DOT_PREC, BLOCK_N, BLOCK_V,
                            BLOCK_K)
        keep = _outside_ids(ids_ptr, rows, cols, N, V, K, BLOCK_N, BLOCK_V) & live[:, None]
        q = tl.where(keep, tl.exp(z - lse[:, None]), 0.0)  # the tail distribution: sums to 1 per row
        dz = q * coef[:, None]
        if NEED_B:
            tl.atomic_add(gb_ptr + cols, tl.sum(dz, 0), mask=cmask, sem="relaxed")
        new_skipped = skipped + tl.sum(q, 1)
        # not (x <= budget): a NaN row is never filtered out (tl.max may drop NaN, so test before reducing)
        over = tl.max(tl.where(new_skipped <= budget, 0.0, 1.0), 0) > 0.0
        if over:
            dzc = dz.to(w_ptr.dtype.element_ty)
            col_off = cols.to(tl.int64) * H
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + offs_k
                kmask = kk < H
                w_tile = tl.load(w_ptr + col_off[:, None] + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                                 other=0.0)  # [BLOCK_V, BLOCK_K]
                hmask = rmask[:, None] & kmask[None, :]
                zero_hs = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
                tl.atomic_add(ghs_ptr + row_off[:, None] + kk[None, :], _dot(dzc, w_tile, zero_hs, DOT_PREC),
                              mask=hmask, sem="relaxed")
                if NEED_W:
                    zero_w = tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32)
                    h_tile = tl.load(hs_ptr + row_off[:, None] + kk[None, :], mask=hmask, other=0.0)
                    tl.atomic_add(gw_ptr + col_off[:, None] + kk[None, :],
                                  _dot(tl.trans(dzc), h_tile, zero_w, DOT_PREC), mask=cmask[:, None] & kmask[None, :],
                                  sem="relaxed")
        skipped = tl.where(over, skipped, new_skipped)


@triton.jit
def _sparse_bwd_kernel(gz_ptr, hs_ptr, w_ptr, ids_ptr, ghs_ptr, gw_ptr, gb_ptr, N, V, H, K,
                       NEED_W: tl.constexpr, NEED_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = hh < H
    row_off = rows.to(tl.int64) * H
    tile_mask = rmask[:, None] & hm[None, :]
    acc = tl.load(ghs_ptr + row_off[:, None] + hh[None, :], mask=tile_mask, other=0.0)  # the sweep's part
    h_tile = tl.load(hs_ptr + row_off[:, None] + hh[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    for j in range(0, K):
        ids = tl.load(ids_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0)
        g = tl.load(gz_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0.0)  # dz at the id (1/T applied)
        live = rmask & (g != 0.0) & (ids >= 0) & (ids < V)  # a zero entry adds nothing (NaN rows included)
        id_off = ids.to(tl.int64) * H
        wrow = tl.load(w_ptr + id_off[:, None] + hh[None, :], mask=live[:, None] & hm[None, :], other=0.0)
        acc += tl.where(live[:, None], g[:, None] * wrow.to(tl.float32), 0.0)
        if NEED_W:
            tl.atomic_add(gw_ptr + id_off[:, None] + hh[None, :], g[:, None] * h_tile, mask=live[:, None] & hm[None, :],
                          sem="relaxed")
        if NEED_B:
            if pid_h == 0:
                tl.atomic_add(gb_ptr + ids, g, mask=live, sem="relaxed")
    tl.store(ghs_ptr + row_off[:, None] + hh[None, :], acc, mask=tile_mask)


# ----------------------------------------------------------------------------------------------------------
# host wrappers


def _check(hs, w, bs, ids) -> None:
    if hs.dim() != 2 or w.dim() != 2 or w.shape[1] != hs.shape[1] or w.shape[0] == 0:
        raise ValueError(f"hs must be [N, H] and w [V > 0, H], got {tuple(hs.shape)} and {tuple(w.shape)}")
    if hs.dtype != w.dtype or hs.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"hs and w must share one float dtype (fp32/bf16/fp16), got {hs.dtype} and {w.dtype}")
    if ids.dim() != 2 or ids.shape[0] != hs.shape[0] or not 1 <= ids.shape[1] <= w.shape[0]:
        raise ValueError(f"ids must be [N, K] with 1 <= K <= V, got {tuple(ids.shape)}")
    if bs is not None and bs.shape != (w.shape[0],):
        raise ValueError(f"bs must be [V]=[{w.shape[0]}], got {tuple(bs.shape)}")


def _dot_prec(dtype: torch.dtype) -> str:
    tf32 = os.environ.get("ATESD_TRITON_TF32", "0") == "1"
    return "ieee" if dtype == torch.float32 and not tf32 else "tf32"


def forward(hs: torch.Tensor, w: torch.Tensor, bs: torch.Tensor | None, ids: torch.Tensor, temperature: float):
    """Contract forward (``_ops_topk.py``): z_topk [N, K], lse_tail, tail_max, tail_arg (int64), tail_ent."""
    _check(hs, w, bs, ids)
    n, h = hs.shape
    v, k = w.shape[0], ids.shape[1]
    dev = hs.device
    if n == 0:
        empty = torch.zeros(0, device=dev)
        return torch.zeros(0, k, device=dev), empty, empty.clone(), torch.zeros(0, dtype=torch.long, device=dev), \
            empty.clone()
    hs, w, ids = hs.contiguous(), w.contiguous(), ids.contiguous()
    bs = None if bs is None else bs.contiguous()
    bias = hs if bs is None else bs
    inv_t = 1.0 / temperature
    n_splits, split_len = triton_kl._splits(n, v, dev)
    part = torch.empty((_NUM_STATS, n, n_splits), device=dev, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,)
    _tail_stats_kernel[grid](hs, w, bias, ids, part, n, v, h, k, n_splits, split_len, inv_t, HAS_BS=bs is not None,
                             DOT_PREC=_dot_prec(hs.dtype), GROUP_N=_GROUP_N)
    z_topk = torch.empty((n, k), device=dev, dtype=torch.float32)
    _gather_kernel[(triton.cdiv(n, _GATHER_N), k)](hs, w, bias, ids, z_topk, n, v, h, k, inv_t,
                                                    HAS_BS=bs is not None, BLOCK_N=_GATHER_N, BLOCK_H=_GATHER_H)
    m, s, e, idx = part.unbind(0)
    top = m.amax(1, keepdim=True)
    alpha = torch.exp(m - top)
    d = (alpha * s).sum(1)
    e_tot = (alpha * (e + (m - top) * s)).sum(1)
    top = top.squeeze(1)
    empty_tail = d == 0  # every entry among the ids (K = V)
    lse_tail = torch.where(empty_tail, float("-inf"), top + d.log())
    tail_ent = d.log() - e_tot / d
    tail_max = torch.where(empty_tail, float("-inf"), top)
    tail_arg = torch.where(m == top[:, None], idx, float(v)).amin(1).long()
    return z_topk, lse_tail, tail_max, tail_arg, tail_ent


def backward(grad_lse_tail: torch.Tensor, grad_z: torch.Tensor, hs: torch.Tensor, w: torch.Tensor,
             bs: torch.Tensor | None, ids: torch.Tensor, lse_tail: torch.Tensor, temperature: float,
             need_grad_w: bool, need_grad_b: bool):
    """Contract backward (``_ops_topk.py``): grad_hs [N, H] (hs dtype), grad_w [V, H] fp32, grad_b [V] fp32."""
    _check(hs, w, bs, ids)
    n, h = hs.shape
    v, k = w.shape[0], ids.shape[1]
    dev = hs.device
    ghs = torch.zeros((n, h), device=dev, dtype=torch.float32)
    gw = torch.zeros((v, h) if need_grad_w else (0,), device=dev, dtype=torch.float32)
    gb = torch.zeros((v,) if need_grad_b else (0,), device=dev, dtype=torch.float32)
    if n == 0:
        return ghs.to(hs.dtype), gw, gb
    hs, w, ids = hs.contiguous(), w.contiguous(), ids.contiguous()
    bias = hs if bs is None else bs.contiguous()
    inv_t = 1.0 / temperature
    coef = (grad_lse_tail.float() * inv_t).contiguous()
    gz = (grad_z.float() * inv_t).contiguous()
    n_splits, split_len = triton_kl._splits(n, v, dev)
    budget = triton_kl.filter_eps(hs.dtype) / n_splits
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,)
    _tail_bwd_kernel[grid](coef, hs, w, bias, ids, lse_tail.float().contiguous(), ghs, gw, gb, n, v, h, k, n_splits,
                           split_len, inv_t, budget, HAS_BS=bs is not None, NEED_W=bool(need_grad_w),
                           NEED_B=bool(need_grad_b), DOT_PREC=_dot_prec(hs.dtype), GROUP_N=_GROUP_N)
    _sparse_bwd_kernel[(triton.cdiv(n, _GATHER_N), triton.cdiv(h, _GATHER_H))](
        gz, hs, w, ids, ghs, gw, gb, n, v, h, k, NEED_W=bool(need_grad_w), NEED_B=bool(need_grad_b),
        BLOCK_N=_GATHER_N, BLOCK_H=_GATHER_H)
    return (ghs if hs.dtype == torch.float32 else ghs.to(hs.dtype)), gw, gb
