import math
import random
import statistics

import pytest

from atesd.controller import decision_reward
from atesd.controller.reward import RunningStats, learning_progress, loss_slope_progress, slope_progress

KW = dict(gamma=0.5, scale=2.0, clip=10.0, lambda_gt=0.0)
LOSSES = [1.0, 0.9, 0.85, 0.95, 0.8]


def test_hand_computed_with_boundary():
    # steps t0..t0+4; step t0+3 starts the next decision, so delta_{t0+3} = l2 - l3 is not counted
    starts = [True, False, False, True, False]
    r, p, c = decision_reward(LOSSES, [-1.0, -2.0], starts, **KW)
    # discounted mean over the counted deltas (weights 1, 0.5, 0.125), relative to the scale 2
    assert p == pytest.approx((0.1 * 1 + 0.05 * 0.5 + 0.15 * 0.125) / (1 + 0.5 + 0.125) / 2)
    assert c == pytest.approx(-1.5)
    assert r == pytest.approx(p)  # lambda_gt = 0, mu = 0, sd = 1


def test_no_boundary_flags_counts_every_delta():
    _, p, _ = decision_reward(LOSSES, [0.0], None, **KW)
    assert p == pytest.approx((0.1 + 0.025 - 0.1 * 0.25 + 0.15 * 0.125) / (1 + 0.5 + 0.25 + 0.125) / 2)


def test_complete_decisions_are_the_papers_discounted_sum_up_to_one_factor():
    # same boundary pattern (as for every complete decision): P is proportional to the discounted sum
    starts = [True, False, False, True, False]
    other = [2.0, 1.7, 1.75, 1.2, 1.1]
    ratios = []
    for ls in (LOSSES, other):
        dsum = sum(0.5 ** (i - 1) * (ls[i - 1] - ls[i]) for i in range(1, 5) if not starts[i]) / 2.0
        ratios.append(learning_progress(ls, starts, gamma=0.5, scale=2.0) / dsum)
    assert ratios[0] == pytest.approx(ratios[1])


def test_standardisation_clip_and_credit_weight():
    starts = [True, False, False, True, False]
    kw = dict(KW, clip=1.0, lambda_gt=0.2)
    r, p, c = decision_reward(LOSSES, [-1.0, -2.0], starts, **kw, p_stats=(0.01, 0.02), c_stats=(-1.0, 0.5))
    z_p = (p - 0.01) / 0.02
    assert z_p > 1.0
    assert r == pytest.approx(1.0 + 0.2 * (-1.5 + 1.0) / 0.5)
    r2, _, _ = decision_reward(LOSSES, [-1.0, -2.0], starts, **dict(kw, clip=5.0), p_stats=(0.01, 0.02),
                               c_stats=(-1.0, 0.5))
    assert r2 == pytest.approx(z_p - 0.2)


def test_one_step_horizon_and_truncation():
    _, p1, _ = decision_reward(LOSSES, [0.0], None, **KW, horizon=1)
    assert p1 == pytest.approx(0.05)
    # a decision cut short by the end of training: the same discounted mean over the steps it got
    _, p2, _ = decision_reward(LOSSES[:3], [0.0], None, **KW)
    assert p2 == pytest.approx((0.1 + 0.025) / 1.5 / 2)
    assert learning_progress([1.0, 1.2], [True, True], gamma=0.9, scale=1.0) == 0.0  # nothing countable


def test_higher_loss_later_gives_negative_progress():
    _, p, _ = decision_reward([1.0, 1.1, 1.3], [0.0], None, gamma=1.0, scale=1.0, clip=10.0, lambda_gt=0.0)
    assert p == pytest.approx(-0.15)


@pytest.mark.parametrize("bad", [dict(losses=[1.0]), dict(losses=[1.0, math.nan]),
                                 dict(credits=[math.inf]), dict(scale=0.0), dict(starts=[True])])
