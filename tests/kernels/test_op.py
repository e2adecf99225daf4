"""The fused op against the plain-torch reference: value, gradients and stats, on every available backend.

CPU backends ('torch' tiled path, 'native' C++ when built) run everywhere; 'cuda' (Triton) runs when a GPU is
present. The CPU tile sizes are shrunk so that small shapes still span several ragged row blocks and vocab tiles.
"""

from __future__ import annotations

import pytest
import torch

from atesd import kernels
from atesd.kernels import _ops, cpu_tiled
from atesd.kernels.reference import linear_kl

BACKENDS = ["torch"] + (["native"] if kernels.native_cpu_available() else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(cpu_tiled, "ROWS", 16)
    monkeypatch.setattr(cpu_tiled, "COLS", 128)
    name = request.param
    if name in ("torch", "native"):
        monkeypatch.setattr(_ops, "backend_for", lambda device: name)
    return name


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _make(n, h, v, dtype, device, *, scale=1.0, seed=0, leading=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, h) if leading is None else (*leading, h)
    hs = torch.randn(shape, generator=gen) * scale
    ht = hs + 0.5 * torch.randn(shape, generator=gen) * scale
    w = torch.randn(v, h, generator=gen) / h**0.5
    return [t.to(device=device, dtype=dtype) for t in (hs, ht, w)]


def _compare(backend, hs, ht, w, *, dtype, grad_weight=False, **kw):
    """Run ours and the reference on the same inputs; compare loss, d hs (and d W), and stats."""
    results = []
    for fn in (kernels.fused_linear_kl, linear_kl):
        s = hs.detach().clone().requires_grad_(True)
        wc = w.detach().clone().requires_grad_(grad_weight)
        loss, stats = fn(s, ht, wc, return_stats=True, **kw)
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device)
        grads = torch.autograd.grad((loss * upstream).sum(), [s, wc] if grad_weight else [s])
        results.append((loss, stats, grads))
    (loss, stats, grads), (rloss, rstats, rgrads) = results
    tol = TOL[dtype]
    torch.testing.assert_close(loss.float(), rloss.float(), **tol)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g.float(), rg.float(), **tol)
    for name in rstats:
        assert stats[name].shape == rstats[name].shape
        torch.testing.assert_close(stats[name], rstats[name], **tol, msg=lambda m, name=name: f"stat {name}: {m}")
    return loss, rloss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("temperature", [1.0, 1.1])
def test_matches_reference_fp32(backend, beta, clip, temperature):
    dev = _device(backend)
    hs, ht, w = _make(37, 24, 301, torch.float32, dev, scale=3.0)
    mask = torch.rand(37, generator=torch.Generator().manual_seed(2)).to(dev) > 0.3
    _compare(backend, hs, ht, w, dtype=torch.float32, temperature=temperature, clip=clip, beta=beta, mask=mask)


@pytest.mark.parametrize("beta,clip", [(0.0, 0.05), (0.5, None), (1.0, 0.05)])
def test_matches_reference_bf16(backend, beta, clip):
    dev = _device(backend)
    hs, ht, w = _make(29, 32, 257, torch.bfloat16, dev, scale=3.0)
    _compare(backend, hs, ht, w, dtype=torch.bfloat16, temperature=1.1, clip=clip, beta=beta)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_weight_grad_and_leading_dims(backend, reduction):
    dev = _device(backend)
    hs, ht, w = _make(None, 16, 130, torch.float32, dev, leading=(3, 7))
    mask = (torch.arange(21).reshape(3, 7) % 4 != 0).to(dev)
    _compare(backend, hs, ht, w, dtype=torch.float32, grad_weight=True, clip=0.05, temperature=1.1,
             mask=mask, reduction=reduction)


def test_separate_teacher_weight_and_biases(backend):
    dev = _device(backend)
    hs, ht, w = _make(19, 16, 200, torch.float32, dev, scale=2.0)
    wt = w + 0.1 * torch.randn_like(w)
    bias = torch.randn(200, device=dev)
    for kw in (dict(bias=bias), dict(teacher_weight=wt, bias=bias, teacher_bias=-bias), dict(teacher_weight=wt)):
        _compare(backend, hs, ht, w, dtype=torch.float32, clip=0.05, beta=0.5, **kw)


