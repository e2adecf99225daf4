"""Fused clipped KL against a served teacher's top-k log-probabilities: public function, autograd glue, nn.Module.

The student side - the log-softmax over V of (hs W^T + b) / T - is the ``atesd::linear_kl_topk_fwd/bwd`` custom
ops (``_ops_topk.py``): one streaming pass over the vocabulary for the log-sum-exp of the logits outside the
teacher's K ids, and a gather of the K logits at the ids. From those, :func:`topk_divergence` forms the K (+ tail)
pointwise terms of ``reference.linear_kl_topk`` with ordinary differentiable torch on [N, K] tensors; autograd
carries the clip, the masks, the reduction and the upstream gradient back to the two student-side outputs, and the
backward op turns them into the gradients of the hidden states (and of the head and bias when they need one).
"""

from __future__ import annotations

import torch
from torch import nn

from atesd.kernels import _ops_topk  # noqa: F401  (registers torch.ops.atesd.linear_kl_topk_*)
from atesd.kernels._checks import reduce_loss
from atesd.kernels._topk_checks import prepare_topk
from atesd.kernels.reference import TOPK_STAT_NAMES, pointwise_divergence, teacher_tail_logprob


class _StudentTopK(torch.autograd.Function):
    """(z_topk [N, K], lse_tail [N]) of the student, differentiable w.r.t. hs (and w / bias if they require grad),
    plus the no-gradient tail statistics (tail_max, tail_arg, tail_ent)."""

    @staticmethod
    def forward(ctx, hs, w, bs, ids, temperature):
        z_topk, lse_tail, tail_max, tail_arg, tail_ent = torch.ops.atesd.linear_kl_topk_fwd(hs, w, bs, ids,
                                                                                             temperature)
        ctx.save_for_backward(hs, w, bs, ids, lse_tail)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(tail_max, tail_arg, tail_ent)
        return z_topk, lse_tail, tail_max, tail_arg, tail_ent

    @staticmethod
    def backward(ctx, grad_z, grad_lse_tail, *_unused):
        hs, w, bs, ids, lse_tail = ctx.saved_tensors
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_z, grad_lse_tail = grad_z.contiguous().float(), grad_lse_tail.contiguous().float()
        if need_w:  # rows without gradient (masked) stay out of dz^T hs too, even where hs holds NaN
            live = (grad_lse_tail != 0) | (grad_z != 0).any(-1)
            hs = torch.where(live[:, None], hs, torch.zeros((), dtype=hs.dtype, device=hs.device))
        grad_hs, grad_w, grad_b = torch.ops.atesd.linear_kl_topk_bwd(
            grad_lse_tail, grad_z, hs, w, bs, ids, lse_tail, ctx.temperature, need_w, need_b
        )
        grad_w = grad_w.to(w.dtype) if need_w else None
        grad_b = grad_b.to(bs.dtype) if need_b else None
        return grad_hs if ctx.needs_input_grad[0] else None, grad_w, grad_b, None, None


