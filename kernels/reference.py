"""Plain-torch reference of the linear clipped-KL op: the documented meaning, and the tests' ground truth.

It materialises the [N, V] logits, so use it only on small shapes. Every fused backend matches it.

    zs = (hs W^T + b) / T          zt = (ht Wt^T + bt) / T          (teacher side: no gradient)
    ps = softmax(zs), pt = softmax(zt), m = (1 - beta) ps + beta pt
    l[n, v] = pt (log pt - log ps)                                    beta = 0  forward KL(teacher || student)
            = ps (log ps - log pt)                                    beta = 1  reverse KL(student || teacher)
            = beta pt (log pt - log m) + (1 - beta) ps (log ps - log m)          generalized JSD (as TRL's GKD)
    L[n] = sum_v min(l[n, v], clip)                                   clipping is pointwise, before the vocab sum
    loss = sum_n w[n] L[n] / sum_n w[n]  ('mean'),  sum_n w[n] L[n]  ('sum'),  w[n] L[n]  ('none')

with w the mask (1 where absent). A 'mean' over an all-masked (or empty) input is 0.
Per-token statistics, all of the temperature-scaled distributions, without gradient, 0 at masked tokens:
kl = sum_v l (unclipped), clipped_kl = L, top1_agree = [argmax zs == argmax zt], student_max_prob = max ps,
student_entropy = -sum_v ps log ps.
"""

from __future__ import annotations

import math

import torch

from atesd.kernels._checks import check_inputs

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
    reduction: str = "mean",
    return_stats: bool = False,
):
    """Clipped per-token divergence between teacher and student heads, materialising logits (fp32 math).

    Args:
        student_hidden: [..., H] student final hidden states (receive gradient).
        teacher_hidden: [..., H] teacher final hidden states (never receive gradient).
        weight: [V, H] LM head; gets a gradient through the student side only, if it requires one.
        teacher_weight: optional [V, H] teacher head (default: ``weight``, detached on the teacher side).
        bias / teacher_bias: optional [V]; the teacher uses ``bias`` when it shares the weight and has no own bias.
        temperature, clip, beta, mask, reduction: see the module docstring.
    Returns:
        loss (scalar, or [...] for reduction='none'), and with ``return_stats`` a dict of [...] fp32 tensors.
    """
    check_inputs(student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias,
                 temperature, clip, beta, mask, reduction)
    lead = student_hidden.shape[:-1]
    H = student_hidden.shape[-1]
    hs = student_hidden.reshape(-1, H).float()
    ht = teacher_hidden.detach().reshape(-1, H).float()
    w = weight.float()
    wt = (weight if teacher_weight is None else teacher_weight).detach().float()
    if teacher_bias is None and teacher_weight is None:
        teacher_bias = bias
    zs = hs @ w.T
    zt = ht @ wt.T
    if bias is not None:
        zs = zs + bias.float()
    if teacher_bias is not None:
        zt = zt + teacher_bias.detach().float()
    zs, zt = zs / temperature, zt / temperature
    log_ps = torch.log_softmax(zs, dim=-1)
    log_pt = torch.log_softmax(zt, dim=-1)
    pointwise = pointwise_divergence(log_ps, log_pt, beta)
    clipped = pointwise if clip is None else torch.clamp(pointwise, max=clip)
    token_loss = clipped.sum(-1)

    weights = torch.ones_like(token_loss) if mask is None else mask.reshape(-1).to(torch.float32)
    weighted = token_loss * weights
    if reduction == "mean":
        loss = weighted.sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
        loss = torch.where(weights.sum() > 0, loss, torch.zeros_like(loss))
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        loss = weighted.reshape(lead)
    if not return_stats:
        return loss
    with torch.no_grad():
        live = (weights != 0).to(torch.float32)
        stats = {
            "kl": pointwise.sum(-1),
            "clipped_kl": token_loss,
            "top1_agree": (zs.argmax(-1) == zt.argmax(-1)).to(torch.float32),
            "student_max_prob": log_ps.max(-1).values.exp(),
            "student_entropy": -(log_ps.exp() * log_ps).sum(-1),
        }
        stats = {k: (v.detach() * live).reshape(lead) for k, v in stats.items()}
    return loss, stats
