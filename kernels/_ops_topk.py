"""torch.library custom ops behind ``fused_linear_kl_topk``: the student side, the only part that touches V.

The teacher arrives as K ids and log-probs per token, so the only vocabulary-sized work is the student's
log-softmax over V. Everything else (the K + 1 pointwise terms, the clip, the reduction) is plain differentiable
torch on [N, K] tensors in ``linear_kl_topk.py``. Two ops in namespace ``atesd``, with fake implementations so
``torch.compile`` traces through them:

``linear_kl_topk_fwd(hs, w, bs, ids, temperature) -> (z_topk, lse_tail, tail_max, tail_arg, tail_ent)``
    hs [N, H] and w [V, H] in one float dtype, bs [V] or None, ids [N, K] int64, distinct and in [0, V) per row.
    With z = (hs w^T + bs) / T (fp32):
    z_topk   [N, K] fp32  z[n, ids[n, k]]                        (a gather: K dot products per row)
    lse_tail [N] fp32     log sum_{v not in ids[n]} exp z[n, v]  (-inf when K = V; NaN when one of those
                          logits is not finite: a non-finite input never hides as a probability of 0 or 1)
    tail_max [N] fp32     max over the same entries, tail_arg [N] int64 its first index,
    tail_ent [N] fp32     the entropy of softmax over the same entries (for the student-entropy statistic).
    The full log-normaliser is logaddexp(lse_tail, logsumexp_k z_topk); keeping the two parts apart gives the
    student's tail bucket exactly, even when its top-k mass rounds to 1.

``linear_kl_topk_bwd(grad_lse_tail, grad_z, hs, w, bs, ids, lse_tail, temperature, need_grad_w, need_grad_b)
-> (grad_hs, grad_w, grad_b)``
    grad_lse_tail [N] and grad_z [N, K] fp32 are dLoss/dlse_tail and dLoss/dz_topk. The logit gradient is
        dz[n, v] = grad_lse_tail[n] exp(z[n, v] - lse_tail[n])   for v not in ids[n] (0 where grad_lse_tail is 0)
        dz[n, ids[n, k]] = grad_z[n, k]
    and grad_hs = dz w / T ([N, H], hs's dtype), grad_w = dz^T hs / T ([V, H] fp32, or 0-element unless
    need_grad_w), grad_b = sum_n dz / T ([V] fp32, or 0-element unless need_grad_b).

No backend allocates an N x V tensor or synchronises with the host; extra memory is O(N*H + N*K) plus tiles.
Non-finite inputs propagate (a NaN or inf in hs, w or bs makes the affected logits, lse_tail and gradients NaN);
a row whose grad_lse_tail is 0 gets no tail gradient whatever its logits hold. Backends are the full op's
(``_ops.backend_for``): Triton on CUDA (``triton_topk``), the native C++ kernel on CPU when built (the same
library, ``linear_kl_topk.cpp``), else the tiled torch path (``cpu_tiled_topk``).
"""

from __future__ import annotations

import warnings

import torch

from atesd.kernels import _ops, cpu_tiled_topk

_STALE_WARNED = False


def _backend(device: torch.device) -> str:
    """The full op's backend for ``device``; a native library built before the top-k op existed serves the full
    op but not this one: the tiled torch path then serves it, with a warning (never silently)."""
    global _STALE_WARNED
    backend = _ops.backend_for(device)
    if backend == "native" and not hasattr(torch.ops.atesd_native, "linear_kl_topk_fwd"):
        if not _STALE_WARNED:
            _STALE_WARNED = True
            warnings.warn("atesd: the native CPU kernel predates fused_linear_kl_topk (rebuild with `make setup`); "
                          "the top-k op uses the tiled torch path (slower, same results)", RuntimeWarning,
                          stacklevel=3)
        return "torch"
    return backend


@torch.library.custom_op("atesd::linear_kl_topk_fwd", mutates_args=())
def linear_kl_topk_fwd(
    hs: torch.Tensor, w: torch.Tensor, bs: torch.Tensor | None, ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend(hs.device)
    if backend == "triton":
        from atesd.kernels import triton_topk

        return triton_topk.forward(hs, w, bs, ids, temperature)
    if backend == "native":
        return tuple(torch.ops.atesd_native.linear_kl_topk_fwd(hs, w, bs, ids, temperature))
    return cpu_tiled_topk.forward(hs, w, bs, ids, temperature)


@linear_kl_topk_fwd.register_fake
def _(hs, w, bs, ids, temperature):
    n, k = ids.shape
    f32 = lambda *shape: hs.new_empty(shape, dtype=torch.float32)
    return f32(n, k), f32(n), f32(n), hs.new_empty((n,), dtype=torch.int64), f32(n)


@torch.library.custom_op("atesd::linear_kl_topk_bwd", mutates_args=())
def linear_kl_topk_bwd(
    grad_lse_tail: torch.Tensor,
    grad_z: torch.Tensor,
    hs: torch.Tensor,
    w: torch.Tensor,
    bs: torch.Tensor | None,
    ids: torch.Tensor,
    lse_tail: torch.Tensor,
    temperature: float,
    need_grad_w: bool,
    need_grad_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend(hs.device)
    args = (grad_lse_tail, grad_z, hs, w, bs, ids, lse_tail, temperature, need_grad_w, need_grad_b)
    if backend == "triton":
        from atesd.kernels import triton_topk

        return triton_topk.backward(*args)
    if backend == "native":
        return tuple(torch.ops.atesd_native.linear_kl_topk_bwd(*args))
    return cpu_tiled_topk.backward(*args)


@linear_kl_topk_bwd.register_fake
def _(grad_lse_tail, grad_z, hs, w, bs, ids, lse_tail, temperature, need_grad_w, need_grad_b):
    gw = w.new_empty(tuple(w.shape) if need_grad_w else (0,), dtype=torch.float32)
    gb = w.new_empty((w.shape[0],) if need_grad_b else (0,), dtype=torch.float32)
    return hs.new_empty(hs.shape), gw, gb
