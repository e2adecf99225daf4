"""signal="accuracy": the reward's progress measured on the probe accuracy the engine supplies when asked."""

import math

import pytest

from atesd.controller import DEFAULT_SIGNAL, DEFAULTS, BetaExposureController, build
from atesd.controller.presets import LEGACY, PRESETS, accuracy_stride
from atesd.controller.reward import accuracy_progress, slope_progress


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


@pytest.mark.parametrize("estimator", ["delta", "slope"])
def test_asks_at_every_decisions_first_step_and_scores_from_the_points(estimator):
    p = BetaExposureController(signal="accuracy", hold=4, lookahead=8, lambda_gt=0.0, seed=1, estimator=estimator)
    assert drive(p, 30) == list(range(0, 30, 4))
    p.finish()
    scored = sorted(p.history, key=lambda h: h["t0"])
    # every decision with a later measurement is scored on the points inside its lookahead; the last one is not
    assert [h["t0"] for h in scored] == list(range(0, 25, 4)) and p.metrics()["dropped"] == 1
    for h in scored:
        pts = [(t - h["t0"], acc_at(t)) for t in range(h["t0"], min(30, h["t0"] + 9), 4)]
        g = p.config["gamma"]
        want = (accuracy_progress(pts, gamma=g) if estimator == "delta" else
                slope_progress([(i, v, 0) for i, v in pts], gamma=g))
        assert h["progress"] == pytest.approx(want)
    assert p.metrics()["updates"] >= 4


def test_level_estimator_scores_the_level_its_hold_led_to():
    """estimator='level' (opt-in; docs/controller.md, the lab-like student): P is the mean of the measurements
    taken after 1..K of the decision's own steps, not a slope."""
    p = BetaExposureController(signal="accuracy", hold=4, lookahead=8, lambda_gt=0.0, seed=1, estimator="level")
    drive(p, 30)
    p.finish()
    scored = sorted(p.history, key=lambda h: h["t0"])
    assert [h["t0"] for h in scored] == list(range(0, 25, 4))  # the last decision has no measurement after it
    for h in scored:  # one measurement per decision (K < 8): the one at the next decision's start
        assert h["progress"] == pytest.approx(acc_at(h["t0"] + 4))
    long = BetaExposureController(signal="accuracy", total_steps=2000, lambda_gt=0.0, seed=2, estimator="level")
    asked = drive(long, 3 * long.K)
    long.finish()
    first = min(long.history, key=lambda h: h["t0"])
    held = [acc_at(t) for t in asked if 1 <= t <= long.K]
    assert len(held) == 4 and first["progress"] == pytest.approx(sum(held) / len(held))  # 3 inside, 1 after
    with pytest.raises(ValueError, match="level"):  # the loss level moves with alpha (mismatch)
        BetaExposureController(signal="loss", estimator="level")


def test_loss_signal_and_other_policies_never_ask():
    assert drive(BetaExposureController(lambda_gt=0.0, seed=0, signal="loss"), 12) == []
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
    assert DEFAULTS["signal"] == DEFAULT_SIGNAL == "accuracy"  # chosen on the lab's val split (docs/controller.md)


def test_accuracy_stride_measures_up_to_probe_points_times_a_decision_never_more_than_every_4_steps():
    assert [accuracy_stride(k, 4) for k in (2, 4, 7, 8, 12, 16, 19, 31)] == [2, 4, 7, 4, 4, 4, 5, 8]
    assert [accuracy_stride(31, m) for m in (1, 2, 3, 100)] == [31, 16, 11, 5]  # 7 = 31 // 4 at most
    assert DEFAULTS["probe_points"] == 4 and PRESETS["paper"]["probe_points"] == 1 and LEGACY["probe_points"] == 1


@pytest.mark.parametrize("steps,points,per_decision", [(100, None, 1), (2000, None, 4), (2000, 1, 1), (2000, 2, 2),
                                                       (1200, None, 4)])
def test_long_holds_measure_the_accuracy_several_times_per_decision(steps, points, per_decision):
    p = BetaExposureController(signal="accuracy", total_steps=steps, lambda_gt=0.0, seed=2, probe_points=points)
    k = p.K
    asked = drive(p, 3 * k)
    assert len(asked) == 3 * per_decision and asked[:per_decision][0] == 0
    assert asked == [d * k + i * accuracy_stride(k, per_decision) for d in range(3) for i in range(per_decision)]
    p.finish()
    # every point inside a decision's lookahead enters its slope: the first decision is scored on all of them
    first = min(p.history, key=lambda h: h["t0"])
    pts = [(t, acc_at(t), 0) for t in asked if t <= p.L]
    assert len(pts) > per_decision and first["progress"] == pytest.approx(slope_progress(pts, gamma=p.config["gamma"]))
    with pytest.raises(ValueError, match="probe_points"):
        BetaExposureController(signal="accuracy", probe_points=0)


