"""CUDA exactness at real Qwen3 head shapes (skipped without a GPU).

Rows of the op are independent, so the reference (which materialises logits) is evaluated on a subset of rows only:
the op runs on all N rows with reduction='none', and values and per-row student gradients are compared on the
first and last 64 rows.
"""

from __future__ import annotations

import pytest
import torch

from atesd import kernels
from atesd.kernels.reference import linear_kl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
V = 151936
SHAPES = [(1024, 4096), (4096, 4096), (8192, 4096), (16384, 4096), (4096, 2048), (4096, 2560)]


@pytest.mark.parametrize("n,h", SHAPES)
@pytest.mark.parametrize("clip", [0.06, None])
def test_qwen3_head_shapes_bf16(n, h, clip):
    g = torch.Generator(device="cuda").manual_seed(n + h)
    hs = (torch.randn(n, h, device="cuda", generator=g) * 2).bfloat16()
    ht = (hs.float() + torch.randn(n, h, device="cuda", generator=g)).bfloat16()
    w = (torch.randn(V, h, device="cuda", generator=g) / h**0.5).bfloat16()
    upstream = torch.rand(n, device="cuda", generator=g)
    rows = torch.cat([torch.arange(64), torch.arange(n - 64, n)]).cuda()

    s = hs.clone().requires_grad_(True)
    loss, stats = kernels.fused_linear_kl(s, ht, w, temperature=1.1, clip=clip, reduction="none", return_stats=True)
    (loss * upstream).sum().backward()

    sr = hs[rows].clone().requires_grad_(True)
    rloss, rstats = linear_kl(sr, ht[rows], w, temperature=1.1, clip=clip, reduction="none", return_stats=True)
    (rloss * upstream[rows]).sum().backward()

    torch.testing.assert_close(loss[rows], rloss, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(s.grad[rows].float(), sr.grad.float(), rtol=3e-2, atol=3e-3)
    for name in ("kl", "student_max_prob", "student_entropy"):
        torch.testing.assert_close(stats[name][rows], rstats[name], rtol=2e-2, atol=2e-3)
    assert float((stats["top1_agree"][rows] != rstats["top1_agree"]).float().mean()) < 0.02