def test_bias_gradient(backend):
    dev = _device(backend)
    hs, ht, w = _make(11, 8, 70, torch.float32, dev)
    out = []
    for fn in (kernels.fused_linear_kl, linear_kl):
        b = torch.linspace(-1, 1, 70, device=dev).requires_grad_(True)
        (gb,) = torch.autograd.grad(fn(hs, ht, w, bias=b, clip=0.05), [b])
        out.append(gb)
    torch.testing.assert_close(out[0], out[1], **TOL[torch.float32])


def test_clipping_changes_the_loss_on_a_peaked_teacher(backend):
    dev = _device(backend)
    hs, ht, w = _make(16, 16, 150, torch.float32, dev)
    ht = ht * 30.0  # a very confident teacher: some pointwise terms exceed the clip
    clipped, rclipped = _compare(backend, hs, ht, w, dtype=torch.float32, clip=0.05)
    unclipped, _ = _compare(backend, hs, ht, w, dtype=torch.float32, clip=None)
    assert float(clipped.detach()) < float(unclipped.detach()) - 1e-3


def test_extreme_logits(backend):
    dev = _device(backend)
    hs, ht, w = _make(9, 8, 140, torch.float32, dev)
    hs, ht = hs * 3000.0, ht * 3000.0  # |z| ~ 1e4
    loss, _ = _compare(backend, hs, ht, w, dtype=torch.float32, clip=0.05, beta=0.0)
    assert torch.isfinite(loss)
    for beta in (0.5, 1.0):
        _compare(backend, hs, ht, w, dtype=torch.float32, clip=None, beta=beta)


def test_all_masked_and_empty(backend):
    dev = _device(backend)
    hs, ht, w = _make(6, 8, 50, torch.float32, dev)
    s = hs.clone().requires_grad_(True)
    loss, stats = kernels.fused_linear_kl(s, ht, w, mask=torch.zeros(6, dtype=torch.bool, device=dev),
                                          return_stats=True)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(s.grad.abs().sum()) == 0.0
    assert all(float(v.abs().sum()) == 0.0 for v in stats.values())

    empty = torch.zeros(0, 8, device=dev, requires_grad=True)
    for reduction in ("mean", "sum"):
        loss = kernels.fused_linear_kl(empty, empty.detach(), w, reduction=reduction)
        loss.backward()
        assert float(loss.detach()) == 0.0 and empty.grad.shape == (0, 8)
    assert kernels.fused_linear_kl(empty, empty.detach(), w, reduction="none").shape == (0,)


def test_teacher_and_frozen_head_get_no_gradient(backend):
    dev = _device(backend)
    hs, ht, w = _make(5, 8, 40, torch.float32, dev)
    s, t = hs.clone().requires_grad_(True), ht.clone().requires_grad_(True)
    kernels.fused_linear_kl(s, t, w, clip=0.05).backward()
    assert t.grad is None and w.grad is None and s.grad is not None


