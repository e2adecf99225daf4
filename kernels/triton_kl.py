"""Triton (GPU) backend of the fused linear clipped-KL op: ``forward``/``backward`` of the _ops.py contract.

Logits are computed tile by tile with ``tl.dot`` (fp32 accumulation, K loop over H) and never stored: no N x V
tensor exists. The forward's extra memory is [k, N, n_splits] fp32 partials. The backward, by default, writes dz
for a block of rows into a workspace of at most ATESD_TRITON_BWD_WORKSPACE_MIB (512 MiB: 1728 rows at V=151936,
bf16; the size never grows with N) and lets cuBLAS form dz W and dz^T hs; with the knob at 0 it is the fused
kernel below, which needs only the fp32 [N, H] grad_hs accumulator but adds every (token tile, vocab tile) block
to it by atomics. Measured on an H200 at the Qwen3-8B head (benchmarks/RESULTS.md section 17): the fused
backward 111 ms frozen / 284 ms trainable, the workspace one 60 / 79 ms. Both return the [V, H] / [V] fp32
weight/bias gradients the contract asks for.

Layout. Every kernel runs a 1D grid over (token tile of BLOCK_N rows) x (vocab split). A split is a contiguous
vocab range of ``split_len`` columns (a multiple of every BLOCK_V in use, so tiles never straddle splits) that
one program walks BLOCK_V columns at a time. Programs come in groups of GROUP_N token tiles (token tile
fastest), so programs resident together read the same W tiles and only a few hs tiles (L2 reuse).

    pass 1 (_stats_kernel): per (row, split) online max, sum-exp and sum exp(z-m)(z-m) for both sides, online
        argmax (first index on ties) for both, and - when pass 2 is not needed - the cross term that gives the
        unclipped KL: sum exp(zt-mt)(zs-ms) (beta=0) or sum exp(zs-ms)(zt-mt) (beta=1). With a shared head,
        each W tile is loaded once and multiplied by both the hs and ht tiles. A few torch ops on [N, S] merge
        the splits: lse, entropy = log d - e/d, max prob = 1/d, argmax agreement, KL.
    pass 2 (_loss_kernel): only when clip is finite or 0 < beta < 1. With the final lse, recompute the logits
        and sum l, min(l, clip) and c * dl/dlog ps per (row, split). Otherwise loss = kl and g = -1 (beta=0)
        or kl + 1 (beta=1) come for free.
    backward, workspace (default; _dz_kernel + cuBLAS): per block of rows, recompute both logit tiles, write dz
        (input dtype) to the workspace, then grad_hs[block] = dz W and grad_w += dz^T hs[block] (fp32 output).
    backward, fused (ATESD_TRITON_BWD_WORKSPACE_MIB=0; _bwd_kernel): recompute both logit tiles,
        dz = grad[n] (c gp - ps g[n]) / T, then loop over H
        in BLOCK_K chunks: grad_hs[rows] += dz @ W[tile] and, if needed, grad_w[tile] += dz^T @ hs[rows], by
        fp32 atomics (so the last bits vary from run to run); grad_b gets exact column sums of dz (atomics
        too). dz is cast to the input dtype for the tensor-core dot, as in Cut Cross-Entropy. The atomics are
        relaxed (sem="relaxed"): nothing reads the accumulators before the kernel ends, so no ordering is needed,
        and the default acq_rel wraps every vector atomic in a GPU-wide fence and an L1 flush on sm_90 (MEMBAR.GPU,
        CCTL.IVALL) where relaxed ones compile to plain REDG.

Gradient filtering (the fused backward only; the workspace one writes every dz). A backward tile whose dz is
negligible skips both H loops and their atomics. The test is an L1 budget, which bounds the error whatever the
vocabulary size: per row, the skipped sum_v |c gp - ps g| (the logit gradient before the grad[n]/T scale) over
all skipped tiles of all splits is <= eps, so each coordinate of a grad_hs row is off by
<= eps * |grad[n]| / T * max|W| (grad_w: the same per row, summed over rows).
Rows with grad[n] == 0 (masked tokens) cost nothing. Defaults: eps = 0 for fp32 (skips exact zeros only: the
result is exact); eps = 2^-20 for bf16/fp16, far below the bf16 rounding (2^-9 relative) of any row whose
logit gradient has an L1 mass above ~1e-3. ATESD_GRAD_FILTER_EPS overrides it (0 disables lossy filtering).

Knobs (environment, read at each call unless noted):
    ATESD_GRAD_FILTER_EPS   per-row L1 filtering budget (above).
    ATESD_TRITON_VSPLITS    force the number of vocab splits (default: ~4 programs per SM).
    ATESD_TRITON_TF32=1     let fp32 inputs use TF32 tensor cores (default IEEE fp32).
    ATESD_TRITON_CONFIG     "BLOCK_N,BLOCK_V,BLOCK_K,num_warps,num_stages": one config, no autotuning
                            (read at import).
    ATESD_TRITON_BWD_WORKSPACE_MIB  the backward's dz workspace in MiB (default 512; 0: the fused backward).
Autotuning keys on H, V, the divergence mode, shared head, the dot precision (and need_grad_w in the backward);
the first call per key benchmarks the configs of its precision: 8 forward and 3 backward ones on tensor cores
(bf16/fp16, TF32), one for IEEE fp32 (register budget: comment at ``_TC_FWD``). Under TRITON_INTERPRET=1 a single
small config is used.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton 3.9's interpreter gets tl.dot wrong on bf16 operands (garbage ~1e10), so when interpreting every dot
# runs on fp32 copies: exact for bf16/fp16 products, and the compiled GPU path is untouched.
_UPCAST_DOT = tl.constexpr(_INTERPRET)
_NEG = tl.constexpr(-1.0e30)  # finite "-inf" for running maxima: exp(_NEG - m) == 0, no inf - inf NaNs
_GROUP_N = 8
_NUM_STATS = 9  # ms, ds, es, mt, dt, et, cross, idx_s, idx_t
_DEFAULT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-20, torch.float16: 2.0**-20}


def _cfg(bn: int, bv: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Register budget (sm_90, 255 per thread). Every kernel keeps fp32 [BLOCK_N, BLOCK_V] tiles live at once (zs, zt
# and the running sums; the backward also l, gp, ps, dz), i.e. BLOCK_N * BLOCK_V / (32 * num_warps) values per
# thread per tile. `ptxas -v` on Triton 3.6's sm_90a code (2026-12-04, no GPU run, see docs/triton.md):
# - tensor cores (bf16/fp16, or fp32 as TF32): 32 values per thread per tile fit in every kernel; 64 spill in the
#   backward (64x128 at 4 warps: 92-692 B per thread, 128x128 at 8 warps: 60-464 B, beta 0 and 0.5) and 64x256 at
#   8 warps spills 96 B in the statistics pass. Those configs are dropped.
# - IEEE fp32 (tl.dot on FMA units, operands in registers): every tensor-core config above spills, some by
#   10-45 KB; 64x64x32 at 8 warps (16 values per thread) does not. fp32 runs that one config, untuned.
_TC_FWD = [(64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (64, 128, 128, 8, 3), (128, 64, 64, 8, 3),
           (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4)]
_TC_BWD = [(64, 64, 64, 4, 3), (64, 128, 64, 8, 4), (128, 64, 64, 8, 3)]
_TC_DZ = [(64, 128, 64, 8, 4), (64, 128, 128, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3)]  # no spills (sm_90a)
_IEEE = [(64, 64, 32, 8, 3)]


def _configs(tc: list[tuple]) -> list[triton.Config]:
    """The tensor-core configs ``tc`` plus the IEEE-fp32 one; :func:`_for_precision` keeps the right part."""
    pinned = os.environ.get("ATESD_TRITON_CONFIG")
    if pinned:
        return [_cfg(*(int(x) for x in pinned.split(",")))]
    if _INTERPRET:
        return [_cfg(32, 64, 32, 4, 1)]
    return [_cfg(*c) for c in tc + _IEEE]


def _is_ieee(config: triton.Config) -> bool:
    k = config.kwargs
    return (k["BLOCK_N"], k["BLOCK_V"], k["BLOCK_K"], config.num_warps, config.num_stages) in _IEEE


def _for_precision(configs, named_args, **kwargs):
    """Autotuner pruning: the IEEE-fp32 config when either side's dot is IEEE fp32, the tensor-core ones else."""
    ieee = "ieee" in (kwargs.get("DOT_PREC"), kwargs.get("DOT_PREC_T"))
    return [c for c in configs if _is_ieee(c) == ieee] or configs


