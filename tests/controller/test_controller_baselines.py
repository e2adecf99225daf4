import io
import math

import pytest
import torch

from atesd.controller import (
    BetaExposureController,
    FixedExposure,
    RandomExposure,
    ScheduledExposure,
    build,
    check_stats,
)


def stats(p: float = 0.0, **over) -> dict[str, float]:
    return {"loss": 1.0, "mismatch": 0.1, "confidence": 0.5, "credit": -1.0, "progress": p, **over}


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("spec,cls,alpha", [("full", FixedExposure, 1.0), ("fixed:0.5", FixedExposure, 0.5),
                                             (" Fixed:0 ", FixedExposure, 0.0)])
def test_build_fixed(spec, cls, alpha):
    p = build(spec)
    assert isinstance(p, cls) and p.exposure() == alpha
    p.observe(stats())
    assert p.exposure() == alpha and p.metrics() == {"alpha": alpha}


def _asks(policy, steps: int, key: str) -> list[int]:
    """Steps (0-based) at which ``policy`` asks for ``key``, driven the engine's way."""
    asked = []
    for t in range(steps):
        if policy.wants(key):
            asked.append(t)
        policy.exposure()
        policy.observe(stats(t / steps))
    return asked


@pytest.mark.filterwarnings("ignore:BetaExposureController:RuntimeWarning")  # asked, not supplied: only the asks count
@pytest.mark.parametrize("signal,key", [("accuracy", "probe_accuracy"), ("probe_nll", "probe_nll")])
@pytest.mark.parametrize("steps,settings", [(60, {}), (1200, {}), (90, {"hold": 8}), (40, {"preset": "paper"}),
                                            (2000, {"decisions": 24}), (1200, {"probe_points": 2})])
def test_fixed_measures_a_named_signal_where_the_controller_would(signal, key, steps, settings):
    # for the reward audit: a fixed run measures what an adaptive run with that signal and budget would be given
    fixed = build("fixed:0.3", strict=False, signal=signal, total_steps=steps, lr=None, **settings)
    adaptive = BetaExposureController(signal=signal, total_steps=steps, lambda_gt=0.0, **settings)
    asked = _asks(fixed, steps, key)
    assert asked == _asks(adaptive, steps, key) and len(asked) >= steps // fixed.hold
    assert fixed.exposure() == 0.3
    assert fixed.config == {"signal": signal, "hold": adaptive.K, "probe_points": adaptive.config["probe_points"]}
    other = "probe_nll" if key == "probe_accuracy" else "probe_accuracy"
    assert _asks(build("fixed:0.3", strict=False, signal=signal, total_steps=steps), steps, other) == []


def test_fixed_measures_nothing_unless_a_signal_is_named_and_resumes_in_place():
    for p in (build("full"), build("full", strict=False, signal=None, total_steps=100), FixedExposure(0.5, "loss")):
        assert _asks(p, 12, "probe_accuracy") == _asks(p, 12, "probe_nll") == []
        assert p.config["signal"] in (None, "loss")
    a = FixedExposure(0.5, signal="accuracy", hold=4)
    _asks(a, 6, "probe_accuracy")
    b = FixedExposure(0.5, signal="accuracy", hold=4)
    b.load_state_dict(_roundtrip(a.state_dict()))
    assert _asks(b, 6, "probe_accuracy") == [2]  # steps 6..11: the window starting at step 8
    old = FixedExposure(0.7)
    old.load_state_dict({"alpha": 0.7})  # a state written before fixed runs could measure
    assert old.exposure() == 0.7
    # the measuring schedule continues as written: K from before --steps changed, one point per decision for a
    # state from before probe_points existed (the adaptive controller's LEGACY rule)
    long = FixedExposure(0.5, signal="accuracy", total_steps=1200)  # K = 19, 4 probe points
    _asks(long, 30, "probe_accuracy")
    longer = FixedExposure(0.5, signal="accuracy", total_steps=4000)  # K = 62 if built afresh
    longer.load_state_dict(_roundtrip(long.state_dict()))
    assert (longer.hold, longer.config["probe_points"]) == (19, 4)
    assert _asks(longer, 30, "probe_accuracy") == _asks(long, 30, "probe_accuracy")
    before = {k: v for k, v in long.state_dict().items() if k not in ("hold", "probe_points")}
    legacy = FixedExposure(0.5, signal="accuracy", total_steps=1200)
    legacy.load_state_dict(before)
    assert legacy.config["probe_points"] == 1 and legacy.hold == 19
    with pytest.raises(ValueError, match="signal"):
        FixedExposure(0.5, signal="reward")