def topk_divergence(z_topk: torch.Tensor, lse_tail: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float,
                    clip: float | None, tail: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (clipped loss, unclipped kl, log-normaliser lse) [N] fp32 from the student's K logits at the
    teacher's ids z_topk [N, K] (temperature applied), the log-sum-exp of its other logits lse_tail [N] and the
    teacher's log-probs [N, K]: the math of ``reference.linear_kl_topk``, differentiable in z_topk and lse_tail."""
    lse = torch.logaddexp(lse_tail, torch.logsumexp(z_topk, dim=-1))
    a = z_topk - lse[:, None]  # the student's log-probs at the ids
    b = teacher_logprobs
    if tail:
        a = torch.cat([a, (lse_tail - lse)[:, None]], dim=1)
        b = torch.cat([b, teacher_tail_logprob(b)[:, None]], dim=1)
    pointwise = pointwise_divergence(a, b, beta)
    # c_j = [not (l_j > clip)]: a NaN term is kept, in value and gradient (the full op's non-finite contract)
    clipped = pointwise if clip is None else torch.where(pointwise > clip, clip, pointwise)
    return clipped.sum(-1), pointwise.sum(-1), lse


def fused_linear_kl_topk(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip: float | None = None,
    beta: float = 0.0,
    tail: bool = True,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_stats: bool = False,
):
    """Clipped divergence between a served teacher's top-k and the student's head, never materialising [N, V].

    Same arguments and meaning as :func:`atesd.kernels.reference.linear_kl_topk` (its docstring has the math and
    where it matches verl's and TRL's top-k losses): student_hidden [..., H], weight [V, H] (its gradient only if
    it requires one; a DTensor is gathered), teacher_ids [..., K] distinct token ids in [0, V), teacher_logprobs
    [..., K] the teacher's log-probabilities at those ids (used as given, without gradient), ``tail`` adds the
    bucket of the remaining mass on both sides; temperature / clip / beta / mask / labels / ignore_index /
    reduction / num_items_in_batch as in :func:`atesd.kernels.fused_linear_kl`. Returns the loss, or
    ``(loss, stats)`` with stats a dict of [...] fp32 tensors: kl, clipped_kl, top1_agree, student_max_prob,
    student_entropy, student_topk_mass, teacher_topk_mass.
    """
    p = prepare_topk(student_hidden, weight, teacher_ids, teacher_logprobs, bias, temperature, clip, beta, tail,
                     mask, labels, ignore_index, reduction, num_items_in_batch)
    bs = None if p.bs is None else p.bs.contiguous()
    z_topk, lse_tail, tail_max, tail_arg, tail_ent = _StudentTopK.apply(
        p.hs.contiguous(), p.w.contiguous(), bs, p.ids.contiguous(), float(temperature)
    )
    # a non-finite logit at the ids makes the row NaN (an infinite one would be clipped, or cancel in autograd's
    # logaddexp): the rule of the reference, where any non-finite logit of a row makes it NaN
    z_topk = z_topk + z_topk * 0
    if p.live is not None:  # rows that do not count enter the [N, K] math as zeros: no NaN reaches their gradient
        zero = torch.zeros((), device=z_topk.device)
        z_topk = torch.where(p.live[:, None], z_topk, zero)
        lse_tail = torch.where(p.live, lse_tail, zero)
    token_loss, kl, lse = topk_divergence(z_topk, lse_tail, p.logprobs, beta, clip, tail)
    loss = reduce_loss(token_loss, p.weights, reduction, num_items_in_batch, p.lead)
    if not return_stats:
        return loss
    with torch.no_grad():
        stats = _stats(z_topk.detach(), lse_tail.detach(), lse.detach(), tail_max, tail_arg, tail_ent, p)
        values = (kl.detach(), token_loss.detach(), *stats)
        zero = torch.zeros((), device=token_loss.device)
        return loss, {name: (v if p.live is None else torch.where(p.live, v, zero)).reshape(p.lead)
                      for name, v in zip(TOPK_STAT_NAMES, values)}


def _stats(z_topk, lse_tail, lse, tail_max, tail_arg, tail_ent, p):
    """top1_agree, student_max_prob, student_entropy, student_topk_mass, teacher_topk_mass [N] from the two parts
    of the student's distribution: the K entries at the ids and the tail (every other entry)."""
    v = p.w.shape[0]
    top_max = z_topk.max(-1).values
    top_arg = torch.where(z_topk == top_max[:, None], p.ids, v).amin(-1)  # ties: the smallest id
    student_arg = torch.where(tail_max > top_max, tail_arg,
                              torch.where(tail_max == top_max, torch.minimum(tail_arg, top_arg), top_arg))
    t = p.logprobs
    teacher_top1 = torch.where(t == t.max(-1, keepdim=True).values, p.ids, v).amin(-1)
    a = z_topk - lse[:, None]
    a_tail = lse_tail - lse
    p_tail = a_tail.exp()
    # -sum_v ps log ps = -sum_k ps_k a_k + p_tail (H_tail - a_tail); an empty tail (K = V) adds nothing
    tail_part = torch.where(p_tail > 0, p_tail * (tail_ent - a_tail), torch.zeros((), device=a.device))
    entropy = -(a.exp() * a).sum(-1) + tail_part
    max_prob = (torch.maximum(top_max, tail_max) - lse).exp()
    agree = (student_arg == teacher_top1).to(torch.float32)
    return agree, max_prob, entropy, a.exp().sum(-1), t.exp().sum(-1)


class FusedLinearKLTopK(nn.Module):
    """Module form of :func:`fused_linear_kl_topk`; the options are fixed at construction.

    ``forward(student_hidden, weight, teacher_ids, teacher_logprobs, mask=None, bias=None, labels=None,
    num_items_in_batch=None)`` returns what the function returns.
    """

    def __init__(self, *, temperature: float = 1.0, clip: float | None = None, beta: float = 0.0, tail: bool = True,
                 ignore_index: int = -100, reduction: str = "mean", return_stats: bool = False) -> None:
        super().__init__()
        self.temperature, self.clip, self.beta, self.tail = temperature, clip, beta, tail
        self.ignore_index, self.reduction, self.return_stats = ignore_index, reduction, return_stats

    def forward(self, student_hidden: torch.Tensor, weight: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_logprobs: torch.Tensor, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_items_in_batch=None):
        return fused_linear_kl_topk(
            student_hidden, weight, teacher_ids, teacher_logprobs, bias=bias, temperature=self.temperature,
            clip=self.clip, beta=self.beta, tail=self.tail, mask=mask, labels=labels, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items_in_batch=num_items_in_batch, return_stats=self.return_stats,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, clip={self.clip}, beta={self.beta}, tail={self.tail}, "
                f"reduction={self.reduction!r}")
