"""Tiled pure-torch backend of the top-k op's student side: the contract of ``_ops_topk.py`` in blocks.

Serves CPU tensors when the native kernel is not built (and is the baseline the native and Triton kernels are
measured against). Tiles are [ROWS, COLS] of ``cpu_tiled`` (the full op's; tests shrink them there); the K
teacher entries of a row are masked out of every tile, so one pass over the vocabulary gives the log-sum-exp of
the student's *other* logits (``lse_tail``), and the K logits at the ids come from a row-chunked gather
(``W[ids]``, at most a tile's worth of elements at a time). Never N x V; math in fp32.
"""

from __future__ import annotations

import math

import torch

from atesd.kernels import cpu_tiled


def _chunk_rows(k: int, h: int) -> int:
    """Rows per gather chunk: W[ids] of a chunk holds about one tile's worth of elements."""
    return max(1, (cpu_tiled.ROWS * cpu_tiled.COLS) // max(1, k * h))


def _member(ids: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """[n, hi - lo] bool: which columns of vocabulary tile [lo, hi) are among each row's ids [n, K]."""
    cols = hi - lo
    local = ids - lo
    inside = (local >= 0) & (local < cols)
    marks = torch.zeros(ids.shape[0], cols + 1, device=ids.device)
    marks.scatter_(1, torch.where(inside, local, cols), 1.0)  # out-of-tile ids land in the spare last column
    return marks[:, :cols] > 0


def gather_logits(hs: torch.Tensor, w: torch.Tensor, bs: torch.Tensor | None, ids: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """z[n, k] = (hs[n] . w[ids[n, k]] + bs[ids[n, k]]) / T, fp32 [N, K]."""
    n, k = ids.shape
    out = torch.empty(n, k, dtype=torch.float32, device=hs.device)
    step = _chunk_rows(k, hs.shape[1])
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z = torch.einsum("nh,nkh->nk", hs[r0:r1].float(), w[ids[r0:r1]].float())
        if bs is not None:
            z = z + bs[ids[r0:r1]].float()
        out[r0:r1] = z / temperature
    return out


def forward(hs, w, bs, ids, temperature: float):
    """Contract forward: (z_topk [N, K], lse_tail, tail_max, tail_arg (int64), tail_ent), all fp32 but tail_arg."""
    n = hs.shape[0]
    dev = hs.device
    z_topk = gather_logits(hs, w, bs, ids, temperature)
    lse_tail = torch.empty(n, device=dev)
    tail_max = torch.empty(n, device=dev)
    tail_ent = torch.empty(n, device=dev)
    tail_arg = torch.zeros(n, dtype=torch.long, device=dev)
    for r0, r1 in cpu_tiled._blocks(n, cpu_tiled.ROWS):
        h32 = hs[r0:r1].float()
        rows = r1 - r0
        m = torch.full((rows,), -math.inf, device=dev)  # running max of the unmasked logits
        s = torch.zeros(rows, device=dev)  # sum exp(z - m)
        e = torch.zeros(rows, device=dev)  # sum exp(z - m) (z - m)
        arg = torch.zeros(rows, dtype=torch.long, device=dev)
        for lo, hi in cpu_tiled._blocks(w.shape[0], cpu_tiled.COLS):
            outside = ~_member(ids[r0:r1], lo, hi)
            z = cpu_tiled._logits(h32, w, bs, lo, hi, temperature)
            keep = outside & torch.isfinite(z)
            poisoned = (outside & ~keep).any(1)  # a non-finite logit outside the ids makes lse_tail NaN
            zk = z.masked_fill(~keep, -math.inf)
            tile_arg = zk.argmax(dim=1)
            tile_max = zk.gather(1, tile_arg[:, None]).squeeze(1)
            arg = torch.where(tile_max > m, tile_arg + lo, arg)  # strict '>': the first index wins ties
            new_m = torch.maximum(m, tile_max)
            base = torch.where(torch.isfinite(new_m), new_m, 0.0)  # nothing unmasked yet: any finite base
            shift = torch.where(s > 0, m - base, 0.0)  # (z - m_old) = (z - base) + shift
            x = torch.where(keep, z - base[:, None], 0.0)
            p = torch.where(keep, torch.exp(x), 0.0)
            e = torch.exp(shift) * (e + shift * s) + (p * x).sum(1)
            s = torch.exp(shift) * s + p.sum(1) + torch.where(poisoned, math.nan, 0.0)
            m = new_m
        base = torch.where(torch.isfinite(m), m, 0.0)
        lse_tail[r0:r1] = base + torch.log(s)  # -inf for an empty tail (K = V)
        tail_ent[r0:r1] = torch.log(s) - e / s  # entropy of the student's distribution within its tail
        tail_max[r0:r1] = m
        tail_arg[r0:r1] = arg
    return z_topk, lse_tail, tail_max, tail_arg, tail_ent


def backward(grad_lse_tail, grad_z, hs, w, bs, ids, lse_tail, temperature: float, need_grad_w: bool,
             need_grad_b: bool):
    """Contract backward: (grad_hs [N, H] in hs's dtype, grad_w [V, H] fp32 or 0-el, grad_b [V] fp32 or 0-el)."""
    n, h = hs.shape
    k = ids.shape[1]
    dev = hs.device
    grad_hs = torch.zeros(n, h, device=dev)
    grad_w = torch.zeros(w.shape if need_grad_w else (0,), device=dev)
    grad_b = torch.zeros((w.shape[0],) if need_grad_b else (0,), device=dev)
    for r0, r1 in cpu_tiled._blocks(n, cpu_tiled.ROWS):
        coef = grad_lse_tail[r0:r1].float() / temperature
        live = (coef != 0)[:, None]  # rows without this gradient get exactly 0, whatever their logits hold
        h32 = hs[r0:r1].float()
        for lo, hi in cpu_tiled._blocks(w.shape[0], cpu_tiled.COLS):
            keep = live & ~_member(ids[r0:r1], lo, hi)
            z = cpu_tiled._logits(h32, w, bs, lo, hi, temperature)
            dz = torch.where(keep, coef[:, None] * torch.exp(z - lse_tail[r0:r1, None]), 0.0)
            grad_hs[r0:r1] += dz @ w[lo:hi].float()
            if need_grad_w:
                grad_w[lo:hi] += dz.T @ h32
            if need_grad_b:
                grad_b[lo:hi] += dz.sum(0)
    step = _chunk_rows(k, h)
    for r0 in range(0, n, step):  # the K entries of each row: dz = grad_z / T at the ids
        r1 = min(n, r0 + step)
        g = grad_z[r0:r1].float() / temperature
        idx = ids[r0:r1]
        grad_hs[r0:r1] += torch.einsum("nk,nkh->nh", g, w[idx].float())
        if need_grad_w:
            grad_w.index_put_((idx.reshape(-1),), (g[:, :, None] * hs[r0:r1, None, :].float()).reshape(-1, h),
                              accumulate=True)
        if need_grad_b:
            grad_b.index_put_((idx.reshape(-1),), g.reshape(-1), accumulate=True)
    return grad_hs.to(hs.dtype), grad_w, grad_b
