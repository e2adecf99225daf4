"""The top-k op against the served-teacher losses of verl and TRL, their formulas written out here from their code
(materialised student logits, as those trainers compute them), on the same inputs.

- verl ``forward_kl_topk`` (verl/trainer/distillation: fsdp/losses.py ``compute_forward_kl_topk`` and losses.py
  ``distillation_loss``): log_softmax over V, gathered at the teacher's ids, optional ``log_prob_min_clamp`` of
  both sides, sum_k pt (log pt - log ps), then ``clamp_min(0)`` and ``clamp(-loss_max_clamp, loss_max_clamp)``
  per token.
- TRL ``ServerDistillationTrainer`` (trl/experimental/server_distillation, trl 1.16: ``_add_tail_bucket``,
  ``_jsd_divergence``, ``_compute_server_forward_kl_loss``): log_softmax(logits / T) gathered at the ids; with
  ``loss_add_tail`` a (K+1)-th bucket log(1 - sum exp) on both sides (log-mass capped at -1e-7), without it both
  sides renormalised over the K entries; the divergence summed, then averaged over the counted tokens.

Where the op matches them, it is compared exactly; where it differs on purpose (reference.linear_kl_topk's docstring),
the test pins the difference down.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atesd import kernels
from atesd.kernels.reference import linear_kl_topk


def _inputs(n=24, h=16, v=90, k=8, seed=0, softer_teacher=False):
    """hs, w and a teacher's sorted top-k (ids, log-probs) from a related hidden state, or (``softer_teacher``)
    from the student's own logits at a third of their scale plus noise: a teacher less sure than the student."""
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=gen) * 2.0
    w = torch.randn(v, h, generator=gen) / h**0.5
    if softer_teacher:
        zt = (hs @ w.T) / 3 + 0.3 * torch.randn(n, v, generator=gen)
    else:
        zt = (hs + 1.5 * torch.randn(n, h, generator=gen)) @ w.T
    t, ids = zt.log_softmax(-1).topk(k, dim=-1)  # a server returns them sorted
    return hs, w, ids, t