@pytest.mark.parametrize("spec,kind,start,end", [("linear:1.0:0.3", "linear", 1.0, 0.3),
                                                  ("schedule:cosine:0.2:0.8", "cosine", 0.2, 0.8)])
def test_build_schedules(spec, kind, start, end):
    p = build(spec)
    assert isinstance(p, ScheduledExposure) and (p.kind, p.start, p.end) == (kind, start, end)


def test_build_random_and_adaptive():
    assert isinstance(build("random", seed=3), RandomExposure)
    r = build("random:0.2:0.4", hold=2)
    assert (r.low, r.high, r.hold) == (0.2, 0.4, 2)
    assert isinstance(build("adaptive"), BetaExposureController)


@pytest.mark.parametrize("spec", ["", "fixed", "fixed:1.5", "fixed:x", "linear:1.0", "banana", "random:0.5",
                                  "cosine:0.1:0.2:0.3"])
def test_build_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        build(spec)


def test_random_holds_and_is_seeded():
    p, q = RandomExposure(0.2, 0.6, hold=3, seed=7), RandomExposure(0.2, 0.6, hold=3, seed=7)
    seq = []
    for _ in range(30):
        seq.append(p.exposure())
        p.observe(stats())
    for w in range(0, 30, 3):
        assert len(set(seq[w:w + 3])) == 1
    assert len(set(seq)) == 10 and all(0.2 <= a <= 0.6 for a in seq)
    q2 = []
    for _ in range(30):
        q2.append(q.exposure())
        q.observe(stats())
    assert q2 == seq


def test_random_state_dict_mid_window():
    p = RandomExposure(hold=4, seed=1)
    for _ in range(6):
        p.exposure()
        p.observe(stats())
    p.metrics()  # must not sample
    q = RandomExposure(hold=4, seed=99)
    q.load_state_dict(_roundtrip(p.state_dict()))
    a, b = [], []
    for _ in range(20):
        a.append(p.exposure())
        b.append(q.exposure())
        p.observe(stats())
        q.observe(stats())
    assert a == b and p.metrics() == q.metrics() == {"alpha": a[-1]}


def test_linear_schedule_follows_progress():
    p = ScheduledExposure(1.0, 0.3)
    assert p.exposure() == 1.0  # before any step
    for prog in (0.0, 0.25, 0.5, 1.0):
        p.observe(stats(prog))
        assert p.exposure() == pytest.approx(1.0 - 0.7 * prog)
    p.observe(stats(math.nan))  # a bad progress keeps the previous one
    assert p.exposure() == pytest.approx(0.3)
    q = ScheduledExposure(1.0, 0.3)
    q.load_state_dict(_roundtrip(p.state_dict()))
    assert q.exposure() == p.exposure()
    c = ScheduledExposure(0.0, 1.0, kind="cosine")
    c.observe(stats(0.5))
    assert c.exposure() == pytest.approx(0.5)


def test_schedule_needs_progress():
    with pytest.raises(ValueError, match="progress"):
        ScheduledExposure().observe({"loss": 1.0})


def test_check_stats():
    out = check_stats(stats(0.5, probe_nll=2.0, extra=3.0))
    assert out["probe_nll"] == 2.0 and "extra" not in out
    assert math.isnan(check_stats(stats(loss=math.inf))["loss"])
    assert check_stats(stats(loss=torch.tensor(0.25)))["loss"] == 0.25
    with pytest.raises(ValueError, match="missing"):
        check_stats({"loss": 1.0})
    with pytest.raises(ValueError, match="mapping"):
        check_stats([1.0])