def test_bad_inputs_raise(bad):
    args = dict(losses=[1.0, 0.9], credits=[0.0], starts=None, **KW)
    args.update(bad)
    with pytest.raises(ValueError):
        decision_reward(args.pop("losses"), args.pop("credits"), args.pop("starts"), **args)


def test_running_stats_start_exact_then_forget():
    s = RunningStats(decay=0.75)  # exact for the first 1 / (1 - 0.75) = 4 samples
    assert not s.ready and s.sd == 1.0
    xs = [1.0, 3.0, 2.0, 6.0]
    for x in xs:
        s.push(x)
    m = sum(xs) / 4
    assert s.ready and s.mean == pytest.approx(m) and s.var == pytest.approx(sum((x - m) ** 2 for x in xs) / 4)
    for _ in range(60):  # then an EMA: old samples fade
        s.push(10.0)
    assert s.mean == pytest.approx(10.0, abs=1e-6) and s.var < 1e-5
    t = RunningStats(0.75)
    t.load_state_dict(s.state_dict())
    assert (t.n, t.mean, t.var) == (s.n, s.mean, s.var)


# ---- estimator="slope" ------------------------------------------------------------------------------------
def test_slope_is_a_weighted_least_squares_slope_with_one_intercept_per_segment():
    pts = [(0, 1.0, 0), (1, 0.8, 0), (2, 0.7, 0), (3, 5.5, 1), (4, 5.2, 1)]  # a jump at the boundary
    w = [0.5**i for i in range(5)]
    # by hand: segment 0 weighted means, then segment 1
    def seg(idx):
        sw = sum(w[i] for i in idx)
        mi = sum(w[i] * pts[i][0] for i in idx) / sw
        mv = sum(w[i] * pts[i][1] for i in idx) / sw
        return (sum(w[i] * (pts[i][0] - mi) * (pts[i][1] - mv) for i in idx),
                sum(w[i] * (pts[i][0] - mi) ** 2 for i in idx))
    (n0, d0), (n1, d1) = seg([0, 1, 2]), seg([3, 4])
    assert slope_progress(pts, gamma=0.5) == pytest.approx((n0 + n1) / (d0 + d1))
    assert slope_progress([(0, 1.0, 0), (1, 2.0, 1)], gamma=0.9) == 0.0  # no segment with two points


def test_loss_slope_ignores_level_jumps_and_matches_delta_over_one_step():
    losses = [2.0 - 0.1 * i + (0.7 if i >= 3 else 0.0) for i in range(7)]  # alpha changed at i = 3
    starts = [True, False, False, True, False, False, False]
    assert loss_slope_progress(losses, starts, gamma=0.8, scale=2.0) == pytest.approx(0.1 / 2.0)
    assert loss_slope_progress(LOSSES, None, gamma=0.9, scale=2.0, horizon=1) == pytest.approx(
        learning_progress(LOSSES, None, gamma=0.9, scale=2.0, horizon=1))
    with pytest.raises(ValueError):
        loss_slope_progress([1.0, math.nan], None, gamma=0.9, scale=1.0)


def test_slope_is_far_less_noisy_than_the_delta_mean_over_long_lookaheads():
    rng = random.Random(0)
    n, draws = 100, 300
    sl, dl = [], []
    for _ in range(draws):
        losses = [1.0 - 0.001 * i + rng.gauss(0, 0.01) for i in range(n)]
        sl.append(loss_slope_progress(losses, None, gamma=1.0, scale=1.0))
        dl.append(learning_progress(losses, None, gamma=1.0, scale=1.0))
    sd = lambda x: statistics.pstdev(x)  # noqa: E731
    assert sd(sl) < 0.25 * sd(dl)  # theory: sqrt(12 / n^3) vs sqrt(2) / n, 0.25 at n = 100
    assert statistics.fmean(sl) == pytest.approx(0.001, rel=0.2)
    assert statistics.fmean(dl) == pytest.approx(0.001, rel=0.6)
