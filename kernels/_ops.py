"""torch.library custom ops behind ``fused_linear_kl`` and the backend contract every implementation meets.

Two ops, both in namespace ``atesd`` (``torch.ops.atesd.*``), with fake (meta) implementations so that
``torch.compile`` traces through them:

``linear_kl_fwd(hs, ht, w, wt, bs, bt, temperature, clip, beta) -> (loss, kl, lse_s, lse_t, g, agree, maxp, ent)``
    hs [N, H] and w [V, H] in one float dtype; ht [N, Ht] and wt [V, Ht] in one float dtype (wt None: the
    teacher uses w, and Ht = H, ht in w's dtype); bs, bt [V] or None (None: no bias on that side). ``clip`` is a
    float, +inf meaning no clipping. All eight outputs are [N] fp32:
    loss  = sum_v min(l, clip)          (per-token clipped divergence, unmasked; see reference.py for l)
    kl    = sum_v l                     (unclipped)
    lse_s, lse_t = log-sum-exp of zs, zt (zs = (hs w^T + bs) / T)
    g     = sum_v c_v * dl_v/dlog ps_v, c_v = [not (l_v > clip)]; the one extra per-token scalar the backward needs
    agree = [argmax zs == argmax zt] (first index on ties), maxp = max_v ps, ent = -sum_v ps log ps.

``linear_kl_bwd(grad, hs, ht, w, wt, bs, bt, lse_s, lse_t, g, temperature, clip, beta, need_grad_w, need_grad_b)
-> (grad_hs, grad_w, grad_b)``
    grad [N] fp32 is dLoss/dloss[n]. With dl_v/dlog ps_v =: gp_v (forward KL: -pt_v; reverse KL:
    ps_v (log ps_v - log pt_v + 1); JSD: (1 - beta) ps_v (log ps_v - log m_v)) the logit gradient is
        dz[n, v] = grad[n] * (c_v gp_v - ps_v g[n]) / T
    and grad_hs = dz w  ([N, H], dtype of hs), grad_w = dz^T hs ([V, H] fp32, or a 0-element tensor unless
    need_grad_w), grad_b = sum_n dz ([V] fp32, or 0-element unless need_grad_b).
    No backend may allocate an N x V tensor, nor synchronise with the host. The bounded exceptions, logged when
    used, never growing with N: the Triton backward's dz workspace, rows x V elements within
    ATESD_TRITON_BWD_WORKSPACE_MIB (default 512 MiB; 0 turns it off), and the opt-in Triton rows path's fp32 logits
    and dz for a block of rows within ATESD_TRITON_ROWS_MIB (default 0: off; ``triton_kl_rows.py``).

``linear_kl_fwd_grad(hs, ht, w, wt, bs, bt, temperature, clip, beta) -> (the eight above, gh1)``
    gh1 [N, H] fp32 = d(sum_n loss[n]) / d hs. With a frozen head the backward is then grad[n] * gh1[n] (dz is
    linear in grad[n]); ``linear_kl.py`` uses it where ``grad_in_forward(device)`` says it pays (the rows path).

Non-finite inputs (every backend, as the reference): a NaN or +-inf in a row's inputs makes its loss and kl NaN (or
non-finite) and, through its NaN log-probabilities, its whole grad_hs row NaN (g itself may stay finite: with beta 0
and a clip, a NaN student row gives g = -sum pt); a pointwise term l that is NaN is never clipped (c_v = [not (l_v >
clip)], and min(NaN, clip) = NaN), so the NaN reaches the loss. A row whose ``grad`` is exactly 0 (a masked row)
gets exactly 0 in grad_hs, grad_w and grad_b, whatever its logits hold (``linear_kl.py`` also zeroes such rows of hs
before they meet dz in grad_w).

Backends (``backend_for``): CUDA tensors go to the Triton kernels (``triton_kl``, or ``triton_kl_rows`` when
ATESD_TRITON_ROWS_MIB > 0; the tiled torch path, with a
warning, where triton is not installed); CPU tensors go to the native C++ kernel when the library
``_atesd_native`` is built and loads, else to the tiled torch path (``cpu_tiled``) with a warning that says why;
any other device goes to the tiled torch path. No backend ever materialises N x V logits: the plain-torch
reference that does is never used as a fallback. ``describe_backend(device)`` is the one line a trainer logs.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from atesd.kernels import cpu_tiled

_NATIVE = None  # the loaded native extension module, or False when unavailable
_NATIVE_REASON = ""  # why the native kernel is not used, when it is not


def native_cpu_available() -> bool:
    """Whether the C++ CPU kernel is built and loaded (set ATESD_DISABLE_NATIVE=1 to force the torch path).

    A library that is missing or fails to load warns once (the tiled torch path is slower); the reason is kept
    for :func:`describe_backend`."""
    global _NATIVE, _NATIVE_REASON
    if _NATIVE is None:
        _NATIVE = False
        if os.environ.get("ATESD_DISABLE_NATIVE", "0") == "1":
            _NATIVE_REASON = "disabled by ATESD_DISABLE_NATIVE=1"
        else:
            try:
                from atesd.kernels import _native  # registers torch.ops.atesd_native.*

                _NATIVE = _native
                _NATIVE_REASON = ""
            except ImportError as e:
                _NATIVE_REASON = str(e)
                warnings.warn(f"atesd: {e}; CPU tensors use the tiled torch path (slower, same results)",
                              RuntimeWarning, stacklevel=2)
    return bool(_NATIVE)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(device: torch.device | str) -> str:
    """Name of the backend that serves tensors on ``device``: 'triton', 'native' or 'torch'."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton" if _triton_installed() else "torch"
    if device.type == "cpu":
        return "native" if native_cpu_available() else "torch"
    return "torch"