_CONFIGS = _configs(_TC_FWD)
_BWD_CONFIGS = _configs(_TC_BWD)
_DZ_CONFIGS = _configs(_TC_DZ)
_PRUNE = {"early_config_prune": _for_precision}
_SPLIT_ALIGN = max(c.kwargs["BLOCK_V"] for c in _CONFIGS + _BWD_CONFIGS + _DZ_CONFIGS)
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _CONFIGS + _BWD_CONFIGS + _DZ_CONFIGS)


# ----------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _tile_ids(N, n_splits, split_len, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """Grouped program order: GROUP_N token tiles x all splits, token tile fastest."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_N * n_splits
    first_n = (pid // width) * GROUP_N
    group = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % group
    pid_s = (pid % width) // group
    return pid_n, pid_s


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    if _UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _logit_tiles(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, N, V, H, HT, inv_t,
                 HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SHARED_W: tl.constexpr, DOT_PREC: tl.constexpr,
                 DOT_PREC_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] zs, zt (temperature applied); padding columns are -inf. The teacher's width HT
    equals H when it shares the head (one K loop, each W tile loaded once), and may differ otherwise."""
    acc_s = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rmask = rows < N
    cmask = cols < V
    row_off = rows.to(tl.int64) * H
    col_off = cols.to(tl.int64) * H
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < H
        amask = rmask[:, None] & kmask[None, :]
        a_s = tl.load(hs_ptr + row_off[:, None] + kk[None, :], mask=amask, other=0.0)
        bmask = kmask[:, None] & cmask[None, :]
        b_s = tl.load(w_ptr + col_off[None, :] + kk[:, None], mask=bmask, other=0.0)  # [BLOCK_K, BLOCK_V]
        acc_s = _dot(a_s, b_s, acc_s, DOT_PREC)
        if SHARED_W:
            a_t = tl.load(ht_ptr + row_off[:, None] + kk[None, :], mask=amask, other=0.0)
            acc_t = _dot(a_t, b_s, acc_t, DOT_PREC_T)
    if not SHARED_W:
        row_off_t = rows.to(tl.int64) * HT
        col_off_t = cols.to(tl.int64) * HT
        for k0 in range(0, HT, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < HT
            a_t = tl.load(ht_ptr + row_off_t[:, None] + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b_t = tl.load(wt_ptr + col_off_t[None, :] + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc_t = _dot(a_t, b_t, acc_t, DOT_PREC_T)
    if HAS_BS:
        acc_s += tl.load(bs_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BT:
        acc_t += tl.load(bt_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    zs = tl.where(cmask[None, :], acc_s * inv_t, float("-inf"))
    zt = tl.where(cmask[None, :], acc_t * inv_t, float("-inf"))
    return zs, zt


@triton.jit
def _pointwise(zs, zt, lse_s, lse_t, valid, beta, log_beta, log_1mbeta, MODE: tl.constexpr):
    """l, gp = dl/dlog ps, ps on a tile; all exactly 0 where not valid. MODE 0 fwd KL, 1 rev KL, 2 JSD."""
    lps = tl.where(valid, zs - lse_s[:, None], 0.0)
    lpt = tl.where(valid, zt - lse_t[:, None], 0.0)
    ps = tl.where(valid, tl.exp(lps), 0.0)
    pt = tl.where(valid, tl.exp(lpt), 0.0)
    if MODE == 0:
        lv = pt * (lpt - lps)
        gp = -pt
    elif MODE == 1:
        lv = ps * (lps - lpt)
        gp = lv + ps
    else:
        a = lps + log_1mbeta
        b = lpt + log_beta
        hi = tl.maximum(a, b)
        lm = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
        lm = tl.where((a == a) & (b == b), lm, a + b)  # tl.maximum / tl.minimum may drop a NaN operand
        gp = (1.0 - beta) * ps * (lps - lm)
        lv = beta * pt * (lpt - lm) + gp
    return lv, gp, ps


@triton.jit
def _clipped_sums(lv, gp, clip, HAS_CLIP: tl.constexpr):
    """Per row of a tile: sum_v min(l, clip) and sum_v c gp, c = [not (l > clip)]."""
    if HAS_CLIP:
        over = lv > clip  # False for NaN: a NaN term is kept and propagates (never "clipped")
        return tl.sum(tl.where(over, clip, lv), 1), tl.sum(tl.where(over, 0.0, gp), 1)
    return tl.sum(lv, 1), tl.sum(gp, 1)


@triton.jit
def _row_state(grad_ptr, lse_s_ptr, lse_t_ptr, g_ptr, rows, rmask, inv_t):
    """The backward's per-row inputs: lse_s, lse_t, g, live (in range, grad != 0) and grad / T, each [BLOCK_N]."""
    lse_s = tl.load(lse_s_ptr + rows, mask=rmask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=rmask, other=0.0)
    gn = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=rmask, other=0.0)
    return lse_s, lse_t, gn, rmask & (grad != 0.0), grad * inv_t