def _student_log_probs(hs, w, temperature=1.0):
    return F.log_softmax((hs @ w.T) / temperature, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# verl


def verl_forward_kl_topk(student_logits, teacher_topk_log_probs, teacher_topk_ids, log_prob_min_clamp=None,
                         loss_max_clamp=None):
    """verl's per-token forward_kl_topk loss (the student's logits already divided by its temperature)."""
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    student_topk_log_probs = torch.gather(student_log_probs, dim=-1, index=teacher_topk_ids)
    if log_prob_min_clamp is not None:
        student_topk_log_probs = student_topk_log_probs.clamp_min(log_prob_min_clamp)
        teacher_topk_log_probs = teacher_topk_log_probs.clamp_min(log_prob_min_clamp)
    p = teacher_topk_log_probs.exp()
    losses = (p * (teacher_topk_log_probs - student_topk_log_probs)).sum(dim=-1)
    losses = losses.clamp_min(0.0)  # "student and teacher distributions don't sum to 1 -> can be negative"
    if loss_max_clamp is not None:
        losses = losses.clamp(min=-loss_max_clamp, max=loss_max_clamp)
    return losses


def test_verl_forward_kl_topk_is_ours_without_tail_clamped_per_token():
    hs, w, ids, t = _inputs()
    ours = kernels.fused_linear_kl_topk(hs, w, ids, t, tail=False, beta=0.0, reduction="none")
    verl = verl_forward_kl_topk(hs @ w.T, t, ids)
    torch.testing.assert_close(verl, ours.clamp_min(0.0), rtol=1e-5, atol=1e-6)
    # verl's default top-k is 32; its per-token loss_max_clamp acts on the token's sum
    hs, w, ids, t = _inputs(k=32, seed=1)
    ours = kernels.fused_linear_kl_topk(hs, w, ids, t, tail=False, reduction="none")
    verl = verl_forward_kl_topk(hs @ w.T, t, ids, loss_max_clamp=0.5)
    torch.testing.assert_close(verl, ours.clamp(0.0, 0.5), rtol=1e-5, atol=1e-6)


def test_where_verl_clamps_a_token_to_zero_ours_keeps_its_gradient():
    # Truncated to the top-k, the forward KL goes negative wherever the student holds more of the top-k mass
    # than the teacher (verl #7856: its clamp at 0 was active on 89% of steps). verl's clamp zeroes those tokens'
    # gradient; ours keeps it, and it still lowers the full-vocabulary KL to the teacher's renormalised top-k.
    hs, w, ids, t = _inputs(softer_teacher=True, seed=2)
    ours = kernels.fused_linear_kl_topk(hs, w, ids, t, tail=False, reduction="none")
    negative = ours < 0
    assert 0 < int(negative.sum()) < len(ours)
    s = hs.clone().requires_grad_(True)
    verl = verl_forward_kl_topk(s @ w.T, t, ids)
    (g_verl,) = torch.autograd.grad(verl.sum(), [s])
    s2 = hs.clone().requires_grad_(True)
    (g_ours,) = torch.autograd.grad(kernels.fused_linear_kl_topk(s2, w, ids, t, tail=False, reduction="sum"), [s2])
    assert (g_verl[negative] == 0).all() and (g_ours[negative].abs().sum(1) > 1e-3).all()
    torch.testing.assert_close(g_verl[~negative], g_ours[~negative], rtol=1e-4, atol=1e-6)
    # a small step along our gradient brings those students closer to the renormalised teacher top-k
    target = torch.full((len(hs), w.shape[0]), -math.inf).scatter(1, ids, t - t.logsumexp(-1, keepdim=True))

    def kl_to_target(x):
        log_ps = _student_log_probs(x, w)
        return (target.exp() * (target.clamp_min(-1e30) - log_ps)).sum(-1)

    before = kl_to_target(hs)[negative]
    after = kl_to_target(hs - 0.05 * g_ours)[negative]
    assert (after < before).all()


def test_our_per_entry_clip_versus_verls_per_token_clamp():
    # A token with one runaway entry: verl's loss_max_clamp flattens the whole token (no gradient at all), our
    # clip bounds that entry and keeps the gradient of the others.
    hs, w, ids, t = _inputs(seed=3)
    s = hs.clone().requires_grad_(True)
    verl = verl_forward_kl_topk(s @ w.T, t, ids, loss_max_clamp=0.05)
    (g_verl,) = torch.autograd.grad(verl.sum(), [s])
    s2 = hs.clone().requires_grad_(True)
    ours = kernels.fused_linear_kl_topk(s2, w, ids, t, tail=False, clip=0.05, reduction="none")
    (g_ours,) = torch.autograd.grad(ours.sum(), [s2])
    flat = verl.detach() == 0.05
    assert flat.any()
    assert (g_verl[flat] == 0).all() and (g_ours[flat].abs().sum(1) > 0).all()
    assert (ours.detach() <= 0.05 * 8 + 1e-6).all()  # K entries, each at most the clip


# ----------------------------------------------------------------------------------------------------------------
# TRL


def trl_add_tail_bucket(log_probs):
    """TRL's _add_tail_bucket: a (K+1)-th element log(1 - sum exp), the log-mass capped at -1e-7."""
    log_sum = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([log_probs, torch.log(-torch.expm1(log_sum))], dim=-1)


def trl_jsd_divergence(student_log_probs, teacher_log_probs, beta):
    """TRL's _jsd_divergence (support mask all true): forward KL (0), reverse KL (1), generalized JSD between."""
    if beta == 0:
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    if beta == 1:
        return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    beta_t = torch.tensor(beta)
    mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log1p(-beta_t),
                                           teacher_log_probs + torch.log(beta_t)]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
    return beta_t * kl_teacher + (1 - beta_t) * kl_student


