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
(NaN included: padding may hold garbage). Weights must be >= 0: a negative float mask weight is refused with a
ValueError on CPU and makes its row NaN elsewhere (checking it would cost a host sync). A 'mean' over no counted row
(all masked, or N = 0) is 0; ``num_items_in_batch`` replaces its denominator sum_n w[n] (HF's convention for
gradient accumulation: the count of counted tokens over all the micro-batches of one optimizer step). A zero
denominator under a nonzero sum (num_items_in_batch=0 while tokens count) is NaN, never a silent 0.

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
from atesd.kernels._topk_checks import prepare_topk

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


# ----------------------------------------------------------------------------------------------------------------
# Top-k variant for served teachers (DESIGN 3.6): the teacher arrives as K token ids and log-probabilities per token.

TOPK_STAT_NAMES = STAT_NAMES + ("student_topk_mass", "teacher_topk_mass")
TEACHER_LOG_MASS_CAP = -1e-7  # the teacher's top-k log-mass is capped here, so its tail bucket is never log 0


def teacher_tail_logprob(teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """log of the teacher's mass outside its top-k, [..., K] fp32 -> [...]: log(1 - sum_k exp t_k), with the
    top-k log-mass capped at -1e-7 (the tail is at least ~1e-7: served log-probs that round to a mass >= 1 give a
    finite tail, as TRL's ``_add_tail_bucket`` does). NaN in, NaN out."""
    log_mass = torch.logsumexp(teacher_logprobs, dim=-1).clamp(max=TEACHER_LOG_MASS_CAP)
    return torch.log(-torch.expm1(log_mass))


def linear_kl_topk(
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
    """Clipped divergence against a served teacher's top-k log-probabilities, materialising the student's logits.

    The plain-torch meaning of :func:`atesd.kernels.fused_linear_kl_topk` (small shapes only; fp32 math).

    Per token n, with the teacher's K distinct token ids ``i_1..i_K`` and log-probabilities ``t_1..t_K``::

        zs = (hs W^T + b) / T,  log ps = log_softmax(zs) over all V entries      (student; gradient flows here)
        a_k = log ps[i_k],  b_k = t_k                                            k = 1..K
        tail=True:  a_{K+1} = log(sum_{v not in ids} ps[v])                      (the student's mass elsewhere)
                    b_{K+1} = log(1 - sum_k exp t_k)                             (the teacher's; top-k log-mass
                                                                                  capped at -1e-7, never log 0)
        l_j = l(a_j, b_j)                   the full op's pointwise term (beta 0: forward KL, 1: reverse, JSD)
        L[n] = sum_j min(l_j, clip)         over the K entries (plus the tail bucket): clipping is pointwise
        loss = the full op's reductions of L (mask / labels / ignore_index / num_items_in_batch, 'mean' of none 0)

    With ``tail=True`` the K + 1 buckets are two proper distributions (each sums to 1): the divergence is the
    exact divergence between the coarse-grained teacher and student, non-negative unclipped (forward KL: a lower
    bound of the full-vocabulary KL). With ``tail=False`` it is the full op's vocabulary sum restricted to the K
    teacher entries, log-probabilities as they are (not renormalised): a truncated sum that goes negative where
    the student holds more of the top-k mass than the teacher. Nothing is clamped at 0: its gradient still moves
    the student towards the teacher (the forward-KL minimum is the teacher's top-k renormalised).
    ``temperature`` scales the student's logits only: the teacher's log-probabilities are used as given (serve
    them at the same temperature, as TRL asks its server to). Their gradient is never taken.

    Where this matches the served-teacher losses of other trainers (tested: ``tests/kernels/test_topk.py``):

    - verl ``forward_kl_topk``: the same terms as ``tail=False, beta=0`` (student log-probs from the full
      log-softmax, gathered at the teacher's ids, not renormalised). verl then clamps each token's loss at 0
      (``clamp_min(0.0)``: the truncated sum's negative tokens lose their gradient) and at ``loss_max_clamp``
      (``clamp(-c, c)`` on the token's sum: a clamped token has no gradient at all), and optionally floors both
      sides' log-probs at ``log_prob_min_clamp``. We clamp neither and floor nothing; our ``clip`` bounds each
      entry's term before the sum, so a token with one runaway entry keeps the gradient of its other entries.
    - TRL ``ServerDistillationTrainer`` (``loss_top_k``, ``loss_add_tail=True``, its default; ``beta=0`` for
      K > 1): the same K + 1 buckets and terms, hence the same per-token loss, and TRL's ``_jsd_divergence`` of
      the same buckets equals ours for every beta (``m = (1 - beta) ps + beta pt``). TRL caps both sides'
      top-k log-mass at -1e-7; we cap the teacher's only and compute the student's tail from its other logits
      (exact even when its top-k mass rounds to 1, where TRL's is floored at ~1e-7).
      With ``loss_add_tail=False`` TRL renormalises both sides over the K entries (a divergence between the two
      conditional distributions); we do not: on the same inputs, unclipped forward KL,
      TRL = L / M_t + log(M_s / M_t) with M_t, M_s the teacher's and the student's top-k masses (the stats
      teacher_topk_mass, student_topk_mass). TRL's server path divides by its local count of counted tokens
      ('mean' here) and does not use num_items_in_batch.

    Ids: an integer tensor [..., K] of distinct token ids in [0, V) per counted position (K <= V; K < V with
    ``tail``); a duplicate or an out-of-range id at a counted position is a ValueError naming it (one host read;
    under torch.compile the check is skipped and such a position's loss is NaN instead). Positions that do not
    count may hold anything (padding), as their hidden states may.

    Non-finite inputs follow the full op's contract: a NaN or +-inf in a counted row's inputs - its hidden
    states, its teacher log-probs (-inf included: pad a short top-k list with finite log-probs), or the head or
    bias every row uses - makes that row's loss, kl and clipped_kl NaN and its hidden-state gradient NaN. (Exactly:
    a row is NaN when one of its V logits or K teacher log-probs is not finite.)

    Per-token statistics, without gradient, 0 at excluded tokens: kl = sum_j l_j (unclipped), clipped_kl = L,
    top1_agree = [argmax_v zs == the teacher's top-1 id] (ties: the smallest id), student_max_prob = max_v ps,
    student_entropy = -sum_v ps log ps (full vocabulary), student_topk_mass = sum_k exp a_k,
    teacher_topk_mass = sum_k exp t_k.
    """
    p = prepare_topk(student_hidden, weight, teacher_ids, teacher_logprobs, bias, temperature, clip, beta, tail,
                     mask, labels, ignore_index, reduction, num_items_in_batch)
    n = p.hs.shape[0]
    rows = torch.arange(n, device=p.hs.device) if p.weights is None else (p.weights != 0).nonzero().squeeze(1)
    hs = p.hs.index_select(0, rows).float()
    ids = p.ids.index_select(0, rows)
    t = p.logprobs.index_select(0, rows)
    zs = hs @ p.w.float().T
    if p.bs is not None:
        zs = zs + p.bs.float()
    zs = zs / temperature
    zs = zs + (zs - zs)  # a non-finite logit (from a non-finite input) makes its whole row NaN
    log_ps = torch.log_softmax(zs, dim=-1)
    a = log_ps.gather(1, ids)
    b = t
    if tail:
        others = log_ps.scatter(1, ids, float("-inf"))
        a = torch.cat([a, torch.logsumexp(others, dim=-1, keepdim=True)], dim=1)
        b = torch.cat([b, teacher_tail_logprob(t)[:, None]], dim=1)
    pointwise = pointwise_divergence(a, b, beta)
    # c_j = [not (l_j > clip)]: a NaN term is kept (value and gradient), as in every backend of the full op
    clipped = pointwise if clip is None else torch.where(pointwise > clip, clip, pointwise)
    token_loss = torch.zeros(n, device=hs.device).index_put((rows,), clipped.sum(-1))

    loss = reduce_loss(token_loss, p.weights, reduction, num_items_in_batch, p.lead)
    if not return_stats:
        return loss
    with torch.no_grad():
        v = zs.shape[1]
        teacher_top1 = torch.where(t == t.max(-1, keepdim=True).values, ids, v).amin(-1)
        stats = {
            "kl": pointwise.sum(-1),
            "clipped_kl": clipped.sum(-1),
            "top1_agree": (zs.argmax(-1) == teacher_top1).to(torch.float32),
            "student_max_prob": log_ps.max(-1).values.exp(),
            "student_entropy": -(log_ps.exp() * log_ps).sum(-1),
            "student_topk_mass": log_ps.gather(1, ids).exp().sum(-1),
            "teacher_topk_mass": t.exp().sum(-1),
        }
        stats = {k: torch.zeros(n, device=hs.device).index_put((rows,), v_.detach()).reshape(p.lead)
                 for k, v_ in stats.items()}
    return loss, stats