def describe_backend(device: torch.device | str) -> str:
    """One line naming the backend that serves ``device`` and, for a fallback, why (for a run's log)."""
    device = torch.device(device)
    backend = backend_for(device)
    if backend == "triton":
        import triton

        from atesd.kernels.triton_kl import workspace_mib
        from atesd.kernels.triton_kl_rows import rows_mib

        if rows_mib() > 0:
            path = f"rows path: cuBLAS logits in blocks within {rows_mib():g} MiB"
        else:
            mib = workspace_mib()
            path = f"backward dz workspace {mib:g} MiB" if mib > 0 else "fused backward"
        return f"triton (GPU kernels, triton {triton.__version__}; {path}) on {device}"
    if backend == "native":
        return f"native (C++ CPU kernel {getattr(_NATIVE, 'LIBRARY', '?')}) on {device}"
    if device.type == "cuda":
        why = "triton is not installed (pip install triton)"
    elif device.type == "cpu":
        why = f"native CPU kernel unavailable: {_NATIVE_REASON}"
    else:
        why = f"no dedicated kernel for {device.type}"
    return f"torch (tiled torch path, never N x V; {why}) on {device}"


def _triton_impl():
    """The Triton module serving CUDA tensors: the rows path when ATESD_TRITON_ROWS_MIB > 0, else the tile path."""
    from atesd.kernels import triton_kl, triton_kl_rows

    return triton_kl_rows if triton_kl_rows.rows_mib() > 0 else triton_kl


def grad_in_forward(device: torch.device | str) -> bool:
    """Whether ``linear_kl_fwd_grad`` pays on ``device``: only the Triton rows path forms the hidden-state gradient
    inside its forward (from the logits it already holds); elsewhere fwd + bwd stay apart."""
    if backend_for(device) != "triton":
        return False
    from atesd.kernels import triton_kl_rows

    return triton_kl_rows.rows_mib() > 0


