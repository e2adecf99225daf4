"""Triton backend (kernels.triton_kl) against materialised-logit torch built on kernels.reference.

Without CUDA the root conftest sets TRITON_INTERPRET=1, so these run in Triton's interpreter on CPU tensors
(small shapes); on a CUDA machine the same tests run the compiled kernels.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from atesd.kernels import reference

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
triton_kl = pytest.importorskip("atesd.kernels.triton_kl")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INF = math.inf
OUT_NAMES = ("loss", "kl", "lse_s", "lse_t", "g", "agree", "maxp", "ent")


@pytest.fixture(autouse=True)
def _fused_backward_unless_asked(monkeypatch):
    """The tests below the workspace section check the fused backward (its gradient filter, atomics); the default
    (a dz workspace) has tests of its own at the end of this file."""
    monkeypatch.setenv("ATESD_TRITON_BWD_WORKSPACE_MIB", "0")


def make(n=37, h=40, v=291, dtype=torch.float32, teacher_noise=0.5, wscale=0.4, seed=0, sep_w=False,
         bias=False, sep_bias=False):
    """Random inputs; V=291 and N=37, H=40 are multiples of no tile size."""
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=gen)
    ht = hs + teacher_noise * torch.randn(n, h, generator=gen)
    w = wscale * torch.randn(v, h, generator=gen)
    wt = w + 0.1 * torch.randn(v, h, generator=gen) if sep_w else None
    bs = torch.randn(v, generator=gen) if bias else None
    bt = (torch.randn(v, generator=gen) if sep_bias else bs) if bias else None
    cast = lambda t: None if t is None else t.to(DEV, dtype)
    return cast(hs), cast(ht), cast(w), cast(wt), cast(bs), cast(bt)


def expected(hs, ht, w, wt, bs, bt, temperature, clip, beta, grad=None, need_w=False, need_b=False):
    """Contract outputs from materialised fp32 logits; gp = dl/dlog ps by autograd (not kernel formulas)."""
    f = lambda t: None if t is None else t.detach().float().cpu()
    hs32, ht32, w32, wt32, bs32, bt32 = map(f, (hs, ht, w, wt, bs, bt))
    zs = hs32 @ w32.T + (0 if bs32 is None else bs32)
    zt = ht32 @ (w32 if wt32 is None else wt32).T + (0 if bt32 is None else bt32)
    zs, zt = zs / temperature, zt / temperature
    lps, lpt = zs.log_softmax(-1), zt.log_softmax(-1)
    lps_leaf = lps.clone().requires_grad_()
    lv = reference.pointwise_divergence(lps_leaf, lpt, beta)
    (gp,) = torch.autograd.grad(lv.sum(), lps_leaf)
    lv = lv.detach()
    keep = lv <= clip
    out = {
        "loss": torch.where(keep, lv, torch.full_like(lv, clip)).sum(-1),
        "kl": lv.sum(-1),
        "lse_s": zs.logsumexp(-1),
        "lse_t": zt.logsumexp(-1),
        "g": (keep * gp).sum(-1),
        "agree": (zs.argmax(-1) == zt.argmax(-1)).float(),
        "maxp": lps.max(-1).values.exp(),
        "ent": -(lps.exp() * lps).sum(-1),
    }
    if grad is None:
        return out
    # gradients through the public reference (autograd), teacher bias passed explicitly
    hs_l = hs32.clone().requires_grad_()
    w_l = w32.clone().requires_grad_(need_w)
    b_l = None if bs32 is None else bs32.clone().requires_grad_(need_b)
    t_bias = bt32
    if bt32 is None and wt32 is None and bs32 is not None:  # contract: bt None means no teacher bias
        t_bias = torch.zeros(w32.shape[0])
    per_token = reference.linear_kl(hs_l, ht32, w_l, teacher_weight=wt32, bias=b_l, teacher_bias=t_bias,
                                    temperature=temperature, clip=None if clip == INF else clip, beta=beta,
                                    reduction="none")
    per_token.backward(grad.float().cpu())
    torch.testing.assert_close(per_token.detach(), out["loss"], rtol=1e-5, atol=1e-5)  # references agree
    out["grad_hs"] = hs_l.grad
    out["grad_w"] = w_l.grad
    out["grad_b"] = None if b_l is None else b_l.grad
    return out


def assert_near(got, want, rtol, name):
    """Elementwise |got - want| <= rtol * (|want| + 0.1 max|want| + 1e-6): relative, floored near zero."""
    got = got.detach().float().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    tol = rtol * (want.abs() + 0.1 * want.abs().max() + 1e-6)
    err = (got - want).abs()
    worst = (err / tol).max().item()
    assert (err <= tol).all(), f"{name}: max err {err.max().item():.3g}, worst err/tol {worst:.3g}"


def run_both(args, temperature, clip, beta, grad, need_w, need_b, impl=None):
    """Forward then backward of ``impl`` (default the tile path, ``triton_kl``; or ``triton_kl_rows``)."""
    impl = impl or triton_kl
    fwd = impl.forward(*args, temperature, clip, beta)
    assert len(fwd) == 8 and all(t.dtype == torch.float32 and t.shape == (args[0].shape[0],) for t in fwd)
    bwd = impl.backward(grad, *args, fwd[2], fwd[3], fwd[4], temperature, clip, beta, need_w, need_b)
    return dict(zip(OUT_NAMES, fwd)), bwd


def check_all(args, temperature, clip, beta, need_w=True, need_b=True, rtol=1e-4, grad_rtol=1e-4, seed=1,
              impl=None):
    n = args[0].shape[0]
    grad = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEV)
    need_b = need_b and args[4] is not None
    fwd, (ghs, gw, gb) = run_both(args, temperature, clip, beta, grad, need_w, need_b, impl)
    want = expected(*args, temperature, clip, beta, grad=grad, need_w=need_w, need_b=need_b)
    for name in OUT_NAMES:
        assert_near(fwd[name], want[name], rtol, name)
    assert ghs.dtype == args[0].dtype and ghs.shape == args[0].shape
    assert_near(ghs, want["grad_hs"], grad_rtol, "grad_hs")
    if need_w:
        assert gw.dtype == torch.float32
        assert_near(gw, want["grad_w"], grad_rtol, "grad_w")
    else:
        assert gw.numel() == 0
    if need_b:
        assert_near(gb, want["grad_b"], grad_rtol, "grad_b")
    else:
        assert gb.numel() == 0
    return fwd, want


@pytest.mark.parametrize("temperature", [1.0, 1.1])
@pytest.mark.parametrize("clip", [INF, 0.05])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fp32_matches_reference(beta, clip, temperature):
    check_all(make(bias=True), temperature, clip, beta)


@pytest.mark.parametrize("beta,clip,need_w,need_b",
                         [(0.0, INF, False, True), (0.5, 0.05, True, False), (1.0, 0.05, False, False)])
def test_separate_teacher_head_and_bias(beta, clip, need_w, need_b):
    check_all(make(n=21, sep_w=True, bias=True, sep_bias=True, seed=3), 1.1, clip, beta, need_w, need_b)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_peaked_teacher_clipping_changes_loss(beta):
    # an independent, sharp teacher puts mass where the student has little: some l[n, v] exceed the clip
    hs, _, w, *_ = make(n=24, seed=5)
    ht = 6.0 * torch.randn(hs.shape, generator=torch.Generator().manual_seed(6)).to(DEV)
    fwd, want = check_all((hs, ht, w, None, None, None), 1.0, 0.05, beta)
    assert (want["kl"] - want["loss"]).min() > 0.05  # clipping bites on every token
    assert (fwd["kl"] - fwd["loss"]).min() > 0.05


@pytest.mark.parametrize("beta,clip", [(0.0, INF), (0.5, 0.05), (1.0, INF)])
def test_extreme_logits_stay_finite(beta, clip):
    # |z| ~ 1e4: every distribution is (nearly) one-hot and the KL is in the thousands
    args = make(n=19, h=32, v=150, wscale=1e4 / math.sqrt(32), seed=7)
    # logits of 1e4 carry fp32 rounding of ~1e-3, so any implementation's probabilities are good to ~1e-3
    fwd, want = check_all(args, 1.0, clip, beta, rtol=1e-3, grad_rtol=1e-3)
    assert want["lse_s"].abs().max() > 1e3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta,clip,temperature", [(0.0, INF, 1.0), (0.5, 0.05, 1.1), (1.0, 0.05, 1.1)])
def test_half_precision(dtype, beta, clip, temperature):
    # bf16/fp16 operands, fp32 accumulation: the forward matches fp32 math on the same rounded inputs closely;
    # the backward rounds dz to the input dtype before the W/hs products and returns grad_hs in that dtype.
    check_all(make(dtype=dtype, bias=True, seed=11), temperature, clip, beta, rtol=1e-3, grad_rtol=2e-2)


def _filter_case(n=33, h=40, v=600, hot=256, cold_logit=-6.0, seed=13):
    """bf16 inputs whose vocabulary columns [hot, v) are cold for every row: logits ~ cold_logit below the rest
    (per-row probability mass there < 1e-4, so every tile of them falls under a 1e-2 filtering budget, whatever
    BLOCK_N / BLOCK_V / the split count), and the only columns with a non-zero entry in coordinate 0 of W. So a
    tile skip is visible (grad_hs[:, 0] comes from skipped tiles only) under any kernel config."""
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=gen)
    ht = hs + 0.5 * torch.randn(n, h, generator=gen)
    hs[:, 0] = ht[:, 0] = 1.0
    w = 0.5 * torch.randn(v, h, generator=gen)
    w[:hot, 0] = 0.0
    w[hot:, 1:] *= 0.2
    w[hot:, 0] = cold_logit
    return tuple(t.to(DEV, torch.bfloat16) for t in (hs, ht, w)) + (None, None, None)


def test_gradient_filter(monkeypatch):
    args = _filter_case()
    grad = torch.randn(33, generator=torch.Generator().manual_seed(2)).to(DEV)
    fwd, _ = run_both(args, 1.0, INF, 0.0, grad, False, False)

    def bwd(eps):
        monkeypatch.setenv("ATESD_GRAD_FILTER_EPS", str(eps))
        saved = (fwd["lse_s"], fwd["lse_t"], fwd["g"])
        return triton_kl.backward(grad, *args, *saved, 1.0, INF, 0.0, True, False)

    exact_hs, exact_w, _ = bwd(0.0)
    assert (exact_hs[:, 0] != 0).all()  # the cold columns do reach the gradient when nothing is skipped
    default_hs, default_w, _ = bwd(2.0**-20)
    scale = exact_hs.float().abs().max()
    assert (default_hs.float() - exact_hs.float()).abs().max() <= 2.0**-8 * scale
    assert (default_w - exact_w).abs().max() <= 1e-3 * exact_w.abs().max()
    eps = 1e-2  # a large budget drops the cold tiles; per row the error stays within eps |grad[n]| max|W| (+ rounding)
    some_hs, some_w, _ = bwd(eps)
    assert (some_hs[:, 0] == 0).all() and (some_w[256:] == 0).all()  # every cold tile skipped, whatever the config
    assert (some_w[:256] != 0).any()  # the hot ones are not
    diff = (some_hs.float() - exact_hs.float()).abs().amax(1)
    bound = eps * grad.abs().float() * args[2].float().abs().max() + 2.0**-7 * exact_hs.float().abs().amax(1)
    assert (diff <= bound).all()
    none_hs, none_w, _ = bwd(1e9)  # everything skipped
    assert none_hs.abs().max() == 0 and none_w.abs().max() == 0


def check_masked_rows(n: int, impl=None):
    """Every third row masked (grad 0): exactly zero grad_hs there, grad_hs and grad_w near the reference.
    Returns (grad_b, its reference)."""
    args = make(n=n, bias=True, seed=17)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(3))
    grad[::3] = 0.0
    grad = grad.to(DEV)
    fwd, (ghs, gw, gb) = run_both(args, 1.0, 0.05, 0.0, grad, True, True, impl)
    want = expected(*args, 1.0, 0.05, 0.0, grad=grad, need_w=True, need_b=True)
    assert (ghs[::3] == 0).all()
    assert_near(ghs, want["grad_hs"], 1e-4, "grad_hs")
    assert_near(gw, want["grad_w"], 1e-4, "grad_w")
    return gb, want["grad_b"]


def test_masked_tokens_get_exactly_zero_gradient():
    check_masked_rows(29)


@pytest.mark.parametrize("splits", ["1", "3"])
def test_vocab_split_count_does_not_change_results(monkeypatch, splits):
    monkeypatch.setenv("ATESD_TRITON_VSPLITS", splits)
    check_all(make(n=17, bias=True, seed=19), 1.1, 0.05, 0.5)


def test_empty_batch():
    hs, ht, w, *_ = make(n=0)
    fwd = triton_kl.forward(hs, ht, w, None, None, None, 1.0, INF, 0.0)
    assert len(fwd) == 8 and all(t.shape == (0,) and t.dtype == torch.float32 for t in fwd)
    empty = torch.zeros(0, device=DEV)
    ghs, gw, gb = triton_kl.backward(empty, hs, ht, w, None, None, None, empty, empty, empty,
                                     1.0, INF, 0.0, True, False)
    assert ghs.shape == hs.shape and gw.shape == w.shape and gw.abs().max() == 0 and gb.numel() == 0


def test_bad_inputs_are_named():
    hs, ht, w, *_ = make(n=4)
    with pytest.raises(TypeError, match="dtype"):
        triton_kl.forward(hs, ht, w.double(), None, None, None, 1.0, INF, 0.0)
    with pytest.raises(ValueError, match="w must be"):
        triton_kl.forward(hs, ht, w[:, :-1], None, None, None, 1.0, INF, 0.0)
    with pytest.raises(ValueError, match="bs must be"):
        triton_kl.forward(hs, ht, w, None, w[0], None, 1.0, INF, 0.0)


def test_backward_atomics_are_relaxed():
    # Nothing reads grad_hs / grad_w / grad_b before the kernel ends, so the atomics need no ordering. The default
    # (acq_rel) wraps each vector atomic in MEMBAR.ALL.GPU ... CCTL.IVALL on sm_90; relaxed ones are plain REDG
    # (the compiled code is checked by test_kernels_compile_for_h100).
    import ast
    import inspect

    from atesd.kernels import triton_topk

    # grad_b (twice: the fused and the workspace backward), grad_hs, grad_w; the top-k's sparse pair too
    for module, count in ((triton_kl, 4), (triton_topk, 5)):
        calls = [node for node in ast.walk(ast.parse(inspect.getsource(module)))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr.startswith("atomic_")]
        assert len(calls) == count, module.__name__
        for call in calls:
            sem = {k.arg: k.value for k in call.keywords}.get("sem")
            assert isinstance(sem, ast.Constant) and sem.value == "relaxed", ast.unparse(call)


_AOT = r"""
import os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("ATESD_TRITON_CONFIG", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from atesd.kernels import triton_kl as tk

def compile(kernel, cfg, consts, dtype="*bf16"):
    fn, consts = kernel.fn, dict(consts, **cfg.kwargs)
    def kind(a):
        if a in consts:
            return "constexpr"
        if a.endswith("_ptr"):
            return dtype if a in ("hs_ptr", "ht_ptr", "w_ptr", "wt_ptr", "dz_ptr") else "*fp32"
        return "i32" if a in ("N", "V", "H", "HT", "n_splits", "split_len", "ld_dz", "out_stride") else "fp32"
    sig = {a: kind(a) for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or a in ("N", "V", "H", "HT", "split_len", "ld_dz")}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))

