"""Fused linear clipped-KL: public function, autograd glue and nn.Module.

The heavy lifting is in the ``atesd::linear_kl_fwd`` / ``atesd::linear_kl_bwd`` custom ops (``_ops.py``), which
return per-token quantities; masking and the reduction are ordinary (differentiable) torch on [N] vectors, so
the per-token gradient that reaches the backward op already carries the mask, the reduction and the upstream
gradient, and no host synchronisation happens anywhere.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atesd.kernels import _ops  # noqa: F401  (registers torch.ops.atesd.*)
from atesd.kernels._checks import check_inputs
from atesd.kernels.reference import STAT_NAMES


class _LinearKLFunction(torch.autograd.Function):
    """Per-token clipped divergence [N] (differentiable w.r.t. hs, and w/bias if they require grad) + stats."""

    @staticmethod
    def forward(ctx, hs, ht, w, wt, bs, bt, temperature, clip, beta):
        loss, kl, lse_s, lse_t, g, agree, maxp, ent = torch.ops.atesd.linear_kl_fwd(
            hs, ht, w, wt, bs, bt, temperature, clip, beta
        )
        ctx.save_for_backward(hs, ht, w, wt, bs, bt, lse_s, lse_t, g)
        ctx.params = (temperature, clip, beta)
        ctx.mark_non_differentiable(kl, agree, maxp, ent)
        return loss, kl, agree, maxp, ent

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        hs, ht, w, wt, bs, bt, lse_s, lse_t, g = ctx.saved_tensors
        temperature, clip, beta = ctx.params
        need_w = ctx.needs_input_grad[2]
        need_b = ctx.needs_input_grad[4]
        grad_hs, grad_w, grad_b = torch.ops.atesd.linear_kl_bwd(
            grad_loss.contiguous().float(), hs, ht, w, wt, bs, bt, lse_s, lse_t, g,
            temperature, clip, beta, need_w, need_b,
        )
        grad_w = grad_w.to(w.dtype) if need_w else None
        grad_b = grad_b.to(bs.dtype) if need_b else None
        return grad_hs if ctx.needs_input_grad[0] else None, None, grad_w, None, grad_b, None, None, None, None


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
    reduction: str = "mean",
    return_stats: bool = False,
):
    """Clipped teacher/student divergence over an LM head without materialising [N, V] logits.

    Same arguments and meaning as :func:`kernels.reference.linear_kl` (see its module docstring for the math):
    student_hidden / teacher_hidden [..., H], weight [V, H] shared by both sides unless ``teacher_weight`` is
    given, bf16/fp16/fp32 inputs with fp32 accumulation. Only the student side is differentiated; the weight
    and bias get gradients only if they require them. Returns the loss, or ``(loss, stats)`` with stats a
    dict of [...] fp32 tensors: kl, clipped_kl, top1_agree, student_max_prob, student_entropy.
    """
    check_inputs(student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias,
                 temperature, clip, beta, mask, reduction)
    lead = student_hidden.shape[:-1]
    H = student_hidden.shape[-1]
    hs = student_hidden.reshape(-1, H).contiguous()
    ht = teacher_hidden.detach().reshape(-1, H).contiguous()
    if teacher_bias is None and teacher_weight is None and bias is not None:
        teacher_bias = bias.detach()
    wt = None if teacher_weight is None else teacher_weight.detach().contiguous()
    bt = None if teacher_bias is None else teacher_bias.detach().float().contiguous()
    bs = None if bias is None else bias.contiguous()
    clip_value = math.inf if clip is None else float(clip)

    token_loss, kl, agree, maxp, ent = _LinearKLFunction.apply(
        hs, ht, weight.contiguous(), wt, bs, bt, float(temperature), clip_value, float(beta)
    )
    weights = None if mask is None else mask.reshape(-1).to(torch.float32)
    weighted = token_loss if weights is None else token_loss * weights
    if reduction == "mean":
        if weights is None:
            loss = weighted.sum() / max(weighted.numel(), 1)
        else:
            total = weights.sum()
            loss = torch.where(total > 0, weighted.sum() / total.clamp_min(torch.finfo(torch.float32).tiny),
                               torch.zeros((), device=weighted.device))
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        loss = weighted.reshape(lead)
    if not return_stats:
        return loss
    values = (kl, token_loss.detach(), agree, maxp, ent)
    live = None if weights is None else (weights != 0).to(torch.float32)
    stats = {name: (v if live is None else v * live).reshape(lead) for name, v in zip(STAT_NAMES, values)}
    return loss, stats


class FusedLinearKL(nn.Module):
    """Module form of :func:`fused_linear_kl`; the options are fixed at construction.

    ``forward(student_hidden, teacher_hidden, weight, mask=None, teacher_weight=None, bias=None,
    teacher_bias=None)`` returns what the function returns.
    """

    def __init__(self, *, temperature: float = 1.0, clip: float | None = None, beta: float = 0.0,
                 reduction: str = "mean", return_stats: bool = False) -> None:
        super().__init__()
        self.temperature, self.clip, self.beta = temperature, clip, beta
        self.reduction, self.return_stats = reduction, return_stats

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                mask: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None):
        return fused_linear_kl(
            student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight, bias=bias,
            teacher_bias=teacher_bias, temperature=self.temperature, clip=self.clip, beta=self.beta,
            mask=mask, reduction=self.reduction, return_stats=self.return_stats,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, clip={self.clip}, beta={self.beta}, reduction={self.reduction!r}"