@triton.jit
def _logit_grad(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, live, lse_s, lse_t, gn, N, V, H, HT,
                inv_t, clip, beta, log_beta, log_1mbeta, MODE: tl.constexpr, HAS_CLIP: tl.constexpr,
                HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SHARED_W: tl.constexpr, DOT_PREC: tl.constexpr,
                DOT_PREC_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] c gp - ps g[n] (the logit gradient before the grad[n]/T scale) of one tile, from
    recomputed logits; exactly 0 outside live rows and columns < V."""
    zs, zt = _logit_tiles(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, N, V, H, HT, inv_t,
                          HAS_BS, HAS_BT, SHARED_W, DOT_PREC, DOT_PREC_T, BLOCK_N, BLOCK_V, BLOCK_K)
    valid = live[:, None] & (cols < V)[None, :]
    lv, gp, ps = _pointwise(zs, zt, lse_s, lse_t, valid, beta, log_beta, log_1mbeta, MODE)
    if HAS_CLIP:
        gp = tl.where(lv > clip, 0.0, gp)
    return tl.where(valid, gp - ps * gn[:, None], 0.0)


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.autotune(configs=_CONFIGS, key=["H", "HT", "V", "CROSS", "SHARED_W", "DOT_PREC", "DOT_PREC_T"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _stats_kernel(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, part_ptr, N, V, H, HT, n_splits, split_len,
                  inv_t,
                  CROSS: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SHARED_W: tl.constexpr,
                  DOT_PREC: tl.constexpr, DOT_PREC_T: tl.constexpr, GROUP_N: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = _tile_ids(N, n_splits, split_len, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    v_lo = pid_s * split_len
    v_hi = tl.minimum(v_lo + split_len, V)
    ms = tl.full((BLOCK_N,), _NEG, tl.float32)
    mt = tl.full((BLOCK_N,), _NEG, tl.float32)
    ds = tl.zeros((BLOCK_N,), tl.float32)
    dt = tl.zeros((BLOCK_N,), tl.float32)
    es = tl.zeros((BLOCK_N,), tl.float32)
    et = tl.zeros((BLOCK_N,), tl.float32)
    cr = tl.zeros((BLOCK_N,), tl.float32)
    idx_s = tl.zeros((BLOCK_N,), tl.int32)
    idx_t = tl.zeros((BLOCK_N,), tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        zs, zt = _logit_tiles(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, N, V, H, HT, inv_t,
                              HAS_BS, HAS_BT, SHARED_W, DOT_PREC, DOT_PREC_T, BLOCK_N, BLOCK_V, BLOCK_K)
        valid = (cols < V)[None, :]
        tmax_s = tl.max(zs, 1)
        tmax_t = tl.max(zt, 1)
        # strict '>' keeps the earlier (lower) index on ties across tiles; tl.argmax breaks ties to the left
        # (NaN logits read as -inf for the arg-max only: the interpreter's argmax refuses an all-NaN row)
        arg_s = tl.argmax(tl.where(zs == zs, zs, float("-inf")), 1)
        arg_t = tl.argmax(tl.where(zt == zt, zt, float("-inf")), 1)
        idx_s = tl.where(tmax_s > ms, arg_s + v0, idx_s)
        idx_t = tl.where(tmax_t > mt, arg_t + v0, idx_t)
        ms_new = tl.maximum(ms, tmax_s)
        mt_new = tl.maximum(mt, tmax_t)
        a_s = tl.exp(ms - ms_new)
        a_t = tl.exp(mt - mt_new)
        xs = tl.where(valid, zs - ms_new[:, None], 0.0)  # z - m, finite even at padding
        xt = tl.where(valid, zt - mt_new[:, None], 0.0)
        us = tl.where(valid, tl.exp(xs), 0.0)
        ut = tl.where(valid, tl.exp(xt), 0.0)
        # sum exp(z-m)(z-m) re-based to the new max: (z-m') = (z-m) + (m-m')
        if CROSS == 0:
            cr = a_t * (cr + (ms - ms_new) * dt) + tl.sum(ut * xs, 1)
        elif CROSS == 1:
            cr = a_s * (cr + (mt - mt_new) * ds) + tl.sum(us * xt, 1)
        es = a_s * (es + (ms - ms_new) * ds) + tl.sum(us * xs, 1)
        et = a_t * (et + (mt - mt_new) * dt) + tl.sum(ut * xt, 1)
        ds = a_s * ds + tl.sum(us, 1)
        dt = a_t * dt + tl.sum(ut, 1)
        ms = ms_new
        mt = mt_new
    rmask = rows < N
    stride = N * n_splits
    base = part_ptr + rows.to(tl.int64) * n_splits + pid_s
    tl.store(base, ms, mask=rmask)
    tl.store(base + stride, ds, mask=rmask)
    tl.store(base + 2 * stride, es, mask=rmask)
    tl.store(base + 3 * stride, mt, mask=rmask)
    tl.store(base + 4 * stride, dt, mask=rmask)
    tl.store(base + 5 * stride, et, mask=rmask)
    tl.store(base + 6 * stride, cr, mask=rmask)
    tl.store(base + 7 * stride, idx_s.to(tl.float32), mask=rmask)
    tl.store(base + 8 * stride, idx_t.to(tl.float32), mask=rmask)


@triton.autotune(configs=_CONFIGS, key=["H", "HT", "V", "MODE", "SHARED_W", "DOT_PREC", "DOT_PREC_T"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _loss_kernel(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, part_ptr,
                 N, V, H, HT, n_splits, split_len, inv_t, clip, beta, log_beta, log_1mbeta,
                 MODE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
                 SHARED_W: tl.constexpr, DOT_PREC: tl.constexpr, DOT_PREC_T: tl.constexpr, GROUP_N: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = _tile_ids(N, n_splits, split_len, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    v_lo = pid_s * split_len
    v_hi = tl.minimum(v_lo + split_len, V)
    lse_s = tl.load(lse_s_ptr + rows, mask=rmask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=rmask, other=0.0)
    loss = tl.zeros((BLOCK_N,), tl.float32)
    kl = tl.zeros((BLOCK_N,), tl.float32)
    g = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        zs, zt = _logit_tiles(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, N, V, H, HT, inv_t,
                              HAS_BS, HAS_BT, SHARED_W, DOT_PREC, DOT_PREC_T, BLOCK_N, BLOCK_V, BLOCK_K)
        valid = (cols < V)[None, :]
        lv, gp, ps = _pointwise(zs, zt, lse_s, lse_t, valid, beta, log_beta, log_1mbeta, MODE)
        kl += tl.sum(lv, 1)
        loss_tile, g_tile = _clipped_sums(lv, gp, clip, HAS_CLIP)
        loss += loss_tile
        g += g_tile
    stride = N * n_splits
    base = part_ptr + rows.to(tl.int64) * n_splits + pid_s
    tl.store(base, loss, mask=rmask)
    tl.store(base + stride, kl, mask=rmask)
    tl.store(base + 2 * stride, g, mask=rmask)


@triton.autotune(configs=_BWD_CONFIGS, key=["H", "HT", "V", "MODE", "SHARED_W", "NEED_W", "DOT_PREC", "DOT_PREC_T"],
                 reset_to_zero=["ghs_ptr", "gw_ptr", "gb_ptr"], prune_configs_by=_PRUNE)
@triton.jit
def _bwd_kernel(grad_ptr, hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, g_ptr,
                ghs_ptr, gw_ptr, gb_ptr, N, V, H, HT, n_splits, split_len, inv_t, clip, beta, log_beta,
                log_1mbeta, budget,
                MODE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
                SHARED_W: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, DOT_PREC: tl.constexpr,
                DOT_PREC_T: tl.constexpr, GROUP_N: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = _tile_ids(N, n_splits, split_len, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    v_lo = pid_s * split_len
    v_hi = tl.minimum(v_lo + split_len, V)
    lse_s, lse_t, gn, live, scale = _row_state(grad_ptr, lse_s_ptr, lse_t_ptr, g_ptr, rows, rmask, inv_t)
    skipped = tl.zeros((BLOCK_N,), tl.float32)
    row_off = rows.to(tl.int64) * H
    offs_k = tl.arange(0, BLOCK_K)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        dzu = _logit_grad(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, live, lse_s, lse_t, gn, N, V, H,
                          HT, inv_t, clip, beta, log_beta, log_1mbeta, MODE, HAS_CLIP, HAS_BS, HAS_BT, SHARED_W,
                          DOT_PREC, DOT_PREC_T, BLOCK_N, BLOCK_V, BLOCK_K)
        dz = dzu * scale[:, None]
        if NEED_B:
            tl.atomic_add(gb_ptr + cols, tl.sum(dz, 0), mask=cmask, sem="relaxed")
        new_skipped = skipped + tl.sum(tl.abs(dzu), 1)
        # not (x <= budget): a NaN row is never filtered out (tl.max may drop NaN, so test before reducing)
        over = tl.max(tl.where(new_skipped <= budget, 0.0, 1.0), 0) > 0.0
        if over:
            dzc = dz.to(w_ptr.dtype.element_ty)
            col_off = cols.to(tl.int64) * H
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + offs_k
                kmask = kk < H
                w_tile = tl.load(w_ptr + col_off[:, None] + kk[None, :],
                                 mask=cmask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_V, BLOCK_K]
                hmask = rmask[:, None] & kmask[None, :]
                zero_hs = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
                tl.atomic_add(ghs_ptr + row_off[:, None] + kk[None, :], _dot(dzc, w_tile, zero_hs, DOT_PREC),
                              mask=hmask, sem="relaxed")
                if NEED_W:
                    zero_w = tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32)
                    h_tile = tl.load(hs_ptr + row_off[:, None] + kk[None, :], mask=hmask, other=0.0)
                    tl.atomic_add(gw_ptr + col_off[:, None] + kk[None, :],
                                  _dot(tl.trans(dzc), h_tile, zero_w, DOT_PREC),
                                  mask=cmask[:, None] & kmask[None, :], sem="relaxed")
        skipped = tl.where(over, skipped, new_skipped)


@triton.autotune(configs=_DZ_CONFIGS, key=["H", "HT", "V", "MODE", "SHARED_W", "DOT_PREC", "DOT_PREC_T"],
                 reset_to_zero=["gb_ptr"], prune_configs_by=_PRUNE)
@triton.jit
def _dz_kernel(grad_ptr, hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, g_ptr, dz_ptr, gb_ptr,
               N, V, H, HT, ld_dz, n_splits, split_len, inv_t, clip, beta, log_beta, log_1mbeta,
               MODE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
               SHARED_W: tl.constexpr, NEED_B: tl.constexpr, DOT_PREC: tl.constexpr, DOT_PREC_T: tl.constexpr,
               GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """The workspace backward's first half: dz of a block of rows into dz_ptr [N, ld_dz] (input dtype), every
    column < V written (0 for masked rows); the products with W and hs are left to cuBLAS."""
    pid_n, pid_s = _tile_ids(N, n_splits, split_len, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    v_lo = pid_s * split_len
    v_hi = tl.minimum(v_lo + split_len, V)
    lse_s, lse_t, gn, live, scale = _row_state(grad_ptr, lse_s_ptr, lse_t_ptr, g_ptr, rows, rmask, inv_t)
    out_row = rows.to(tl.int64) * ld_dz
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        dz = _logit_grad(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, live, lse_s, lse_t, gn, N, V, H,
                         HT, inv_t, clip, beta, log_beta, log_1mbeta, MODE, HAS_CLIP, HAS_BS, HAS_BT, SHARED_W,
                         DOT_PREC, DOT_PREC_T, BLOCK_N, BLOCK_V, BLOCK_K) * scale[:, None]
        if NEED_B:
            tl.atomic_add(gb_ptr + cols, tl.sum(dz, 0), mask=cmask, sem="relaxed")
        tl.store(dz_ptr + out_row[:, None] + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------------------
# host wrappers


def _check(hs, ht, w, wt, bs, bt) -> None:
    if hs.dim() != 2 or ht.dim() != 2 or ht.shape[0] != hs.shape[0]:
        raise ValueError(f"hs {tuple(hs.shape)} and ht {tuple(ht.shape)} must be [N, H] and [N, Ht]")
    if w.dim() != 2 or w.shape[1] != hs.shape[1] or w.shape[0] == 0:
        raise ValueError(f"w must be [V>0, H={hs.shape[1]}], got {tuple(w.shape)}")
    if wt is None and ht.shape[1] != hs.shape[1]:
        raise ValueError(f"ht {tuple(ht.shape)} must be [N, H={hs.shape[1]}] when the teacher shares w")
    if wt is not None and wt.shape != (w.shape[0], ht.shape[1]):
        raise ValueError(f"wt {tuple(wt.shape)} must be [V, Ht]=[{w.shape[0]}, {ht.shape[1]}]")
    teacher_w = w if wt is None else wt
    if hs.dtype != w.dtype or ht.dtype != teacher_w.dtype or {hs.dtype, ht.dtype} - set(_DEFAULT_EPS):
        got = [str(t.dtype) for t in (hs, w, ht, teacher_w)]
        raise TypeError(f"hs/w and ht/wt must each share one float dtype (fp32/bf16/fp16), got {got}")
    for name, b in (("bs", bs), ("bt", bt)):
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"{name} must be [V]=[{w.shape[0]}], got {tuple(b.shape)}")


def _splits(n: int, v: int, device: torch.device) -> tuple[int, int]:
    """(n_splits, split_len): ~4 (token tile, split) programs per SM; split_len is a multiple of BLOCK_V."""
    forced = os.environ.get("ATESD_TRITON_VSPLITS")
    max_splits = triton.cdiv(v, _SPLIT_ALIGN)
    if forced:
        want = int(forced)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        want = triton.cdiv(4 * sms, triton.cdiv(n, 2 * _MIN_BLOCK_N))
    want = max(1, min(want, max_splits))
    split_len = triton.cdiv(triton.cdiv(v, want), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return triton.cdiv(v, split_len), split_len


def _mode(beta: float) -> int:
    return 0 if beta == 0.0 else 1 if beta == 1.0 else 2


def _common(hs, ht, w, wt, bs, bt, temperature, clip, beta):
    """Contiguous tensors (dummy pointers for absent ones) and the scalar/constexpr kernel arguments."""
    hs, ht, w = hs.contiguous(), ht.contiguous(), w.contiguous()
    wt = None if wt is None else wt.contiguous()
    bs = None if bs is None else bs.contiguous()
    bt = None if bt is None else bt.contiguous()
    mode = _mode(beta)
    tf32 = os.environ.get("ATESD_TRITON_TF32", "0") == "1"
    scalars = dict(
        inv_t=1.0 / temperature,
        clip=float(clip) if math.isfinite(clip) else 0.0,
        beta=float(beta),
        log_beta=math.log(beta) if mode == 2 else 0.0,
        log_1mbeta=math.log1p(-beta) if mode == 2 else 0.0,
        MODE=mode,
        HAS_CLIP=math.isfinite(clip),
        HAS_BS=bs is not None,
        HAS_BT=bt is not None,
        SHARED_W=wt is None,
        DOT_PREC="ieee" if hs.dtype == torch.float32 and not tf32 else "tf32",
        DOT_PREC_T="ieee" if ht.dtype == torch.float32 and not tf32 else "tf32",
        GROUP_N=_GROUP_N,
    )
    ptrs = (hs, ht, w, w if wt is None else wt, hs if bs is None else bs, hs if bt is None else bt)
    return ptrs, scalars


def forward(hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, wt: torch.Tensor | None,
            bs: torch.Tensor | None, bt: torch.Tensor | None, temperature: float, clip: float, beta: float):
    """Contract forward (``_ops.py``): 8 [N] fp32 tensors (loss, kl, lse_s, lse_t, g, agree, maxp, ent)."""
    _check(hs, ht, w, wt, bs, bt)
    n, h = hs.shape
    v = w.shape[0]
    if n == 0:
        return tuple(torch.zeros(0, device=hs.device, dtype=torch.float32) for _ in range(8))
    ptrs, sc = _common(hs, ht, w, wt, bs, bt, temperature, clip, beta)
    n_splits, split_len = _splits(n, v, hs.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,)
    need_pass2 = sc["HAS_CLIP"] or sc["MODE"] == 2
    cross = 2 if need_pass2 else sc["MODE"]

    part = torch.empty((_NUM_STATS, n, n_splits), device=hs.device, dtype=torch.float32)
    _stats_kernel[grid](*ptrs, part, n, v, h, ht.shape[1], n_splits, split_len, sc["inv_t"], CROSS=cross,
                        HAS_BS=sc["HAS_BS"], HAS_BT=sc["HAS_BT"], SHARED_W=sc["SHARED_W"],
                        DOT_PREC=sc["DOT_PREC"], DOT_PREC_T=sc["DOT_PREC_T"], GROUP_N=_GROUP_N)
    ms, ds, es, mt, dt, et, cr, idx_s, idx_t = part.unbind(0)
    max_s = ms.amax(1, keepdim=True)
    max_t = mt.amax(1, keepdim=True)
    a_s = torch.exp(ms - max_s)
    a_t = torch.exp(mt - max_t)
    d_s = (a_s * ds).sum(1)
    d_t = (a_t * dt).sum(1)
    e_s = (a_s * (es + (ms - max_s) * ds)).sum(1)
    e_t = (a_t * (et + (mt - max_t) * dt)).sum(1)
    log_ds, log_dt = d_s.log(), d_t.log()
    lse_s = max_s.squeeze(1) + log_ds
    lse_t = max_t.squeeze(1) + log_dt
    ent = log_ds - e_s / d_s
    maxp = d_s.reciprocal()
    big = torch.full_like(idx_s, float(v))
    first_s = torch.where(ms == max_s, idx_s, big).amin(1)
    first_t = torch.where(mt == max_t, idx_t, big).amin(1)
    agree = (first_s == first_t).to(torch.float32)

    if need_pass2:
        part2 = torch.empty((3, n, n_splits), device=hs.device, dtype=torch.float32)
        _loss_kernel[grid](*ptrs, lse_s, lse_t, part2, n, v, h, ht.shape[1], n_splits, split_len, sc["inv_t"],
                           sc["clip"], sc["beta"], sc["log_beta"], sc["log_1mbeta"], MODE=sc["MODE"],
                           HAS_CLIP=sc["HAS_CLIP"], HAS_BS=sc["HAS_BS"], HAS_BT=sc["HAS_BT"],
                           SHARED_W=sc["SHARED_W"], DOT_PREC=sc["DOT_PREC"], DOT_PREC_T=sc["DOT_PREC_T"],
                           GROUP_N=_GROUP_N)
        loss, kl, g = (t.clone() for t in part2.sum(2).unbind(0))  # a custom op's outputs may not alias
    elif cross == 0:  # KL(t||s) = sum pt (zt - mt) - log dt - sum pt (zs - ms) + log ds
        c = (a_t * (cr + (ms - max_s) * dt)).sum(1)
        kl = (e_t - c) / d_t - log_dt + log_ds
        loss, g = kl.clone(), torch.full_like(kl, -1.0)
    else:  # KL(s||t), symmetric; g = sum ps (log ps - log pt + 1) = kl + 1
        c = (a_s * (cr + (mt - max_t) * ds)).sum(1)
        kl = (e_s - c) / d_s - log_ds + log_dt
        loss, g = kl.clone(), kl + 1.0
    return loss, kl, lse_s, lse_t, g, agree, maxp, ent


def filter_eps(dtype: torch.dtype) -> float:
    """Per-row L1 budget of skipped logit gradient: ATESD_GRAD_FILTER_EPS, else 0 (fp32) or 2^-20."""
    env = os.environ.get("ATESD_GRAD_FILTER_EPS")
    return float(env) if env else _DEFAULT_EPS[dtype]


def backward(grad: torch.Tensor, hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, wt: torch.Tensor | None,
             bs: torch.Tensor | None, bt: torch.Tensor | None, lse_s: torch.Tensor, lse_t: torch.Tensor,
             g: torch.Tensor, temperature: float, clip: float, beta: float, need_grad_w: bool,
             need_grad_b: bool):
    """Contract backward (see ``_ops.py``): grad_hs [N, H] (hs dtype), grad_w [V, H] fp32, grad_b [V] fp32."""
    _check(hs, ht, w, wt, bs, bt)
    n, h = hs.shape
    v = w.shape[0]
    dev = hs.device
    gw = torch.zeros((v, h) if need_grad_w else (0,), device=dev, dtype=torch.float32)
    gb = torch.zeros((v,) if need_grad_b else (0,), device=dev, dtype=torch.float32)
    if n == 0:
        return torch.zeros_like(hs), gw, gb
    ptrs, sc = _common(hs, ht, w, wt, bs, bt, temperature, clip, beta)
    rows = workspace_rows(n, v, hs.dtype)
    if rows:
        grad_hs = _backward_workspace(rows, grad, ptrs, sc, lse_s, lse_t, g, gw, gb, n, v, h, ht.shape[1])
        return grad_hs, gw, gb
    ghs = torch.zeros((n, h), device=dev, dtype=torch.float32)  # the fused backward's atomic accumulator
    n_splits, split_len = _splits(n, v, dev)
    budget = filter_eps(hs.dtype) / n_splits
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,)
    _bwd_kernel[grid](grad.contiguous().float(), *ptrs, lse_s.contiguous(), lse_t.contiguous(),
                      g.contiguous(), ghs, gw, gb, n, v, h, ht.shape[1], n_splits, split_len, sc["inv_t"], sc["clip"],
                      sc["beta"], sc["log_beta"], sc["log_1mbeta"], budget, MODE=sc["MODE"],
                      HAS_CLIP=sc["HAS_CLIP"], HAS_BS=sc["HAS_BS"], HAS_BT=sc["HAS_BT"],
                      SHARED_W=sc["SHARED_W"],
                      NEED_W=bool(need_grad_w), NEED_B=bool(need_grad_b), DOT_PREC=sc["DOT_PREC"],
                      DOT_PREC_T=sc["DOT_PREC_T"],
                      GROUP_N=_GROUP_N)
    return (ghs if hs.dtype == torch.float32 else ghs.to(hs.dtype)), gw, gb


# ----------------------------------------------------------------------------------------------------------
# the workspace backward: dz of a bounded block of rows materialised, its products by cuBLAS

_DEFAULT_WORKSPACE_MIB = "512"  # 693 MiB peak extra at the 8B head (RESULTS.md section 17): a quarter of Liger's
_WORKSPACE_LOGGED: set = set()
_ADDMM_FP32_OK: dict = {}


def workspace_mib() -> float:
    """ATESD_TRITON_BWD_WORKSPACE_MIB as a number (default 512); a one-line error for anything else."""
    raw = os.environ.get("ATESD_TRITON_BWD_WORKSPACE_MIB", _DEFAULT_WORKSPACE_MIB).strip() or "0"
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"ATESD_TRITON_BWD_WORKSPACE_MIB must be a number of MiB (0: none), got {raw!r}") from None
    if not math.isfinite(mib):
        raise ValueError(f"ATESD_TRITON_BWD_WORKSPACE_MIB must be finite, got {raw!r}")
    return mib


def workspace_rows(n: int, v: int, dtype: torch.dtype) -> int:
    """Rows of dz the backward materialises at a time: ATESD_TRITON_BWD_WORKSPACE_MIB (default 512; 0: none, the
    fused atomics backward) // (row bytes), a multiple of 64 (at least 64), at most n."""
    mib = workspace_mib()
    if mib <= 0:
        return 0
    row_bytes = triton.cdiv(v, 8) * 8 * torch.empty((), dtype=dtype).element_size()
    rows = max(64, int(mib * 2**20) // row_bytes // 64 * 64)
    return min(rows, n)


def _addmm_fp32_works(device: torch.device) -> bool:
    """Whether ``torch.addmm(c, a, b, torch.float32, out=c)`` accumulates bf16 products into fp32 c in place on
    this device (CUDA's cuBLAS path; checked once on a small case against an fp32 product)."""
    if device.type not in _ADDMM_FP32_OK:
        with torch.autocast(device.type, enabled=False):  # autocast would round the fp32 reference to bf16
            a = torch.randn(64, 48, device=device).to(torch.bfloat16)
            b = torch.randn(48, 32, device=device).to(torch.bfloat16)
            c = torch.randn(64, 32, device=device)
            expect = c + a.float() @ b.float()
            try:
                torch.addmm(c, a, b, torch.float32, out=c)
                ok = bool(torch.allclose(c, expect, rtol=1e-4, atol=1e-4))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _ADDMM_FP32_OK[device.type] = ok
    return _ADDMM_FP32_OK[device.type]


def _accumulate_grad_w(gw: torch.Tensor, dz: torch.Tensor, hs_rows: torch.Tensor) -> None:
    """gw [V, H] fp32 += dz^T [V, R] @ hs_rows [R, H]: one cuBLAS call with fp32 output where it exists, else in
    vocabulary blocks through fp32 copies (logged once)."""
    if dz.dtype == torch.float32:
        gw.addmm_(dz.t(), hs_rows)
    elif _addmm_fp32_works(dz.device):
        torch.addmm(gw, dz.t(), hs_rows, torch.float32, out=gw)
    else:
        _log_once("fp32-out", f"the workspace backward accumulates grad_w through fp32 copies on {dz.device.type} "
                  "(no bf16 x bf16 -> fp32 addmm there): slower", slower=True)
        hs32 = hs_rows.float()
        for lo in range(0, gw.shape[0], 8192):
            gw[lo:lo + 8192].addmm_(dz[:, lo:lo + 8192].t().float(), hs32)


def _log_once(key: str, message: str, slower: bool = False) -> None:
    """A materialising path is logged (info) once per process; a slower one warns once."""
    if key not in _WORKSPACE_LOGGED:
        _WORKSPACE_LOGGED.add(key)
        if slower:
            warnings.warn(message, stacklevel=3)
        else:
            logging.getLogger(__name__).info(message)


def _backward_workspace(rows, grad, ptrs, sc, lse_s, lse_t, g, gw, gb, n, v, h, ht_width) -> torch.Tensor:
    """Backward in blocks of ``rows`` tokens: ``_dz_kernel`` writes the block's dz [rows, V] (input dtype, the
    precision the fused kernel's tensor-core dots use too), then grad_hs[block] = dz @ W and grad_w += dz^T hs by
    cuBLAS. Extra memory: the workspace, rows x V elements, whatever N is."""
    hs, ht, w = ptrs[0], ptrs[1], ptrs[2]
    ld = triton.cdiv(v, 8) * 8  # cuBLAS wants 16-byte aligned leading dimensions
    _log_once("workspace", f"the fused op's backward materialises dz for {rows} rows at a time "
              f"({rows * ld * hs.element_size() / 2**20:.3g} MiB, ATESD_TRITON_BWD_WORKSPACE_MIB)")
    work = torch.empty((rows, ld), device=hs.device, dtype=hs.dtype)
    # The padding columns [v, ld) are never part of dz, but a BLAS may still read them: torch 2.13's CPU bf16 mm of
    # a [m, v] view with ld > v multiplies them by zeros (AVX-512 BF16 kernels, v odd), so uninitialised NaN there
    # would reach grad_hs. Zeros make any such read harmless (rows x < 8 elements, once per backward).
    work[:, v:].zero_()
    grad_hs = torch.empty_like(hs)
    grad = grad.contiguous().float()
    lse_s, lse_t, g = lse_s.contiguous(), lse_t.contiguous(), g.contiguous()
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        m = hi - lo
        n_splits, split_len = _splits(m, v, hs.device)
        dz = work[:m, :v]
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]) * n_splits,)  # noqa: E731, B023
        _dz_kernel[grid](grad[lo:hi], hs[lo:hi], ht[lo:hi], *ptrs[2:], lse_s[lo:hi], lse_t[lo:hi], g[lo:hi], work,
                         gb, m, v, h, ht_width, ld, n_splits, split_len, sc["inv_t"], sc["clip"], sc["beta"],
                         sc["log_beta"], sc["log_1mbeta"], MODE=sc["MODE"], HAS_CLIP=sc["HAS_CLIP"],
                         HAS_BS=sc["HAS_BS"], HAS_BT=sc["HAS_BT"], SHARED_W=sc["SHARED_W"],
                         NEED_B=gb.numel() > 0, DOT_PREC=sc["DOT_PREC"], DOT_PREC_T=sc["DOT_PREC_T"],
                         GROUP_N=_GROUP_N)
        torch.mm(dz, w, out=grad_hs[lo:hi])
        if gw.numel():
            _accumulate_grad_w(gw, dz, hs[lo:hi])
    return grad_hs
