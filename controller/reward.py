"""Reward of one held exposure decision (paper section 4.3), as a pure function.

A decision d sampled for step t0 is held for steps t0..t0+K-1 and scored once step t0+L (L > K) has been
observed. With l_t the distillation loss the engine reports for step t (computed on the weights *before*
step t's update) and c_t the teacher-grounded credit of step t:

    delta_t = l_{t-1} - l_t   if steps t-1 and t ran under the same decision, else 0
    P(d)    = sum_{i=1..H} gamma^(i-1) * delta_{t0+i} / s          discounted relative learning progress
    C(d)    = mean_{t0 <= t < t0+K} c_t                             teacher-grounded credit (nats)
    r(d)    = clip((P(d) - mu_P) / sd_P, -clip, clip) + lambda_gt * (C(d) - mu_C) / sd_C

H = L for the discounted learning-progress reward, H = 1 for the one-step ablation. mu/sd are running
(EMA) mean and std of P and C over earlier decisions, kept by the controller: P is a relative loss change
(~1e-3) and C is in nats (~1), so standardising both makes lambda_gt a unit-free weight and `clip` a bound
in standard deviations (an outlier guard). The REINFORCE batch then centres and normalises r again.

Comparability of losses. The KD loss of step t is measured against the teacher at exposure alpha_t and
mismatch grows with alpha, so l_{t-1} - l_t across a decision boundary mixes learning with a mechanical
jump of the loss (alpha_prev -> alpha_next) that would reward or punish alpha itself. Each delta therefore
compares two losses under the same alpha; the one step per boundary whose change is not observable cleanly
counts 0. P(d) is then the discounted rate at which the student keeps learning in the L steps after d
started, including steps under later decisions (the delayed effect). Within one window the deltas
telescope, so loss noise enters about twice per window touched, not once per term. s is the controller's
loss EMA when d was sampled (|l_{t0}| for the first decision): P is a *relative* decrease, comparable early
(large loss) and late (small loss). Mismatch never enters the reward (it is controller state only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def decision_reward(
    losses: Sequence[float],
    credits: Sequence[float],
    starts: Sequence[bool] | None = None,
    *,
    gamma: float,
    scale: float,
    clip: float,
    lambda_gt: float,
    horizon: int | None = None,
    p_stats: tuple[float, float] = (0.0, 1.0),
    c_stats: tuple[float, float] = (0.0, 1.0),
) -> tuple[float, float, float]:
    """losses = [l_{t0}, ..., l_{t0+H'}] (H' >= 1 observed steps after t0), credits = c over the held
    window, starts[i] = step t0+i was the first step of a new decision (starts[0] is ignored; None: no
    boundary). horizon H caps the progress sum (None: use all of `losses`). p_stats, c_stats = (mu, sd) of
    P and C. Returns (r, P, C), P and C raw (unstandardised)."""
    if len(losses) < 2:
        raise ValueError(f"a reward needs the first loss and at least one later one, got {len(losses)}")
    if not all(math.isfinite(x) for x in (*losses, *credits)):
        raise ValueError("decision_reward got a non-finite loss or credit; such decisions must be dropped")
    if scale <= 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    h = len(losses) - 1 if horizon is None else min(int(horizon), len(losses) - 1)
    if starts is not None and len(starts) != len(losses):
        raise ValueError(f"starts needs one flag per loss, got {len(starts)} for {len(losses)}")
    prog = sum(gamma ** (i - 1) * (losses[i - 1] - losses[i])
               for i in range(1, h + 1) if starts is None or not starts[i]) / scale
    credit = sum(credits) / len(credits) if credits else 0.0
    (mp, sp), (mc, sc) = p_stats, c_stats
    if sp <= 0 or sc <= 0:
        raise ValueError(f"standard deviations must be > 0, got sd_P={sp}, sd_C={sc}")
    z = min(clip, max(-clip, (prog - mp) / sp))
    return z + lambda_gt * (credit - mc) / sc, prog, credit