def spill_bytes(compiled):
    # ptxas -v on the kernel's PTX: "N bytes spill stores"
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        out = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", ptx, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    return int(re.search(r"(\d+) bytes spill stores", out).group(1))

cfg = tk._BWD_CONFIGS[0]
common = dict(HAS_BS=True, HAS_BT=True, SHARED_W=True, DOT_PREC="tf32", DOT_PREC_T="tf32", GROUP_N=8)
for kernel, consts in ((tk._stats_kernel, dict(CROSS=0)), (tk._loss_kernel, dict(MODE=2, HAS_CLIP=True)),
                       (tk._loss_kernel, dict(MODE=0, HAS_CLIP=True, SHARED_W=False)),  # teacher head of its own
                       (tk._bwd_kernel, dict(MODE=2, HAS_CLIP=True, NEED_W=True, NEED_B=True))):
    compiled = compile(kernel, cfg, dict(common, **consts))
print("compiled")
# the backward's atomics: relaxed in the PTX, no GPU-wide fence in the SASS
ptx = compiled.asm["ptx"]
print("atomics", len(re.findall(r"(?:red|atom)\.global[._a-z0-9]*\.add", ptx)), "acq_rel", ptx.count("acq_rel"))
cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
if os.path.exists(cuobjdump):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        sass = subprocess.run([cuobjdump, "-sass", fh.name], capture_output=True, text=True, check=True).stdout
    print("membar_gpu", sass.count("MEMBAR.ALL.GPU"), "redg", sass.count("REDG"))
