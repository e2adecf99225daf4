"""Fused linear clipped-KL: public function, autograd glue and nn.Module.

The heavy lifting is in the ``atesd::linear_kl_fwd`` / ``atesd::linear_kl_bwd`` custom ops (``_ops.py``), which
return per-token quantities; masking and the reduction are ordinary (differentiable) torch on [N] vectors, so
the per-token gradient that reaches the backward op already carries the mask, the reduction and the upstream
gradient, and no host synchronisation happens anywhere. With a frozen head on a backend that forms the
hidden-state gradient in its forward (the Triton rows path), ``atesd::linear_kl_fwd_grad`` replaces the pair and the
backward is a per-row scale of what it kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from atesd.kernels import _ops  # registers torch.ops.atesd.*
from atesd.kernels._checks import prepare, reduce_loss
from atesd.kernels.reference import STAT_NAMES


class _LinearKLFunction(torch.autograd.Function):
    """Per-token clipped divergence [N] (differentiable w.r.t. hs, and w/bias if they require grad) + stats."""

    @staticmethod
    def forward(ctx, hs, ht, w, wt, bs, bt, temperature, clip, beta, grad_enabled):
        needs = ctx.needs_input_grad  # (set under no_grad too, hence grad_enabled from the caller)
        # a frozen head on a backend that forms the hidden-state gradient in its forward: keep gh1, not the inputs
        ctx.grad_in_forward = (grad_enabled and needs[0] and not (needs[2] or needs[4])
                               and _ops.grad_in_forward(hs.device))
        if ctx.grad_in_forward:
            loss, kl, _, _, _, agree, maxp, ent, gh1 = torch.ops.atesd.linear_kl_fwd_grad(
                hs, ht, w, wt, bs, bt, temperature, clip, beta
            )
            ctx.save_for_backward(gh1)
            ctx.hs_dtype = hs.dtype
        else:
            loss, kl, lse_s, lse_t, g, agree, maxp, ent = torch.ops.atesd.linear_kl_fwd(
                hs, ht, w, wt, bs, bt, temperature, clip, beta
            )
            ctx.save_for_backward(hs, ht, w, wt, bs, bt, lse_s, lse_t, g)
        ctx.params = (temperature, clip, beta)
        ctx.mark_non_differentiable(kl, agree, maxp, ent)
        return loss, kl, agree, maxp, ent

    @staticmethod
    @once_differentiable  # no double backward: gh1 carries no graph, so a second derivative would miss d/dhs
    def backward(ctx, grad_loss, *_unused):
        if ctx.grad_in_forward:  # dz is linear in grad[n]; a row without upstream gradient gets exactly 0
            (gh1,) = ctx.saved_tensors
            grad = grad_loss.float()[:, None]
            grad_hs = torch.where(grad != 0, gh1 * grad, torch.zeros((), device=gh1.device)).to(ctx.hs_dtype)
            return grad_hs, None, None, None, None, None, None, None, None, None
        hs, ht, w, wt, bs, bt, lse_s, lse_t, g = ctx.saved_tensors
        temperature, clip, beta = ctx.params
        need_w = ctx.needs_input_grad[2]
        need_b = ctx.needs_input_grad[4]
        if need_w:  # rows without upstream gradient (masked) are excluded from dz^T hs too, even if hs is NaN there
            hs = torch.where((grad_loss != 0)[:, None], hs, torch.zeros((), dtype=hs.dtype, device=hs.device))
        grad_hs, grad_w, grad_b = torch.ops.atesd.linear_kl_bwd(
            grad_loss.contiguous().float(), hs, ht, w, wt, bs, bt, lse_s, lse_t, g,
            temperature, clip, beta, need_w, need_b,
        )
        grad_w = grad_w.to(w.dtype) if need_w else None
        grad_b = grad_b.to(bs.dtype) if need_b else None
        return grad_hs if ctx.needs_input_grad[0] else None, None, grad_w, None, grad_b, None, None, None, None, None


def fused_linear_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    teacher_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip: float | None = None,
    beta: float = 0.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_stats: bool = False,
):
    """Clipped teacher/student divergence over an LM head without materialising [N, V] logits.

    Same arguments and meaning as :func:`atesd.kernels.reference.linear_kl` (its module docstring has the math,
    the masking / labels / num_items_in_batch rules and the non-finite contract): student_hidden [..., H],
    teacher_hidden [..., Ht], weight [V, H] shared by both sides unless ``teacher_weight`` [Vt >= V, Ht] is given
    (padded rows dropped), any mix of bf16/fp16/fp32 inputs (cast internally, fp32 accumulation), DTensor heads
    gathered. Only the student side is differentiated; the weight and bias get gradients only if they require
    them. Returns the loss, or ``(loss, stats)`` with stats a dict of [...] fp32 tensors: kl, clipped_kl,
    top1_agree, student_max_prob, student_entropy.
    """
    p = prepare(student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias, temperature, clip,
                beta, mask, labels, ignore_index, reduction, num_items_in_batch)
    hs = p.hs.contiguous()
    ht = p.ht.detach().contiguous()
    teacher_bias = p.bt if (p.bt is not None or p.wt is not None) else (None if p.bs is None else p.bs.detach())
    wt = None if p.wt is None else p.wt.detach().contiguous()
    bt = None if teacher_bias is None else teacher_bias.detach().float().contiguous()
    bs = None if p.bs is None else p.bs.contiguous()
    clip_value = math.inf if clip is None else float(clip)

    token_loss, kl, agree, maxp, ent = _LinearKLFunction.apply(
        hs, ht, p.w.contiguous(), wt, bs, bt, float(temperature), clip_value, float(beta), torch.is_grad_enabled()
    )
    loss = reduce_loss(token_loss, p.weights, reduction, num_items_in_batch, p.lead)
    if not return_stats:
        return loss
    values = (kl, token_loss.detach(), agree, maxp, ent)
    zero = torch.zeros((), device=token_loss.device)
    live = None if p.weights is None else p.weights != 0
    stats = {name: (v if live is None else torch.where(live, v, zero)).reshape(p.lead)
             for name, v in zip(STAT_NAMES, values)}
    return loss, stats


class FusedLinearKL(nn.Module):
    """Module form of :func:`fused_linear_kl`; the options are fixed at construction.

    ``forward(student_hidden, teacher_hidden, weight, mask=None, teacher_weight=None, bias=None,
    teacher_bias=None, labels=None, num_items_in_batch=None)`` returns what the function returns.
    """

    def __init__(self, *, temperature: float = 1.0, clip: float | None = None, beta: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", return_stats: bool = False) -> None:
        super().__init__()
        self.temperature, self.clip, self.beta, self.ignore_index = temperature, clip, beta, ignore_index
        self.reduction, self.return_stats = reduction, return_stats

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                mask: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_items_in_batch=None):
        return fused_linear_kl(
            student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight, bias=bias,
            teacher_bias=teacher_bias, temperature=self.temperature, clip=self.clip, beta=self.beta,
            mask=mask, labels=labels, ignore_index=self.ignore_index, reduction=self.reduction,
            num_items_in_batch=num_items_in_batch, return_stats=self.return_stats,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, clip={self.clip}, beta={self.beta}, reduction={self.reduction!r}"
