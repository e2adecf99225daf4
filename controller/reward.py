"""Reward of one held exposure decision (paper section 4.3), as pure functions.

A decision d sampled for step t0 is held for steps t0..t0+K-1 and scored once step t0+L (L > K) has been
observed (or at the end of training, on the steps it got). With l_t the distillation loss the engine reports
for step t (computed on the weights *after* step t-1's update, i.e. before step t's own) and c_t the
teacher-grounded credit of step t:

    delta_i = l_{t0+i-1} - l_{t0+i}     counted (i in S) only if steps t0+i-1 and t0+i ran under one decision
    P(d)    = sum_{i in S} gamma^(i-1) delta_i / (s * sum_{i in S} gamma^(i-1)),   S within 1..H
    C(d)    = mean_{t0 <= t < t0+K} c_t
    r(d)    = clip((P(d) - mu_P) / sd_P, -clip, clip) + lambda_gt * (C(d) - mu_C) / sd_C

H = L (the discounted learning-progress reward; fewer at the end of training), H = 1 for the one-step
ablation. s is the loss scale when d was sampled, so P is a discounted mean *relative* loss decrease per
step: comparable early (large loss) and late (small loss), and for a decision cut short by the end of
training (a weighted mean over the steps it got, not a sum over fewer terms, which would read as less
progress). For complete decisions the denominator is one constant, so P is the paper's discounted sum up
to a positive factor, which the standardisation removes.

mu/sd are running mean and standard deviation of P and C over *earlier* decisions (controller state). They
are the REINFORCE baseline and normaliser: r is already a centred, scaled advantage, so a policy step can
follow every scored decision instead of waiting for a batch to centre. P is a relative loss change (~1e-3)
and C is in nats (~1): standardising both makes lambda_gt a unit-free weight and `clip` a bound in standard
deviations (an outlier guard on the noisy progress term).

Comparability of losses. The KD loss of step t is measured against the teacher at exposure alpha_t and
mismatch grows with alpha, so l_{t-1} - l_t across a decision boundary mixes learning with a mechanical jump
of the loss (alpha_prev -> alpha_next) that would reward or punish alpha itself. Each counted delta compares
two losses under one alpha; the one step per boundary whose change is not observable cleanly is left out.
P(d) is then the discounted rate at which the student keeps learning in the steps after d started,
including steps under later decisions (the delayed effect). Mismatch never enters the reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _checked_horizon(name: str, losses: Sequence[float], starts: Sequence[bool] | None, scale: float,
                     horizon: int | None) -> int:
    """The progress functions' argument checks (one-line ValueErrors); returns H, the steps looked ahead."""
    if len(losses) < 2:
        raise ValueError(f"progress needs the first loss and at least one later one, got {len(losses)}")
    if starts is not None and len(starts) != len(losses):
        raise ValueError(f"starts needs one flag per loss, got {len(starts)} for {len(losses)}")
    if scale <= 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    if not all(math.isfinite(x) for x in losses):
        raise ValueError(f"{name} got a non-finite loss; such decisions must be dropped")
    return len(losses) - 1 if horizon is None else min(int(horizon), len(losses) - 1)


def learning_progress(
    losses: Sequence[float],
    starts: Sequence[bool] | None = None,
    *,
    gamma: float,
    scale: float,
    horizon: int | None = None,
) -> float:
    """P(d) of the module docstring. losses = [l_{t0}, ..., l_{t0+H'}] (H' >= 1 steps observed after t0);
    starts[i] = step t0+i was the first step of a new decision (starts[0] is ignored; None: no boundary);
    horizon caps H (None: all of `losses`). A lookahead with no countable delta has P = 0."""
    h = _checked_horizon("learning_progress", losses, starts, scale, horizon)
    num = den = 0.0
    for i in range(1, h + 1):
        if starts is None or not starts[i]:
            w = gamma ** (i - 1)
            num += w * (losses[i - 1] - losses[i])
            den += w
    return num / (den * scale) if den > 0 else 0.0


def accuracy_progress(points: Sequence[tuple[int, float]], *, gamma: float, horizon: int | None = None) -> float:
    """P(d) for a signal that should rise and is measured now and then (``signal="accuracy"``): points =
    [(i, v_i)], offsets i from t0 (the decision's first step) in increasing order, v_i measured on the weights
    before step t0+i, i.e. after i updates since the decision began. With consecutive points (i', v'), (i, v):

        P = sum gamma^i' (v - v') / sum gamma^i'        over pairs with i <= horizon

    the discounted mean rise between measurements (absolute: an accuracy needs no scale). The signal does not
    depend on the teacher's alpha, so changes across a decision boundary count. Fewer than two points: 0."""
    h = math.inf if horizon is None else horizon
    num = den = 0.0
    for (i0, v0), (i1, v1) in zip(points, points[1:]):
        if i1 > h:
            break
        w = gamma**i0
        num += w * (v1 - v0)
        den += w
    return num / den if den > 0 else 0.0


