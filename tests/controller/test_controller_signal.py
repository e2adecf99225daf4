"""signal="accuracy": the reward's progress measured on the probe accuracy the engine supplies when asked."""

import math

import pytest

from atesd.controller import DEFAULTS, BetaExposureController, build
from atesd.controller.reward import accuracy_progress


def test_accuracy_progress_is_a_discounted_mean_rise():
    pts = [(0, 0.5), (4, 0.6), (8, 0.55)]
    g4 = 0.9**4
    assert accuracy_progress(pts, gamma=0.9) == pytest.approx((0.1 - g4 * 0.05) / (1 + g4))
    assert accuracy_progress(pts, gamma=0.9, horizon=4) == pytest.approx(0.1)  # the one-step ablation's view
    assert accuracy_progress(pts, gamma=0.9, horizon=3) == 0.0 and accuracy_progress(pts[:1], gamma=0.9) == 0.0


def acc_at(t: int) -> float:
    return 0.4 + 0.01 * t + 0.05 * math.sin(0.7 * t)


def drive(p: BetaExposureController, steps: int, supply: bool = True) -> list[int]:
    """Steps whose start the policy asked to measure; the probe accuracy is supplied there when ``supply``."""
    asked = []
    for t in range(steps):
        want = p.wants("probe_accuracy")
        p.exposure()
        stats = {"loss": 1.0 - 0.001 * t, "mismatch": 0.1, "confidence": 0.5, "progress": t / steps}
        if want:
            asked.append(t)
            if supply:
                stats["probe_accuracy"] = acc_at(t)
        p.observe(stats)
    return asked


def test_asks_at_every_decisions_first_step_and_scores_from_the_points():
    p = BetaExposureController(signal="accuracy", hold=4, lookahead=8, lambda_gt=0.0, seed=1)
    assert drive(p, 30) == list(range(0, 30, 4))
    p.finish()
    scored = sorted(p.history, key=lambda h: h["t0"])
    # every decision with a later measurement is scored on the points inside its lookahead; the last one is not
    assert [h["t0"] for h in scored] == list(range(0, 25, 4)) and p.metrics()["dropped"] == 1
    for h in scored:
        pts = [(t - h["t0"], acc_at(t)) for t in range(h["t0"], min(30, h["t0"] + 9), 4)]
        assert h["progress"] == pytest.approx(accuracy_progress(pts, gamma=0.9))
    assert p.metrics()["updates"] >= 4


def test_loss_signal_and_other_policies_never_ask():
    assert drive(BetaExposureController(lambda_gt=0.0, seed=0), 12) == []
    for spec in ("full", "random", "fixed:0.3", "linear:1:0"):
        assert not build(spec).wants("probe_accuracy")
    assert not BetaExposureController(signal="accuracy").wants("probe_nll")
    with pytest.raises(ValueError, match="signal"):
        BetaExposureController(signal="reward")


def test_missing_measurements_drop_decisions_not_the_run():
    p = BetaExposureController(signal="accuracy", hold=4, lookahead=8, lambda_gt=0.0)
    drive(p, 20, supply=False)
    p.finish()
    assert p.metrics()["scored"] == 0 and p.metrics()["dropped"] == 5 and p.metrics()["updates"] == 0


def test_resume_is_exact_and_old_checkpoints_load():
    a = BetaExposureController(signal="accuracy", lambda_gt=0.0, seed=3)
    drive(a, 14)
    b = BetaExposureController(signal="accuracy", lambda_gt=0.0, seed=3)
    b.load_state_dict(a.state_dict())
    for p in (a, b):
        for t in range(14, 40):
            want = p.wants("probe_accuracy")
            p.exposure()
            p.observe({"loss": 1.0, "mismatch": 0.1, "confidence": 0.5, "progress": t / 40,
                       **({"probe_accuracy": acc_at(t)} if want else {})})
    assert a.history == b.history and a.exposure() == b.exposure()
    # a checkpoint from before the setting existed holds the default
    old = BetaExposureController(seed=0).state_dict()
    del old["config"]["signal"]
    BetaExposureController(seed=0).load_state_dict(old)
    with pytest.raises(ValueError, match="signal"):
        BetaExposureController(signal="accuracy", seed=0).load_state_dict(old)
    assert DEFAULTS["signal"] == "loss"
