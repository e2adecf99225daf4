import math

import pytest

from atesd.controller import decision_reward

KW = dict(gamma=0.5, scale=2.0, clip=10.0, lambda_gt=0.0)


def test_hand_computed_with_boundary():
    # steps t0..t0+4; step t0+3 starts the next decision, so delta_{t0+3} = l2 - l3 is not counted
    losses = [1.0, 0.9, 0.85, 0.95, 0.8]
    starts = [True, False, False, True, False]
    r, p, c = decision_reward(losses, [-1.0, -2.0], starts, **KW)
    # (0.1 * 1 + 0.05 * 0.5 + 0 + 0.15 * 0.125) / 2
    assert p == pytest.approx((0.1 + 0.025 + 0.01875) / 2)
    assert c == pytest.approx(-1.5)
    assert r == pytest.approx(p)  # lambda_gt = 0, mu = 0, sd = 1


def test_no_boundary_flags_counts_every_delta():
    losses = [1.0, 0.9, 0.85, 0.95, 0.8]
    _, p, _ = decision_reward(losses, [0.0], None, **KW)
    assert p == pytest.approx((0.1 + 0.025 - 0.1 * 0.25 + 0.15 * 0.125) / 2)


def test_standardisation_clip_and_credit_weight():
    losses = [1.0, 0.9, 0.85, 0.95, 0.8]
    starts = [True, False, False, True, False]
    kw = dict(KW, clip=1.0, lambda_gt=0.2)
    r, p, c = decision_reward(losses, [-1.0, -2.0], starts, **kw, p_stats=(0.01, 0.05), c_stats=(-1.0, 0.5))
    z_p = (0.071875 - 0.01) / 0.05  # 1.2375 -> clipped to 1.0
    assert z_p > 1.0
    assert r == pytest.approx(1.0 + 0.2 * (-1.5 + 1.0) / 0.5)
    r2, _, _ = decision_reward(losses, [-1.0, -2.0], starts, **dict(kw, clip=5.0), p_stats=(0.01, 0.05),
                               c_stats=(-1.0, 0.5))
    assert r2 == pytest.approx(z_p - 0.2)


def test_one_step_horizon_and_truncation():
    losses = [1.0, 0.9, 0.85, 0.95, 0.8]
    _, p1, _ = decision_reward(losses, [0.0], None, **KW, horizon=1)
    assert p1 == pytest.approx(0.05)
    _, p2, _ = decision_reward(losses[:3], [0.0], None, **KW)  # truncated lookahead (finish())
    assert p2 == pytest.approx((0.1 + 0.025) / 2)


def test_higher_loss_later_gives_negative_progress():
    _, p, _ = decision_reward([1.0, 1.1, 1.3], [0.0], None, gamma=1.0, scale=1.0, clip=10.0, lambda_gt=0.0)
    assert p == pytest.approx(-0.3)


@pytest.mark.parametrize("bad", [dict(losses=[1.0]), dict(losses=[1.0, math.nan]),
                                 dict(credits=[math.inf]), dict(scale=0.0), dict(starts=[True])])
def test_bad_inputs_raise(bad):
    args = dict(losses=[1.0, 0.9], credits=[0.0], starts=None, **KW)
    args.update(bad)
    with pytest.raises(ValueError):
        decision_reward(args.pop("losses"), args.pop("credits"), args.pop("starts"), **args)