def trl_server_topk_loss(student_log_probs, teacher_topk_logprobs, teacher_topk_ids, labels, beta=0.0,
                         add_tail=True):
    """TRL's server top-k loss: per-token divergence over the K (+ tail) support, 'batchmean' over counted tokens."""
    student_topk = student_log_probs.gather(-1, teacher_topk_ids)
    if add_tail:
        s, t = trl_add_tail_bucket(student_topk), trl_add_tail_bucket(teacher_topk_logprobs)
    else:
        s = student_topk - torch.logsumexp(student_topk, dim=-1, keepdim=True)
        t = teacher_topk_logprobs - torch.logsumexp(teacher_topk_logprobs, dim=-1, keepdim=True)
    per_token = trl_jsd_divergence(s, t, beta).sum(-1)
    mask = labels != -100
    return per_token[mask].sum() / mask.sum().clamp_min(1), per_token


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 8])
def test_trl_server_loss_with_tail_equals_ours(beta, k):
    # TRL's server trainer computes beta=0 for any K and beta>0 for K=1; its formula is ours for all of them
    hs, w, ids, t = _inputs(k=k, seed=4 + k)
    labels = torch.arange(24)
    labels[[0, 5, 6]] = -100
    trl_mean, trl_tokens = trl_server_topk_loss(_student_log_probs(hs, w, 1.1), t, ids, labels, beta=beta)
    s = hs.clone().requires_grad_(True)
    ours = kernels.fused_linear_kl_topk(s, w, ids, t, temperature=1.1, beta=beta, tail=True, labels=labels)
    torch.testing.assert_close(ours, trl_mean, rtol=1e-5, atol=1e-6)
    per_token = kernels.fused_linear_kl_topk(hs, w, ids, t, temperature=1.1, beta=beta, tail=True, reduction="none")
    torch.testing.assert_close(per_token, trl_tokens, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, [s])
    s2 = hs.clone().requires_grad_(True)
    (g_trl,) = torch.autograd.grad(trl_server_topk_loss(_student_log_probs(s2, w, 1.1), t, ids, labels, beta)[0],
                                   [s2])
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-4, atol=1e-6)


def test_trl_without_tail_renormalises_ours_does_not():
    # TRL (loss_add_tail=False) compares the two top-k distributions renormalised; ours sums the raw terms.
    # On the same inputs: TRL = L / M_t + log(M_s / M_t) for forward KL, M the top-k masses (our stats).
    hs, w, ids, t = _inputs(seed=9)
    labels = torch.zeros(24, dtype=torch.long)
    _, trl_tokens = trl_server_topk_loss(_student_log_probs(hs, w), t, ids, labels, add_tail=False)
    ours, stats = kernels.fused_linear_kl_topk(hs, w, ids, t, tail=False, reduction="none", return_stats=True)
    m_t, m_s = stats["teacher_topk_mass"], stats["student_topk_mass"]
    torch.testing.assert_close(trl_tokens, ours / m_t + torch.log(m_s / m_t), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(trl_tokens, ours, atol=1e-3)


def test_the_student_tail_floor_is_the_one_difference_with_the_tail():
    # A student whose top-k mass rounds to 1 in fp32: TRL's tail is floored at ~1e-7, ours is its true mass
    # (the log-sum-exp of its other logits); with a student tail above the floor both agree (test above).
    hs, w, ids, t = _inputs(seed=10)
    hs = hs * 40.0
    ours = kernels.fused_linear_kl_topk(hs, w, ids, t, tail=True, reduction="none")
    log_ps64 = (hs.double() @ w.double().T).log_softmax(-1)
    student_tail = log_ps64.scatter(1, ids, -math.inf).logsumexp(-1)
    floored = student_tail < math.log(1e-7)
    assert floored.any()
    ref = linear_kl_topk(hs, w, ids, t, tail=True, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    _, trl_tokens = trl_server_topk_loss(_student_log_probs(hs, w), t, ids, torch.zeros(24, dtype=torch.long))
    assert (trl_tokens[floored] - ours[floored]).abs().max() > 1e-3
