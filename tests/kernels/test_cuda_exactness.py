"""The GPU session's exactness check (benchmarks/gpu_session.sh, step b): the compiled Triton kernels against the
plain-torch reference on a short fixed list, at the real vocabulary (V=151936).

bf16 and fp32, beta 0 (forward KL) and 0.5 (JSD), clip 0.06 at T=1.1, masked rows (exactly 0 loss and gradient),
a trainable head, extreme logits, NaN / inf rows (NaN loss and a non-finite gradient row, other rows untouched).
The reference materialises [N, V] fp32 logits, so N stays small; the rest of the CUDA matrix is in
test_triton_kl.py, test_contract.py and test_cuda_shapes.py (the whole kernels suite, too slow for the session).

Skipped without CUDA, except under ``GPU_SESSION_DRY=1`` (the session's CPU dry run, tests/test_gpu_session.py):
then the same tests run through Triton's interpreter at tiny shapes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from atesd import kernels
from atesd.kernels import _ops
from atesd.kernels.reference import linear_kl

CUDA = torch.cuda.is_available()
DRY = os.environ.get("GPU_SESSION_DRY") == "1" and not CUDA
if not CUDA and not (DRY and os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs CUDA (or GPU_SESSION_DRY=1 with the Triton interpreter)", allow_module_level=True)
pytest.importorskip("triton")

DEV = "cuda" if CUDA else "cpu"
N, H, V = (37, 32, 300) if DRY else (257, 256, 151936)  # N and H multiples of no tile size
T, CLIP = 1.1, 0.06
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}
MASKED = list(range(0, N, 5))


@pytest.fixture(autouse=True, params=["tiles", "rows"])
def triton_backend(monkeypatch, request):
    """The Triton kernels, on the CPU tensors of the dry run too (they would take the native kernel there): the
    tile path, then the rows path (ATESD_TRITON_ROWS_MIB; 64 MiB: blocks of 64 rows at V=151936, so 5 of them)."""
    monkeypatch.setattr(_ops, "backend_for", lambda device: "triton")
    monkeypatch.setenv("ATESD_TRITON_ROWS_MIB", "64" if request.param == "rows" else "0")


def _inputs(dtype, *, wscale=2.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hs = torch.randn(N, H, device=DEV, generator=g) * 2
    ht = hs + torch.randn(N, H, device=DEV, generator=g)
    w = torch.randn(V, H, device=DEV, generator=g) * (wscale / H**0.5)
    return hs.to(dtype), ht.to(dtype), w.to(dtype)


def _mask():
    mask = torch.ones(N, dtype=torch.bool, device=DEV)
    mask[MASKED] = False
    return mask


def _run(fn, hs, ht, w, *, train_head=False, **kw):
    """Per-row loss, stats and gradients (hs, and w when train_head) under a fixed upstream gradient."""
    s = hs.detach().clone().requires_grad_(True)
    wc = w.detach().clone().requires_grad_(train_head)
    loss, stats = fn(s, ht, wc, temperature=T, reduction="none", return_stats=True, **kw)
    upstream = torch.rand(N, device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
    grads = torch.autograd.grad((loss * upstream).sum(), [s, wc] if train_head else [s])
    return loss.detach(), stats, grads


def _reference(hs, ht, w, **kw):
    """The reference on fp32 copies of the same (rounded) inputs."""
    return _run(linear_kl, hs.float(), ht.float(), w.float(), **kw)


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_matches_reference_with_masked_rows(dtype, beta):
    hs, ht, w = _inputs(dtype)
    kw = dict(clip=CLIP, beta=beta, mask=_mask())
    loss, stats, (grad,) = _run(kernels.fused_linear_kl, hs, ht, w, **kw)
    rloss, rstats, (rgrad,) = _reference(hs, ht, w, **kw)
    assert (loss[MASKED] == 0).all() and (grad[MASKED] == 0).all()
    torch.testing.assert_close(loss, rloss, **TOL[dtype])
    torch.testing.assert_close(stats["kl"], rstats["kl"], **TOL[dtype])
    torch.testing.assert_close(stats["student_entropy"], rstats["student_entropy"], **TOL[dtype])
    assert grad.dtype == dtype
    scale = rgrad.abs().max()
    torch.testing.assert_close(grad.float() / scale, rgrad / scale, **TOL[dtype])
    assert (rloss < rstats["kl"] - 1e-3).any()  # the clip bites on some rows: clipping is exercised


def test_trainable_head_gradient():
    hs, ht, w = _inputs(torch.bfloat16, seed=2)
    kw = dict(clip=CLIP, mask=_mask(), train_head=True)
    _, _, (grad, grad_w) = _run(kernels.fused_linear_kl, hs, ht, w, **kw)
    _, _, (rgrad, rgrad_w) = _reference(hs, ht, w, **kw)
    assert grad_w.dtype == torch.bfloat16
    for got, want in ((grad, rgrad), (grad_w, rgrad_w)):
        scale = want.abs().max()
        torch.testing.assert_close(got.float() / scale, want / scale, **TOL[torch.bfloat16])


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_extreme_logits(beta, clip=None):
    # |z| ~ 1e4: one-hot distributions; fp32 logits carry ~1e-3 of rounding there, so a pointwise term within
    # that of the clip may fall either side of it in any implementation (the native kernel's gradient differs
    # from the reference's by 3e-3 at this shape with clip 0.06): unclipped here; clipping at extreme logits is
    # tested against float64 on exactly representable logits in test_contract.py
    g = torch.Generator(device=DEV).manual_seed(3)
    hs = torch.randn(N, H, device=DEV, generator=g)
    ht = hs + 0.5 * torch.randn(N, H, device=DEV, generator=g)
    w = torch.randn(V, H, device=DEV, generator=g) * (1e4 / H**0.5)
    assert (hs @ w.T).abs().max() > 1e3
    loss, stats, (grad,) = _run(kernels.fused_linear_kl, hs, ht, w, clip=clip, beta=beta)
    rloss, rstats, (rgrad,) = _reference(hs, ht, w, clip=clip, beta=beta)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, rloss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(stats["kl"], rstats["kl"], rtol=1e-3, atol=1e-3)
    # the gradient, within the contract's bound (docs/native.md, test_contract.py): the log-normalisers are one fp32
    # number each, so every logit gradient may be off by ~2 eps |z/T| p / T, times max |W| per entry. It matters
    # where the exact gradient cancels (a JSD row whose supports are disjoint: exactly 0, computed as a difference
    # of two O(1) terms from separately rounded passes)
    level = torch.maximum((hs @ w.T).abs().amax(1), (ht @ w.T).abs().amax(1)) / T
    atol = (1e-5 + 2 * torch.finfo(torch.float32).eps * level) / T * w.abs().max()
    assert ((grad - rgrad).abs() <= atol[:, None] + 1e-3 * rgrad.abs()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_nan_and_inf_rows(dtype):
    hs, ht, w = _inputs(dtype, seed=4)
    hs[3, 7] = math.nan  # counted rows: NaN loss, non-finite gradient row
    ht[8, 1] = math.inf
    hs[MASKED[2], 0] = math.nan  # a masked row: excluded exactly, whatever it holds
    kw = dict(clip=CLIP, mask=_mask())
    loss, _, (grad,) = _run(kernels.fused_linear_kl, hs, ht, w, **kw)
    rloss, _, (rgrad,) = _reference(hs, ht, w, **kw)
    assert torch.isnan(loss[[3, 8]]).all()
    assert not torch.isfinite(grad[[3, 8]]).all(1).any()
    assert loss[MASKED[2]] == 0 and (grad[MASKED[2]] == 0).all()
    rest = torch.ones(N, dtype=torch.bool, device=DEV)
    rest[[3, 8]] = False
    torch.testing.assert_close(loss[rest], rloss[rest], **TOL[dtype])
    scale = rgrad[rest].abs().max()
    torch.testing.assert_close(grad[rest].float() / scale, rgrad[rest] / scale, **TOL[dtype])
    mean = kernels.fused_linear_kl(hs, ht, w, temperature=T, clip=CLIP, mask=_mask())
    assert torch.isnan(mean)  # a trainer's non-finite guard fires