def test_a_state_without_probe_points_resumes_measuring_once_per_decision():
    a = BetaExposureController(signal="accuracy", total_steps=2000, lambda_gt=0.0, seed=4, probe_points=1)
    drive(a, 40)
    state = a.state_dict()
    del state["config"]["probe_points"]  # written before the setting existed
    b = BetaExposureController(signal="accuracy", total_steps=2000, lambda_gt=0.0, seed=4)
    b.load_state_dict(state)
    assert b.config["probe_points"] == 1
    assert drive(a, 2 * a.K) == drive(b, 2 * b.K)


# ---- signal="probe_nll" -------------------------------------------------------------------------------------
def nll_at(t: int) -> float:
    """The probe NLL after step t's update: falling, with a wiggle."""
    return 2.0 - 0.01 * t + 0.02 * math.sin(0.9 * t)


def drive_nll(p: BetaExposureController, steps: int, start: int = 0, every: int = 0,
              supply: bool = True) -> list[int]:
    """Engine order: the step runs, then a probe NLL (after its update) where the policy asks or every `every`
    steps (--probe-every); returns the steps (0-based) measured."""
    measured = []
    for t in range(start, start + steps):
        p.exposure()
        s = {"loss": 1.0 - 0.001 * t, "mismatch": 0.1, "confidence": 0.5, "progress": t / 200}
        if p.wants("probe_nll") or (every and (t + 1) % every == 0):
            measured.append(t)
            if supply:
                s["probe_nll"] = nll_at(t)
        p.observe(s)
    return measured


def test_probe_nll_is_asked_about_four_times_a_window_and_at_its_end():
    p = BetaExposureController(signal="probe_nll", hold=8, lookahead=12, lambda_gt=0.0, seed=0)
    assert p.probe_stride() == 2
    assert drive_nll(p, 24) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    q = BetaExposureController(signal="probe_nll", hold=6, lookahead=10, lambda_gt=0.0, seed=0)  # stride 1
    assert drive_nll(q, 12) == list(range(12))
    r = BetaExposureController(signal="probe_nll", hold=10, lookahead=15, lambda_gt=0.0, seed=0)  # stride 2, K odd
    assert drive_nll(r, 20) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    for spec in ("full", "random"):
        assert not build(spec).wants("probe_nll")
    assert not BetaExposureController().wants("probe_nll")  # the loss signal needs no probe


def test_probe_nll_progress_is_the_relative_slope_of_the_measurements():
    K, L = 8, 12
    p = BetaExposureController(signal="probe_nll", hold=K, lookahead=L, lambda_gt=0.0, seed=0)
    drive_nll(p, 60, every=5)
    p.finish()
    assert p.metrics()["dropped"] <= 1
    for h in sorted(p.history, key=lambda h: h["t0"])[1:5]:
        t0 = h["t0"]
        # measured after the update of step t, i.e. after t - t0 + 1 updates since t0; t0 - 1 is offset 0
        pts = [(t - t0 + 1, nll_at(t)) for t in range(t0 - 1, t0 + L) if (t % 2 == 1 or (t + 1) % 5 == 0)]
        want = -slope_progress([(i, v, 0) for i, v in pts], gamma=p.config["gamma"])
        scale = h["progress"] / want
        assert scale == pytest.approx(1 / nll_at(t0 - 1), rel=0.1)  # relative to the NLL level near t0
        assert h["progress"] > 0  # the NLL falls: progress


def test_probe_nll_missing_is_warned_once_and_drops_decisions():
    p = BetaExposureController(signal="probe_nll", hold=4, lookahead=8, lambda_gt=0.0)
    with pytest.warns(RuntimeWarning, match="probe NLL"):
        drive_nll(p, 20, supply=False)
    p.finish()
    assert p.metrics()["scored"] == 0 and p.metrics()["dropped"] == 5


def test_probe_nll_resume_is_exact():
    a = BetaExposureController(signal="probe_nll", total_steps=200, seed=3, lambda_gt=0.0)
    drive_nll(a, 77, every=5)
    b = BetaExposureController(signal="probe_nll", total_steps=200, seed=3, lambda_gt=0.0)
    b.load_state_dict(a.state_dict())
    assert drive_nll(a, 80, start=77, every=5) == drive_nll(b, 80, start=77, every=5)
    assert a.history == b.history and a.exposure() == b.exposure()