def test_module_matches_function():
    hs, ht, w = _make(10, 8, 60, torch.float32, "cpu")
    mod = kernels.FusedLinearKL(temperature=1.1, clip=0.05, return_stats=True)
    a, _ = mod(hs, ht, w)
    b, _ = kernels.fused_linear_kl(hs, ht, w, temperature=1.1, clip=0.05, return_stats=True)
    assert torch.equal(a, b)
    assert "clip=0.05" in repr(mod)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(teacher_hidden=a["teacher_hidden"][:, :-1]), "pass the teacher's own head"),
        (lambda a: a.update(teacher_hidden=a["teacher_hidden"][:-1]), "same leading shape"),
        (lambda a: a.update(weight=a["weight"][:, :-1]), "hidden size mismatch"),
        (lambda a: a.update(teacher_hidden=a["teacher_hidden"].double()), "float32, bfloat16 or float16"),
        (lambda a: a.update(teacher_weight=a["weight"][:-1]), "Vt >= V"),
        (lambda a: a.update(teacher_weight=a["weight"][:, :-1]), "must be \\[Vt, Ht\\]"),
        (lambda a: a.update(mask=torch.tensor([0, 1, 5, -100])), "integer mask must hold only 0 and 1"),
        (lambda a: a.update(labels=torch.zeros(4)), "labels must be an integer tensor"),
        (lambda a: a.update(labels=torch.zeros(3, dtype=torch.long)), "shift them yourself"),
        (lambda a: a.update(num_items_in_batch=-1), "num_items_in_batch must be"),
        (lambda a: a.update(num_items_in_batch=4, reduction="sum"), "cannot be used with reduction"),
        (lambda a: a.update(beta=1.5), "beta must be in"),
        (lambda a: a.update(temperature=0.0), "temperature must be"),
        (lambda a: a.update(clip=0.0), "clip must be None"),
        (lambda a: a.update(reduction="avg"), "reduction must be one of"),
        (lambda a: a.update(mask=torch.ones(3)), "mask shape"),
        (lambda a: a.update(bias=torch.zeros(7)), "bias must be"),
        (lambda a: a.update(teacher_hidden=a["teacher_hidden"].to("meta")), "one device"),
    ],
)
def test_clear_errors(mutate, match):
    hs, ht, w = _make(4, 8, 20, torch.float32, "cpu")
    args = dict(student_hidden=hs, teacher_hidden=ht, weight=w)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.fused_linear_kl(**args)


def test_custom_ops_pass_opcheck():
    hs, ht, w = _make(5, 8, 33, torch.float32, "cpu")
    b = torch.randn(33)
    fwd_args = (hs, ht, w, None, b, b, 1.1, 0.05, 0.0)
    torch.library.opcheck(torch.ops.atesd.linear_kl_fwd.default, fwd_args)
    _, _, lse_s, lse_t, g, *_ = torch.ops.atesd.linear_kl_fwd(*fwd_args)
    bwd_args = (torch.randn(5), hs, ht, w, None, b, b, lse_s, lse_t, g, 1.1, 0.05, 0.0, True, True)
    torch.library.opcheck(torch.ops.atesd.linear_kl_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    hs, ht, w = _make(12, 8, 50, torch.float32, "cpu")

    def step(s, t, head):
        loss, stats = kernels.fused_linear_kl(s, t, head, temperature=1.1, clip=0.05, return_stats=True)
        return loss, stats["kl"].mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1, s2 = hs.clone().requires_grad_(True), hs.clone().requires_grad_(True)
    loss_c, kl_c = compiled(s1, ht, w)
    loss_e, kl_e = step(s2, ht, w)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(kl_c, kl_e)
    torch.testing.assert_close(s1.grad, s2.grad)


def test_grad_in_forward_op_passes_opcheck_and_compiles(monkeypatch):
    hs, ht, w = _make(5, 8, 33, torch.float32, "cpu")
    b = torch.randn(33)
    torch.library.opcheck(torch.ops.atesd.linear_kl_fwd_grad.default, (hs, ht, w, None, b, b, 1.1, 0.05, 0.0))
    monkeypatch.setattr(_ops, "grad_in_forward", lambda device: True)  # the frozen-head path, on CPU
    test_torch_compile_fullgraph()


@pytest.mark.parametrize("in_forward", [False, True])
def test_double_backward_is_refused_not_wrong(monkeypatch, in_forward):
    # a second derivative through the op is not supported: an error, never a silently incomplete result (the
    # frozen-head gradient formed in the forward carries no graph)
    monkeypatch.setattr(_ops, "grad_in_forward", lambda device: in_forward)
    hs, ht, w = _make(6, 8, 33, torch.float32, "cpu")
    s = hs.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kernels.fused_linear_kl(s, ht, w, clip=0.05), s, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable|twice"):
        torch.autograd.grad(g.sum(), s)
