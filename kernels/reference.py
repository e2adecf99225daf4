"""Plain-torch reference of the linear clipped-KL op: the documented meaning, and the tests' ground truth.

It materialises the [N, V] logits, so use it only on small shapes. Every fused backend matches it.

    zs = (hs W^T + b) / T          zt = (ht Wt^T + bt) / T          (teacher side: no gradient)
    ps = softmax(zs), pt = softmax(zt), m = (1 - beta) ps + beta pt
    l[n, v] = pt (log pt - log ps)                                    beta = 0  forward KL(teacher || student)
            = ps (log ps - log pt)                                    beta = 1  reverse KL(student || teacher)
            = beta pt (log pt - log m) + (1 - beta) ps (log ps - log m)          generalized JSD (as TRL's GKD)
    L[n] = sum_v min(l[n, v], clip)                                   clipping is pointwise, before the vocab sum
    loss = sum_n w[n] L[n] / sum_n w[n]  ('mean'),  sum_n w[n] L[n]  ('sum'),  w[n] L[n]  ('none')

Row weights w[n] = mask[n] * [labels[n] != ignore_index] (each factor 1 where not given). Rows with w[n] = 0 are
excluded: they contribute exactly 0 to the loss and receive exactly 0 gradient, whatever their hidden states hold
(NaN included: padding may hold garbage). A 'mean' over no counted row (all masked, or N = 0) is 0;
``num_items_in_batch`` replaces its denominator sum_n w[n] (HF's convention for gradient accumulation: the count
of counted tokens over all the micro-batches of one optimizer step).

Labels are not shifted: pass hidden states and labels already aligned (the hidden state that predicts token t+1
next to label t+1: ``hidden[..., :-1, :]`` with ``labels[..., 1:]``, as Liger's ``shift_labels``).

The teacher's head may have its own hidden width and a vocabulary padded beyond the student's (teacher_weight
[Vt, Ht], Vt >= V): only its first V rows (and teacher_bias entries) count, i.e. the teacher's softmax runs over the
student's vocabulary and the padded rows are dropped. Inputs of different float dtypes are cast internally (each
side's hidden states to its head's dtype); the math is fp32 here.

Non-finite inputs: a NaN or +-inf anywhere in the inputs of a counted row (its hidden states, or the head or bias
that every row uses) makes that row's loss, kl and clipped_kl NaN (never the clip value: min(NaN, clip) is NaN)
and its hidden-state gradient NaN, so 'mean' and 'sum' are NaN and a trainer's non-finite guard fires. top1_agree,
student_max_prob and student_entropy of such a row are unspecified.

Per-token statistics, all of the temperature-scaled distributions, without gradient, 0 at excluded tokens:
kl = sum_v l (unclipped), clipped_kl = L, top1_agree = [argmax zs == argmax zt], student_max_prob = max ps,
student_entropy = -sum_v ps log ps.
"""

from __future__ import annotations

import math

import torch

from atesd.kernels._checks import prepare, reduce_loss

STAT_NAMES = ("kl", "clipped_kl", "top1_agree", "student_max_prob", "student_entropy")


def pointwise_divergence(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float) -> torch.Tensor:
    """Elementwise l[n, v] of the module docstring from fp32 log-probabilities of any matching shape."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0.0:
        return pt * (log_pt - log_ps)
    if beta == 1.0:
        return ps * (log_ps - log_pt)
    log_m = torch.logsumexp(torch.stack([log_ps + math.log1p(-beta), log_pt + math.log(beta)]), dim=0)
    return beta * pt * (log_pt - log_m) + (1.0 - beta) * ps * (log_ps - log_m)


def linear_kl(
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
    """Clipped per-token divergence between teacher and student heads, materialising logits (fp32 math).

    Args:
        student_hidden: [..., H] student final hidden states (receive gradient).
        teacher_hidden: [..., Ht] teacher final hidden states (never receive gradient); Ht = H unless the teacher
            has its own head.
        weight: [V, H] LM head (a DTensor is gathered); gets a gradient through the student side only, if it
            requires one.
        teacher_weight: optional [Vt, Ht] teacher head, Vt >= V (default: ``weight``, detached on the teacher side).
        bias / teacher_bias: optional [V] / [Vt]; the teacher uses ``bias`` when it shares the weight and has no
            own bias.
        mask: optional [...] bool, 0/1 integer or float row weights.
        labels / ignore_index: optional [...] integer token ids; rows equal to ignore_index do not count.
        num_items_in_batch: optional denominator of 'mean' (number or one-element tensor).
        temperature, clip, beta, reduction: see the module docstring.
    Returns:
        loss (scalar, or [...] for reduction='none'), and with ``return_stats`` a dict of [...] fp32 tensors.
    """
    p = prepare(student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias, temperature, clip,
                beta, mask, labels, ignore_index, reduction, num_items_in_batch)
    n = p.hs.shape[0]
    # only the counted rows are computed: excluded rows stay exactly 0 in value and gradient, NaN or not
    rows = torch.arange(n, device=p.hs.device) if p.weights is None else (p.weights != 0).nonzero().squeeze(1)
    hs = p.hs.index_select(0, rows).float()
    ht = p.ht.detach().index_select(0, rows).float()
    w = p.w.float()
    wt = (p.w if p.wt is None else p.wt).detach().float()
    teacher_bias = p.bt if (p.bt is not None or p.wt is not None) else p.bs
    zs = hs @ w.T
    zt = ht @ wt.T
    if p.bs is not None:
        zs = zs + p.bs.float()
    if teacher_bias is not None:
        zt = zt + teacher_bias.detach().float()
    zs, zt = zs / temperature, zt / temperature
    log_ps = torch.log_softmax(zs, dim=-1)
    log_pt = torch.log_softmax(zt, dim=-1)
    pointwise = pointwise_divergence(log_ps, log_pt, beta)
    clipped = pointwise if clip is None else torch.clamp(pointwise, max=clip)  # clamp keeps NaN
    token_loss = torch.zeros(n, device=hs.device).index_put((rows,), clipped.sum(-1))

    loss = reduce_loss(token_loss, p.weights, reduction, num_items_in_batch, p.lead)
    if not return_stats:
        return loss
    with torch.no_grad():
        stats = {
            "kl": pointwise.sum(-1),
            "clipped_kl": clipped.sum(-1),
            "top1_agree": (zs.argmax(-1) == zt.argmax(-1)).to(torch.float32),
            "student_max_prob": log_ps.max(-1).values.exp(),
            "student_entropy": -(log_ps.exp() * log_ps).sum(-1),
        }
        stats = {k: torch.zeros(n, device=hs.device).index_put((rows,), v.detach()).reshape(p.lead)
                 for k, v in stats.items()}
    return loss, stats