# register spills of every backward config the autotuner may pick (beta 0 with clip, grad_w too)
bwd = dict(common, MODE=0, HAS_CLIP=True, NEED_W=True, NEED_B=False, HAS_BS=False, HAS_BT=False)
for c in tk._BWD_CONFIGS:
    ieee = tk._is_ieee(c)
    consts = dict(bwd, DOT_PREC="ieee", DOT_PREC_T="ieee") if ieee else bwd
    spilled = spill_bytes(compile(tk._bwd_kernel, c, consts, "*fp32" if ieee else "*bf16"))
    print("spills", c.kwargs, c.num_warps, spilled)
# the workspace backward's dz kernel: every config it may pick
dzc = dict(common, MODE=0, HAS_CLIP=True, NEED_B=True, HAS_BS=False, HAS_BT=False)
for c in tk._DZ_CONFIGS:
    ieee = tk._is_ieee(c)
    consts = dict(dzc, DOT_PREC="ieee", DOT_PREC_T="ieee") if ieee else dzc
    spilled = spill_bytes(compile(tk._dz_kernel, c, consts, "*fp32" if ieee else "*bf16"))
    print("dzspills", c.kwargs, c.num_warps, spilled)
# the rows path's two pointwise kernels (JSD with a clip and biases, the forward writing dz): every config
from atesd.kernels import triton_kl_rows as tr
rows = dict(MODE=2, HAS_CLIP=True, HAS_BS=True, HAS_BT=True)
for c in tr._row_configs():
    spilled = spill_bytes(compile(tr._rows_fwd_kernel, c, dict(rows, WRITE_DZ=True)))
    spilled += spill_bytes(compile(tr._rows_dz_kernel, c, rows))
    print("rowspills", c.kwargs, c.num_warps, spilled)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_h100():
    # The interpreter skips Triton's compiler; compile the bf16 kernels for sm_90 (ptxas ships with the wheel)
    # so GPU-only errors (non-constexpr globals, dot shapes, shared memory) show up on a CPU-only machine.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas available to compile for sm_90")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
    atomics = re.search(r"atomics (\d+) acq_rel (\d+)", proc.stdout)
    assert int(atomics.group(1)) > 0 and int(atomics.group(2)) == 0, proc.stdout
    fences = re.search(r"membar_gpu (\d+) redg (\d+)", proc.stdout)
    if fences:  # cuobjdump ships with the wheel
        assert int(fences.group(1)) == 0 and int(fences.group(2)) > 0, proc.stdout
    # the dropped configs spilled 60-700 bytes per thread (triton_kl.py, at _TC_FWD); a few bytes vary with ptxas
    spills = re.findall(r"^spills (.*) (\d+)$", proc.stdout, re.M)
    assert len(spills) == len(triton_kl._TC_BWD + triton_kl._IEEE) and all(int(b) <= 16 for _, b in spills), spills
    spills = re.findall(r"^dzspills (.*) (\d+)$", proc.stdout, re.M)
    assert len(spills) == len(triton_kl._TC_DZ + triton_kl._IEEE) and all(int(b) <= 16 for _, b in spills), spills
    spills = re.findall(r"^rowspills (.*) (\d+)$", proc.stdout, re.M)
    assert len(spills) == 4 and all(int(b) == 0 for _, b in spills), spills  # the rows path's 4 configs