@torch.library.custom_op("atesd::linear_kl_fwd", mutates_args=())
def linear_kl_fwd(
    hs: torch.Tensor,
    ht: torch.Tensor,
    w: torch.Tensor,
    wt: torch.Tensor | None,
    bs: torch.Tensor | None,
    bt: torch.Tensor | None,
    temperature: float,
    clip: float,
    beta: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    backend = backend_for(hs.device)
    if backend == "triton":
        return _triton_impl().forward(hs, ht, w, wt, bs, bt, temperature, clip, beta)
    if backend == "native":
        return tuple(torch.ops.atesd_native.linear_kl_fwd(hs, ht, w, wt, bs, bt, temperature, clip, beta))
    return cpu_tiled.forward(hs, ht, w, wt, bs, bt, temperature, clip, beta)


@linear_kl_fwd.register_fake
def _(hs, ht, w, wt, bs, bt, temperature, clip, beta):
    n = hs.shape[0]
    return tuple(hs.new_empty((n,), dtype=torch.float32) for _ in range(8))


@torch.library.custom_op("atesd::linear_kl_bwd", mutates_args=())
def linear_kl_bwd(
    grad: torch.Tensor,
    hs: torch.Tensor,
    ht: torch.Tensor,
    w: torch.Tensor,
    wt: torch.Tensor | None,
    bs: torch.Tensor | None,
    bt: torch.Tensor | None,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    g: torch.Tensor,
    temperature: float,
    clip: float,
    beta: float,
    need_grad_w: bool,
    need_grad_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = backend_for(hs.device)
    args = (grad, hs, ht, w, wt, bs, bt, lse_s, lse_t, g, temperature, clip, beta, need_grad_w, need_grad_b)
    if backend == "triton":
        return _triton_impl().backward(*args)
    if backend == "native":
        return tuple(torch.ops.atesd_native.linear_kl_bwd(*args))
    return cpu_tiled.backward(*args)


@linear_kl_bwd.register_fake
def _(grad, hs, ht, w, wt, bs, bt, lse_s, lse_t, g, temperature, clip, beta, need_grad_w, need_grad_b):
    gw = w.new_empty(tuple(w.shape) if need_grad_w else (0,), dtype=torch.float32)
    gb = w.new_empty((w.shape[0],) if need_grad_b else (0,), dtype=torch.float32)
    return hs.new_empty(hs.shape), gw, gb


@torch.library.custom_op("atesd::linear_kl_fwd_grad", mutates_args=())
def linear_kl_fwd_grad(
    hs: torch.Tensor,
    ht: torch.Tensor,
    w: torch.Tensor,
    wt: torch.Tensor | None,
    bs: torch.Tensor | None,
    bt: torch.Tensor | None,
    temperature: float,
    clip: float,
    beta: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]:
    """``linear_kl_fwd``'s eight outputs and gh1 [N, H] fp32 = d(sum_n loss[n]) / d hs (unit upstream gradient on
    every row): the backward of a frozen head is then grad[n] * gh1[n]. The Triton rows path computes gh1 from the
    logits its forward holds; any other backend runs its forward and its backward at unit gradient."""
    if backend_for(hs.device) == "triton" and grad_in_forward(hs.device):
        from atesd.kernels import triton_kl_rows

        return triton_kl_rows.forward(hs, ht, w, wt, bs, bt, temperature, clip, beta, want_grad_hs=True)
    outs = linear_kl_fwd(hs, ht, w, wt, bs, bt, temperature, clip, beta)
    ones = torch.ones(hs.shape[0], device=hs.device, dtype=torch.float32)
    grad_hs = linear_kl_bwd(ones, hs, ht, w, wt, bs, bt, outs[2], outs[3], outs[4], temperature, clip, beta,
                            False, False)[0]
    return (*outs, grad_hs.float())


@linear_kl_fwd_grad.register_fake
def _(hs, ht, w, wt, bs, bt, temperature, clip, beta):
    n = hs.shape[0]
    return (*(hs.new_empty((n,), dtype=torch.float32) for _ in range(8)),
            hs.new_empty(tuple(hs.shape), dtype=torch.float32))