def slope_progress(points: Sequence[Sequence[float]], *, gamma: float) -> float:
    """Discounted least-squares slope of a signal over a decision's lookahead (``estimator="slope"``, ours).
    points = [(i, v, g)]: offset i from t0 (updates since the decision began), value v, segment g (points of one
    segment share an intercept: for the KD loss, the steps under one alpha, since the loss level itself moves
    with alpha; a probe has one segment). Weights w_i = gamma^i:

        slope = sum_g sum_i w_i (i - i_g)(v - v_g) / sum_g sum_i w_i (i - i_g)^2,   i_g, v_g: weighted means in g

    the rate of change per update. Over n equally spaced points its noise is sqrt(12 / n^3) sigma against the
    sqrt(2) sigma / n of a mean of consecutive deltas (which telescopes to its end points): at n = 8 about the
    same, at n = 100 six times smaller. 0 when no segment holds two distinct offsets."""
    groups: dict[float, list[tuple[float, float, float]]] = {}
    for i, v, g in points:
        groups.setdefault(g, []).append((float(i), float(v), gamma ** float(i)))
    num = den = 0.0
    for pts in groups.values():
        w = sum(p[2] for p in pts)
        mi = sum(p[2] * p[0] for p in pts) / w
        mv = sum(p[2] * p[1] for p in pts) / w
        num += sum(p[2] * (p[0] - mi) * (p[1] - mv) for p in pts)
        den += sum(p[2] * (p[0] - mi) ** 2 for p in pts)
    return num / den if den > 1e-12 else 0.0


def loss_slope_progress(
    losses: Sequence[float],
    starts: Sequence[bool] | None = None,
    *,
    gamma: float,
    scale: float,
    horizon: int | None = None,
) -> float:
    """P(d) of the KD loss for ``estimator="slope"``: minus the :func:`slope_progress` of l_{t0..t0+H} with one
    intercept per run of steps under one alpha (a new one wherever starts[i]), relative to ``scale``. Arguments
    as :func:`learning_progress`; with H = 1 both give (l_{t0} - l_{t0+1}) / s."""
    h = _checked_horizon("loss_slope_progress", losses, starts, scale, horizon)
    seg, points = 0, []
    for i in range(h + 1):
        if i > 0 and starts is not None and starts[i]:
            seg += 1
        points.append((i, losses[i], seg))
    return -slope_progress(points, gamma=gamma) / scale


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
    progress: float | None = None,
) -> tuple[float, float, float]:
    """(r, P, C) of the module docstring, P and C raw. credits = c over the held window (may be empty when
    lambda_gt = 0: C = 0). p_stats, c_stats = (mu, sd) of P and C over earlier decisions. ``progress``: a P
    measured on another signal (:func:`accuracy_progress`); ``losses`` and ``starts`` are then unused."""
    if not all(math.isfinite(x) for x in credits):
        raise ValueError("decision_reward got a non-finite credit; such decisions must be dropped")
    prog = progress if progress is not None else learning_progress(
        losses, starts, gamma=gamma, scale=scale, horizon=horizon)
    credit = sum(credits) / len(credits) if credits else 0.0
    (mp, sp), (mc, sc) = p_stats, c_stats
    if sp <= 0 or sc <= 0:
        raise ValueError(f"standard deviations must be > 0, got sd_P={sp}, sd_C={sc}")
    z = min(clip, max(-clip, (prog - mp) / sp))
    return z + lambda_gt * (credit - mc) / sc, prog, credit


class RunningStats:
    """Exponentially weighted mean and variance that start exact: sample i (1-based) gets the weight
    max(1/i, 1 - decay), so the first 1/(1 - decay) samples are a plain mean/variance and later ones an EMA
    with memory ~1/(1 - decay). `ready` once two samples are in (a variance exists)."""

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.n, self.mean, self.var = float(decay), 0, 0.0, 0.0

    def push(self, x: float) -> None:
        self.n += 1
        w = max(1.0 / self.n, 1.0 - self.decay)
        d = x - self.mean
        self.mean += w * d
        self.var = (1.0 - w) * (self.var + w * d * d)

    @property
    def ready(self) -> bool:
        return self.n >= 2

    @property
    def sd(self) -> float:
        return math.sqrt(self.var) if self.var > 1e-30 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "var": self.var}

    def load_state_dict(self, s: dict) -> None:
        self.n, self.mean, self.var = int(s["n"]), float(s["mean"]), float(s["var"])