# the workspace backward (ATESD_TRITON_BWD_WORKSPACE_MIB > 0): dz of a block of rows materialised, cuBLAS products


def _workspace(monkeypatch, rows: int, v: int, dtype=torch.float32) -> None:
    """Set the workspace budget so the backward takes ``rows`` rows at a time (a multiple of 64)."""
    row_bytes = -(-v // 8) * 8 * torch.empty((), dtype=dtype).element_size()
    monkeypatch.setenv("ATESD_TRITON_BWD_WORKSPACE_MIB", str(rows * row_bytes / 2**20))
    assert triton_kl.workspace_rows(10**6, v, dtype) == rows


@pytest.mark.parametrize("beta,clip,temperature", [(0.0, INF, 1.0), (0.0, 0.05, 1.1), (0.5, 0.05, 1.1),
                                                   (1.0, INF, 1.0)])
def test_workspace_backward_matches_reference(monkeypatch, beta, clip, temperature):
    _workspace(monkeypatch, 64, 291)
    check_all(make(n=150, bias=True, seed=23), temperature, clip, beta)  # 3 blocks of rows, the last one short


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_workspace_backward_half_precision(monkeypatch, dtype):
    _workspace(monkeypatch, 64, 291, dtype)
    check_all(make(n=70, dtype=dtype, bias=True, seed=11), 1.1, 0.05, 0.5, rtol=1e-3, grad_rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_uninitialised_memory_reaches_a_result(monkeypatch, dtype):
    """Every buffer the op allocates uninitialised starts as NaN here: none may reach an output. (Regression: the
    workspace's padding columns [V, ld) were read by torch's CPU bf16 mm with V odd, NaN now and then in grad_hs.)"""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def alloc(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return alloc

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
    _workspace(monkeypatch, 64, 291, dtype)
    loose = dtype == torch.bfloat16
    check_all(make(n=70, dtype=dtype, bias=True, seed=11), 1.1, 0.05, 0.5, rtol=1e-3 if loose else 1e-4,
              grad_rtol=2e-2 if loose else 1e-4)
    monkeypatch.setenv("ATESD_TRITON_BWD_WORKSPACE_MIB", "0")  # the fused backward too
    check_all(make(n=70, dtype=dtype, bias=True, seed=11), 1.1, 0.05, 0.5, rtol=1e-3 if loose else 1e-4,
              grad_rtol=2e-2 if loose else 1e-4)
    _rows(monkeypatch, 64, 291, dtype)  # and the rows path (two blocks, the second short)
    check_all(make(n=70, dtype=dtype, bias=True, seed=11), 1.1, 0.05, 0.5, rtol=1e-3 if loose else 1e-4,
              grad_rtol=2e-2 if loose else 1e-4)


def test_workspace_backward_separate_head_masked_and_nan_rows(monkeypatch):
    _workspace(monkeypatch, 64, 291)
    check_all(make(n=90, sep_w=True, bias=True, sep_bias=True, seed=3), 1.1, 0.05, 0.0)
    gb, want_gb = check_masked_rows(130)  # masked rows exactly zero in each of the three blocks
    assert_near(gb, want_gb, 1e-4, "grad_b")
    hs, ht, w, *_ = make(n=100, seed=5)
    hs[70, 3] = math.nan  # in the second block
    grad = torch.ones(100, device=DEV)
    fwd, (ghs, gw, _) = run_both((hs, ht, w, None, None, None), 1.0, 0.05, 0.0, grad, True, False)
    assert torch.isnan(ghs[70]).all() and torch.isfinite(ghs[torch.arange(100) != 70]).all()
    assert torch.isnan(gw).any()


def test_workspace_rows_follow_the_budget(monkeypatch):
    monkeypatch.setenv("ATESD_TRITON_BWD_WORKSPACE_MIB", "0")
    assert triton_kl.workspace_rows(8192, 151936, torch.bfloat16) == 0  # 0: the fused backward
    monkeypatch.delenv("ATESD_TRITON_BWD_WORKSPACE_MIB")
    assert triton_kl.workspace_rows(8192, 151936, torch.bfloat16) == 1728  # default 512 MiB / (151936 x 2 B)
    assert triton_kl.workspace_rows(8192, 151936, torch.float32) == 832
    assert triton_kl.workspace_rows(100, 151936, torch.bfloat16) == 100  # never more rows than there are
    monkeypatch.setenv("ATESD_TRITON_BWD_WORKSPACE_MIB", "0.001")
    assert triton_kl.workspace_rows(8192, 151936, torch.bfloat16) == 64  # at least one block
    for bad in ("lots", "nan"):
        monkeypatch.setenv("ATESD_TRITON_BWD_WORKSPACE_MIB", bad)
        with pytest.raises(ValueError, match="ATESD_TRITON_BWD_WORKSPACE_MIB must be"):
            triton_kl.workspace_rows(8192, 151936, torch.bfloat16)


# the rows path (kernels/triton_kl_rows.py, ATESD_TRITON_ROWS_MIB > 0): cuBLAS logits for a block of rows, Triton
# pointwise passes over them; the same contract, so the same checks


triton_kl_rows = pytest.importorskip("atesd.kernels.triton_kl_rows")


def _rows(monkeypatch, rows: int, v: int, dtype=torch.float32) -> None:
    """Set the rows budget so the path takes ``rows`` rows at a time (a multiple of 64)."""
    row_bytes = v * (8 + torch.empty((), dtype=dtype).element_size())
    monkeypatch.setenv("ATESD_TRITON_ROWS_MIB", str(rows * row_bytes / 2**20))
    assert triton_kl_rows.block_rows(10**6, v, dtype) == rows


@pytest.mark.parametrize("beta,clip,temperature", [(0.0, INF, 1.0), (0.0, 0.05, 1.1), (0.5, 0.05, 1.1),
                                                   (0.5, INF, 1.0), (1.0, 0.05, 1.1), (1.0, INF, 1.0)])
def test_rows_path_matches_reference(monkeypatch, beta, clip, temperature):
    _rows(monkeypatch, 64, 291)
    check_all(make(n=150, bias=True, seed=23), temperature, clip, beta, impl=triton_kl_rows)  # 3 blocks, last short


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_path_half_precision(monkeypatch, dtype):
    _rows(monkeypatch, 64, 291, dtype)
    check_all(make(n=70, dtype=dtype, bias=True, seed=11), 1.1, 0.05, 0.5, rtol=1e-3, grad_rtol=2e-2,
              impl=triton_kl_rows)


def test_rows_path_separate_head_extreme_logits_masked_and_nan_rows(monkeypatch):
    _rows(monkeypatch, 64, 291)
    check_all(make(n=90, sep_w=True, bias=True, sep_bias=True, seed=3), 1.1, 0.05, 0.0, impl=triton_kl_rows)
    args = make(n=19, h=32, v=150, wscale=1e4 / math.sqrt(32), seed=7)  # |z| ~ 1e4, see test_extreme_logits...
    check_all(args, 1.0, 0.05, 0.5, rtol=1e-3, grad_rtol=1e-3, impl=triton_kl_rows)
    peaked = make(n=24, seed=5)[0], 6.0 * torch.randn(24, 40, generator=torch.Generator().manual_seed(6)).to(DEV)
    fwd, _ = check_all((*peaked, make(n=24, seed=5)[2], None, None, None), 1.0, 0.05, 0.0, impl=triton_kl_rows)
    assert (fwd["kl"] - fwd["loss"]).min() > 0.05  # the clip bites on every token
    gb, want_gb = check_masked_rows(130, impl=triton_kl_rows)  # masked rows exactly zero in each of three blocks
    assert_near(gb, want_gb, 1e-4, "grad_b")
    hs, ht, w, *_ = make(n=100, seed=5)
    hs[70, 3] = math.nan  # in the second block
    grad = torch.ones(100, device=DEV)
    grad[71] = 0.0
    ht[71, 0] = math.inf  # a masked row holding garbage still gets exactly 0
    fwd, (ghs, gw, _) = run_both((hs, ht, w, None, None, None), 1.0, 0.05, 0.0, grad, True, False, triton_kl_rows)
    assert torch.isnan(fwd["loss"][70]) and not torch.isfinite(fwd["loss"][71])
    ok = torch.ones(100, dtype=torch.bool)
    ok[[70, 71]] = False
    assert torch.isfinite(fwd["loss"][ok]).all() and torch.isfinite(ghs[ok]).all()
    assert torch.isnan(ghs[70]).all() and (ghs[71] == 0).all()


def test_rows_path_forms_the_frozen_head_gradient_in_its_forward(monkeypatch):
    _rows(monkeypatch, 64, 291)
    args = make(n=150, bias=True, seed=29)
    outs = triton_kl_rows.forward(*args, 1.1, 0.05, 0.5, want_grad_hs=True)
    assert len(outs) == 9 and outs[8].shape == args[0].shape and outs[8].dtype == torch.float32
    ones = torch.ones(150, device=DEV)
    want = expected(*args, 1.1, 0.05, 0.5, grad=ones)
    for name, got in zip(OUT_NAMES, outs):
        assert_near(got, want[name], 1e-4, name)
    assert_near(outs[8], want["grad_hs"], 1e-4, "gh1")


def test_rows_path_empty_batch_and_budget(monkeypatch):
    _rows(monkeypatch, 64, 291)
    hs, ht, w, *_ = make(n=0)
    fwd = triton_kl_rows.forward(hs, ht, w, None, None, None, 1.0, INF, 0.0, want_grad_hs=True)
    assert len(fwd) == 9 and all(t.shape == (0,) for t in fwd[:8]) and fwd[8].shape == (0, 40)
    empty = torch.zeros(0, device=DEV)
    ghs, gw, gb = triton_kl_rows.backward(empty, hs, ht, w, None, None, None, empty, empty, empty, 1.0, INF, 0.0,
                                          True, False)
    assert ghs.shape == hs.shape and gw.shape == w.shape and gw.abs().max() == 0 and gb.numel() == 0
    monkeypatch.delenv("ATESD_TRITON_ROWS_MIB")
    assert triton_kl_rows.block_rows(8192, 151936, torch.bfloat16) == 0  # off by default: the tile path
    monkeypatch.setenv("ATESD_TRITON_ROWS_MIB", "512")
    assert triton_kl_rows.block_rows(8192, 151936, torch.bfloat16) == 320  # 512 MiB / (151936 x 10 B), /64*64
    assert triton_kl_rows.block_rows(100, 151936, torch.bfloat16) == 100
    for bad in ("lots", "nan", "-1"):
        monkeypatch.setenv("ATESD_TRITON_ROWS_MIB", bad)
        with pytest.raises(ValueError, match="ATESD_TRITON_ROWS_MIB must be"):
            triton_kl_rows.block_rows(8192, 151936, torch.bfloat16)


@pytest.mark.parametrize("train_head", [False, True])
def test_rows_path_through_the_public_op(monkeypatch, train_head):
    # a frozen head takes linear_kl_fwd_grad (gh1 formed in the forward, scaled in the backward); a trainable one the
    # plain forward and the rows backward; both match the reference, masked rows exactly 0
    from atesd import kernels
    from atesd.kernels import _ops

    monkeypatch.setattr(_ops, "backend_for", lambda device: "triton")
    _rows(monkeypatch, 64, 291)
    calls = []
    real = triton_kl_rows.forward
    monkeypatch.setattr(triton_kl_rows, "forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    hs, ht, w, *_ = make(n=150, seed=31)
    mask = torch.ones(150, dtype=torch.bool, device=DEV)
    mask[::7] = False
    grads = []
    for fn in (kernels.fused_linear_kl, reference.linear_kl):
        s, wc = hs.clone().requires_grad_(), w.clone().requires_grad_(train_head)
        loss = fn(s, ht, wc, temperature=1.1, clip=0.05, mask=mask)
        grads.append((loss, *torch.autograd.grad(loss, [s, wc] if train_head else [s])))
    assert calls == [dict(want_grad_hs=True) if not train_head else {}]
    with torch.no_grad():  # no backward will come: no gradient formed in the forward
        kernels.fused_linear_kl(hs.clone().requires_grad_(), ht, w, temperature=1.1, clip=0.05)
    assert calls[1:] == [{}]
    assert (grads[0][1][::7] == 0).all()
    for got, want, name in zip(grads[0], grads[1], ("loss", "grad_hs", "grad_w")):
        assert_near(got, want.detach(), 1e-4, name)


def test_grad_in_forward_op_on_any_backend(monkeypatch):
    # linear_kl_fwd_grad is total: where the rows path does not serve it, the backend's forward + unit backward
    from atesd import kernels
    from atesd.kernels import _ops

    monkeypatch.setattr(_ops, "grad_in_forward", lambda device: True)
    hs, ht, w, *_ = make(n=40, seed=37)
    grads = []
    for fn in (kernels.fused_linear_kl, reference.linear_kl):
        s = hs.clone().requires_grad_()
        loss = fn(s, ht, w, temperature=1.0, clip=0.05, beta=0.5, reduction="none")
        weights = torch.rand(40, generator=torch.Generator().manual_seed(0)).to(DEV)
        weights[::5] = 0.0
        grads.append(torch.autograd.grad((loss * weights).sum(), s)[0])
    assert (grads[0][::5] == 0).all()
    assert_near(grads[0], grads[1], 1e-4, "grad_hs")


def test_rows_path_fp32_products_bind():
    # the one-call fp32-output products the rows path uses on a GPU (aten::mm.dtype_out, aten::addmm.dtype_out with
    # beta 0) have no CPU kernel; their argument binding is checked on meta tensors, and a CPU falls back (logged)
    a = torch.empty(5, 7, dtype=torch.bfloat16, device="meta")
    b = torch.empty(7, 3, dtype=torch.bfloat16, device="meta")
    for kind, product in triton_kl_rows._FP32_MM.items():
        out = torch.empty(5, 3, device="meta")
        assert product(a, b, out).shape == (5, 3) and out.dtype == torch.float32, kind
    if not torch.cuda.is_available():
        assert triton_kl_rows._fp32_mm_kind(torch.device("cpu")) is None


def test_rows_path_fallback_products_are_exact_and_sliced(monkeypatch):
    # without an fp32-output product for half operands (this CPU), the fallback multiplies fp32 copies of slices of
    # the vocabulary dimension: the logits (vocabulary = columns) and dz W (vocabulary = the summed dimension)
    monkeypatch.setattr(triton_kl_rows, "_COPY_SLICE", 16)
    gen = torch.Generator().manual_seed(0)
    hs = torch.randn(5, 8, generator=gen).to(torch.bfloat16)
    w = torch.randn(37, 8, generator=gen).to(torch.bfloat16)
    dz = torch.randn(5, 37, generator=gen).to(torch.bfloat16)
    for a, b in ((hs, w.t()), (dz, w)):
        out = torch.full((a.shape[0], b.shape[1]), math.nan)
        triton_kl_rows._mm_fp32(a, b, out)
        torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the one-time check is not fooled by autocast
        triton_kl_rows._MM_FP32_OK.pop("cpu", None)
        triton_kl_rows._fp32_mm_kind(torch.device("cpu"))
