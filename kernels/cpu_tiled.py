"""Tiled pure-torch backend: the op's contract (see ``_ops.py``) in [row_chunk, vocab_tile] blocks.

Serves CPU tensors when the native extension is not built, and is the "chunked torch" baseline the native and
Triton kernels are measured against. Peak extra memory is O(N*H) plus a handful of ROWS x COLS fp32 tiles,
never N x V. Math is fp32 whatever the input dtype.

Pass 1 streams the vocabulary once for both log-sum-exps (online max/sum-exp) and the two arg-maxes; pass 2, with
the normalisers known, forms the pointwise terms l, the clipped loss, the unclipped KL, the student entropy and
g = sum_v c_v dl_v/dlog ps_v. The backward recomputes the tiles and applies
dz = grad * (c gp - ps g) / T to the head. A NaN term is kept, never clipped (``min`` and ``c = [not (l > clip)]``
propagate it), and rows with grad == 0 get exactly 0, as the contract in ``_ops.py`` says.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from atesd.kernels.reference import pointwise_divergence

ROWS = 512  # token rows per block
COLS = 1024  # vocabulary entries per tile (a few ROWS x COLS fp32 temporaries live at once)


def _blocks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, total, size):
        yield lo, min(lo + size, total)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, lo: int, hi: int, temperature: float):
    """fp32 logits tile (h w[lo:hi]^T + b[lo:hi]) / T for fp32 rows h [n, H]."""
    z = h @ w[lo:hi].to(torch.float32).T
    if b is not None:
        z = z + b[lo:hi].to(torch.float32)
    return z / temperature if temperature != 1.0 else z


def grad_wrt_log_ps(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float) -> torch.Tensor:
    """gp = dl/dlog ps elementwise (pt held fixed): -pt (beta=0), ps (log ps - log pt + 1) (beta=1),
    (1 - beta) ps (log ps - log m) for the generalized JSD with m = (1 - beta) ps + beta pt."""
    if beta == 0.0:
        return -log_pt.exp()
    ps = log_ps.exp()
    if beta == 1.0:
        return ps * (log_ps - log_pt + 1.0)
    log_m = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
    return (1.0 - beta) * ps * (log_ps - log_m)


def _lse_and_argmax(h32: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, temperature: float):
    """Online log-sum-exp and first-index argmax of the logits of rows h32 [n, H] over the whole vocabulary."""
    n = h32.shape[0]
    run_max = torch.full((n,), -math.inf, dtype=torch.float32, device=h32.device)
    run_sum = torch.zeros(n, dtype=torch.float32, device=h32.device)
    arg = torch.zeros(n, dtype=torch.long, device=h32.device)
    for lo, hi in _blocks(w.shape[0], COLS):
        z = _logits(h32, w, b, lo, hi, temperature)
        tile_arg = z.argmax(dim=1)
        tile_max = z.gather(1, tile_arg[:, None]).squeeze(1)
        arg = torch.where(tile_max > run_max, tile_arg + lo, arg)  # strict '>' keeps the first index on ties
        new_max = torch.maximum(run_max, tile_max)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(1)
        run_max = new_max
    return run_max + torch.log(run_sum), arg, run_max


def forward(hs, ht, w, wt, bs, bt, temperature: float, clip: float, beta: float):
    """Backend forward of the contract in ``_ops.py``; returns (loss, kl, lse_s, lse_t, g, agree, maxp, ent)."""
    n_rows = hs.shape[0]
    wt = w if wt is None else wt
    outs = [torch.zeros(n_rows, dtype=torch.float32, device=hs.device) for _ in range(8)]
    loss, kl, lse_s, lse_t, g, agree, maxp, ent = outs
    for r0, r1 in _blocks(n_rows, ROWS):
        s32, t32 = hs[r0:r1].to(torch.float32), ht[r0:r1].to(torch.float32)
        ls, arg_s, max_s = _lse_and_argmax(s32, w, bs, temperature)
        lt, arg_t, _ = _lse_and_argmax(t32, wt, bt, temperature)
        lse_s[r0:r1], lse_t[r0:r1] = ls, lt
        agree[r0:r1] = (arg_s == arg_t).to(torch.float32)
        maxp[r0:r1] = torch.exp(max_s - ls)
        for lo, hi in _blocks(w.shape[0], COLS):
            log_ps = _logits(s32, w, bs, lo, hi, temperature) - ls[:, None]
            log_pt = _logits(t32, wt, bt, lo, hi, temperature) - lt[:, None]
            pointwise = pointwise_divergence(log_ps, log_pt, beta)
            over = pointwise > clip  # False for NaN: a NaN term is kept and propagates
            kl[r0:r1] += pointwise.sum(1)
            loss[r0:r1] += torch.where(over, clip, pointwise).sum(1)
            g[r0:r1] += torch.where(over, 0.0, grad_wrt_log_ps(log_ps, log_pt, beta)).sum(1)
            ent[r0:r1] -= (log_ps.exp() * log_ps).sum(1)
    return loss, kl, lse_s, lse_t, g, agree, maxp, ent


def backward(grad, hs, ht, w, wt, bs, bt, lse_s, lse_t, g, temperature: float, clip: float, beta: float,
             need_grad_w: bool, need_grad_b: bool):
    """Backend backward of the contract in ``_ops.py``; returns (grad_hs, grad_w, grad_b)."""
    wt = w if wt is None else wt
    grad_hs = torch.zeros(hs.shape, dtype=torch.float32, device=hs.device)
    grad_w = torch.zeros(w.shape if need_grad_w else (0,), dtype=torch.float32, device=hs.device)
    grad_b = torch.zeros((w.shape[0],) if need_grad_b else (0,), dtype=torch.float32, device=hs.device)
    for r0, r1 in _blocks(hs.shape[0], ROWS):
        s32, t32 = hs[r0:r1].to(torch.float32), ht[r0:r1].to(torch.float32)
        scale = (grad[r0:r1] / temperature)[:, None]
        live = scale != 0  # rows without upstream gradient (masked) get exactly 0, even where their logits are NaN
        for lo, hi in _blocks(w.shape[0], COLS):
            log_ps = _logits(s32, w, bs, lo, hi, temperature) - lse_s[r0:r1, None]
            log_pt = _logits(t32, wt, bt, lo, hi, temperature) - lse_t[r0:r1, None]
            over = pointwise_divergence(log_ps, log_pt, beta) > clip
            gp = torch.where(over, 0.0, grad_wrt_log_ps(log_ps, log_pt, beta))
            dz = torch.where(live, scale * (gp - log_ps.exp() * g[r0:r1, None]), 0.0)
            grad_hs[r0:r1] += dz @ w[lo:hi].to(torch.float32)
            if need_grad_w:
                grad_w[lo:hi] += dz.T @ s32
            if need_grad_b:
                grad_b[lo:hi] += dz.sum(0)
    return grad_hs.to(hs.dtype), grad_w, grad_b
