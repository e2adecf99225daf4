"""The native C++ CPU kernel (kernels/csrc): that it is the active CPU backend, and its exactness on tiny tiles.

The generic op matrix (test_op.py) already runs every CPU test with the native kernel when it is built; here the
tiles are shrunk to a few rows x a few vocabulary entries so that small shapes span many ragged row blocks and
vocabulary tiles and several threads, and the sparse clipping pass (tiles recomputed only where the per-tile bound
may exceed the clip) is driven hard.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch

from atesd import kernels
from atesd.kernels import _ops
from atesd.kernels.reference import linear_kl


def _installed() -> bool:
    try:
        importlib.metadata.distribution("atesd")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if os.environ.get("ATESD_DISABLE_NATIVE", "0") == "1":
    pytest.skip("native kernel disabled by ATESD_DISABLE_NATIVE=1", allow_module_level=True)
if not kernels.native_cpu_available() and not _installed():
    # An installed package must have built it: then the tests below run and fail instead of skipping.
    pytest.skip("native kernel not built: run `make setup`, or build by hand (docs/native.md)",
                allow_module_level=True)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
       torch.float16: dict(rtol=5e-3, atol=1e-3)}


def test_native_kernel_is_the_active_cpu_backend():
    assert kernels.native_cpu_available(), "the package is installed but the native kernel did not load"
    assert kernels.backend_for("cpu") == "native"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("atesd_native::linear_kl_fwd", "CPU")
    hs = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.profiler.profile() as prof:
        kernels.fused_linear_kl(hs, torch.randn(4, 8), torch.randn(30, 8), clip=0.05).backward()
    names = {e.name for e in prof.function_events}
    assert {"atesd_native::linear_kl_fwd", "atesd_native::linear_kl_bwd"} <= names


@pytest.fixture
def tiny_tiles():
    old = torch.ops.atesd_native._set_tiles(5, 16)
    yield
    torch.ops.atesd_native._set_tiles(*old)


def _make(n, h, v, dtype, *, scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=gen) * scale
    ht = hs + 0.7 * torch.randn(n, h, generator=gen) * scale
    w = torch.randn(v, h, generator=gen) / h**0.5
    return hs.to(dtype), ht.to(dtype), w.to(dtype)


def _compare(hs, ht, w, dtype, **kw):
    """Ours (native) vs the reference: loss, stats and the gradients of hs, w and the bias when given."""
    out = []
    for fn in (kernels.fused_linear_kl, linear_kl):
        s = hs.clone().requires_grad_(True)
        wc = w.clone().requires_grad_(True)
        extra = {k: (v.clone().requires_grad_(True) if k == "bias" else v) for k, v in kw.items()}
        loss, stats = fn(s, ht, wc, return_stats=True, **extra)
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1))
        leaves = [s, wc] + ([extra["bias"]] if "bias" in extra else [])
        out.append((loss, stats, torch.autograd.grad((loss * upstream).sum(), leaves)))
    (loss, stats, grads), (rloss, rstats, rgrads) = out
    tol = TOL[dtype]
    torch.testing.assert_close(loss.float(), rloss.float(), **tol)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g.float(), rg.float(), **tol)
    for name in rstats:
        torch.testing.assert_close(stats[name], rstats[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
    return loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.05, 1e-4])
def test_ragged_tiles_match_reference(tiny_tiles, beta, clip):
    hs, ht, w = _make(37, 24, 301, torch.float32)
    bias = torch.randn(301)
    mask = torch.rand(37, generator=torch.Generator().manual_seed(2)) > 0.3
    _compare(hs, ht, w, torch.float32, temperature=1.1, clip=clip, beta=beta, mask=mask, bias=bias,
             reduction="none")


def test_sparse_clip_pass_on_peaked_teacher(tiny_tiles):
    # A confident teacher puts l[v] > clip in a few tiles only: the bound must find exactly those.
    hs, ht, w = _make(23, 16, 250, torch.float32, scale=1.0)
    for beta in (0.0, 1.0):
        clipped = _compare(hs, ht * 20.0, w, torch.float32, clip=0.02, beta=beta)
        unclipped = _compare(hs, ht * 20.0, w, torch.float32, clip=None, beta=beta)
        assert float(clipped.detach()) < float(unclipped.detach()) - 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(tiny_tiles, dtype):
    hs, ht, w = _make(19, 32, 97, dtype)
    _compare(hs, ht, w, dtype, temperature=1.1, clip=0.05, beta=0.0)
    _compare(hs, ht, w, dtype, teacher_weight=(w.float() * 1.1).to(dtype), clip=0.05, beta=0.5)


def test_thread_count_does_not_change_the_result(tiny_tiles):
    hs, ht, w = _make(29, 16, 203, torch.float32)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.atesd_native.linear_kl_fwd(hs, ht, w, None, None, None, 1.1, 0.05, 0.0))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_default_tiles_with_ragged_edges(beta):
    # The production tile sizes: N spans two row blocks and V five vocabulary tiles, both with a ragged last one.
    hs, ht, w = _make(300, 16, 1100, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        _compare(hs, ht, w, torch.float32, temperature=1.1, clip=0.05, beta=beta, bias=torch.randn(1100))
    finally:
        torch.set_num_threads(threads)


def test_tokens_fewer_than_threads_and_one_tile():
    hs, ht, w = _make(1, 8, 7, torch.float32)
    _compare(hs, ht, w, torch.float32, clip=0.05)


def test_direct_call_errors_are_clear():
    hs, ht, w = _make(4, 8, 20, torch.float32)
    op = torch.ops.atesd_native.linear_kl_fwd
    with pytest.raises(RuntimeError, match="w must be \\[V, H\\]"):
        op(hs, ht, w[:, :-1], None, None, None, 1.0, 0.05, 0.0)
    with pytest.raises(RuntimeError, match="bias must be \\[V\\]"):
        op(hs, ht, w, None, torch.zeros(3), None, 1.0, 0.05, 0.0)
    with pytest.raises(RuntimeError, match="beta must be in"):
        op(hs, ht, w, None, None, None, 1.0, 0.05, 2.0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(hs.double(), ht.double(), w.double(), None, None, None, 1.0, 0.05, 0.0)


def test_disable_switch_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("ATESD_DISABLE_NATIVE", "1")
    monkeypatch.setattr(_ops, "_NATIVE", None)
    assert _ops.backend_for("cpu") == "torch"
    monkeypatch.delenv("ATESD_DISABLE_NATIVE")
    monkeypatch.setattr(_ops, "_NATIVE", None)
    assert _ops.backend_for("cpu") == "native"
