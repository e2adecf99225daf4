import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atesd.controller import DEFAULTS, BetaExposureController, OneStepBetaController, build

# the reward bookkeeping of the paper's REINFORCE path (and of the controller before budget sizing)
REINFORCE = dict(update="reinforce", snr_gate=False, estimator="delta", optimizer="sgd", lr=0.3, signal="loss")
LOSS = dict(signal="loss")  # what these streams of losses exercise (the default signal is the probe accuracy)


def stats(t: int, loss: float, credit: float = -1.0, **over) -> dict[str, float]:
    s = {"loss": loss, "mismatch": 0.2 + 0.001 * t, "confidence": 0.5, "credit": credit,
         "progress": min(1.0, t / 500)}
    s.update(over)
    return s


def loss_at(t: int) -> float:
    return 5.0 + 0.3 * math.sin(1.7 * t) - 0.01 * t


def drive(p: BetaExposureController, steps: int, start: int = 0, env=None) -> list[float]:
    """Run `steps` student steps; env(alpha, t) -> stats, default: the deterministic loss_at/credit=-t."""
    alphas = []
    for t in range(start, start + steps):
        a = p.exposure()
        assert p.exposure() == a  # idempotent within a step
        alphas.append(a)
        p.observe(env(a, t) if env else stats(t, loss_at(t), credit=-float(t)))
    return alphas


# ---- Beta parameters ----------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=6, max_size=6), st.floats(0.01, 1e4),
       st.integers(0, 3))
def test_beta_params_always_above_one(x, wscale, seed):
    p = BetaExposureController(seed=seed)
    with torch.no_grad():
        for prm in p.net.parameters():  # arbitrary (even extreme) weights
            prm.copy_(torch.randn(prm.shape, generator=torch.Generator().manual_seed(seed)) * wscale)
    a, b = p.beta_params(torch.tensor(x, dtype=torch.float32))
    assert torch.isfinite(a) and torch.isfinite(b)
    assert a.item() > 1.0 and b.item() > 1.0


def test_initial_policy_is_beta_2_2_and_alphas_in_unit_interval():
    p = BetaExposureController(seed=1)
    a, b = p.beta_params(torch.randn(10, 6))
    assert torch.allclose(a, torch.full_like(a, 2.0), atol=2e-4) and torch.allclose(b, a)
    alphas = drive(p, 200)
    assert all(0.0 <= x <= 1.0 for x in alphas)
    m = p.metrics()
    assert m["beta_a"] > 1 and m["beta_b"] > 1 and m["beta_concentration"] > 2


# ---- hold / lookahead bookkeeping ---------------------------------------------------------------------
def test_hold_windows_and_which_steps_credit_which_decision():
    K, L, gamma = 3, 7, 0.9
    p = BetaExposureController(hold=K, lookahead=L, gamma=gamma, update_batch=4, seed=0, **REINFORCE)
    ema, scale_at = None, {}
    alphas = []
    for t in range(40):
        if t % K == 0:
            scale_at[t] = ema
        alphas.append(p.exposure())
        p.observe(stats(t, loss_at(t), credit=-float(t)))
        ema = loss_at(t) if ema is None else 0.9 * ema + 0.1 * loss_at(t)
        # decision t0 is scored exactly when step t0 + L has been observed, never earlier
        assert sorted(h["t0"] for h in p.history) == [t0 for t0 in range(0, t + 1, K) if t0 + L <= t]
    # one alpha per window of K steps, a new one after
    for w in range(0, 39, K):
        assert len(set(alphas[w:w + K])) == 1
    assert len(set(alphas[::K])) == len(alphas[::K])
    for h in p.history:
        t0 = h["t0"]
        assert h["last_step"] == t0 + L and h["steps_seen"] == L + 1
        assert h["credit"] == pytest.approx(-(t0 + (K - 1) / 2))  # mean credit over steps t0..t0+K-1
        counted = [i for i in range(1, L + 1) if (t0 + i) % K != 0]  # boundary steps don't count
        deltas = [gamma ** (i - 1) * (loss_at(t0 + i - 1) - loss_at(t0 + i)) for i in counted]
        scale = abs(loss_at(0)) if t0 == 0 else scale_at[t0]
        mean = sum(deltas) / sum(gamma ** (i - 1) for i in counted)
        assert h["progress"] == pytest.approx(mean / scale, rel=1e-9)
        assert h["alpha"] == alphas[t0]
    # the first two scored decisions only seed the running baseline; the others go 4 to a policy step
    assert [h["used"] for h in p.history][:3] == [False, False, True]
    assert p.metrics()["updates"] == (len(p.history) - 2) // 4


@pytest.mark.parametrize("steps", [20, 21, 22])
def test_finish_scores_every_pending_decision(steps):
    K, L = 3, 7
    p = BetaExposureController(hold=K, lookahead=L, update_batch=4, seed=0, **LOSS)
    drive(p, steps)
    before = p.metrics()
    p.finish()
    m = p.metrics()
    n_dec = math.ceil(steps / K)
    assert m["decisions"] == n_dec
    assert m["scored"] + m["dropped"] == n_dec  # none lost
    # only a decision whose first step is the very last one has no later loss and is dropped
    assert m["dropped"] == (1 if (steps - 1) % K == 0 else 0)
    assert m["updates"] == before["updates"] + 1  # leftovers used in one final step
    truncated = [h for h in p.history if h["steps_seen"] < L + 1]
    assert all(h["steps_seen"] == steps - h["t0"] for h in truncated)
    assert not p._pending and not p._ready
    drive(p, 5, start=steps)  # usable afterwards


# ---- REINFORCE --------------------------------------------------------------------------------------
@pytest.mark.parametrize("good", [0.8, 0.2])
def test_reinforce_makes_above_average_decision_more_likely(good):
    p = BetaExposureController(entropy_coef=0.0, seed=0, **REINFORCE)
    s = [0.3, -0.2, 0.5, 0.1, -0.4, 0.2]
    batch = [{"state": s, "alpha": x, "reward": float(x == good), "progress": 0.0, "credit": 0.0}
             for x in (0.8, 0.2) * 4]
    x = torch.tensor(s)

    def logp(alpha):
        a, b = p.beta_params(x)
        return torch.distributions.Beta(a, b).log_prob(torch.tensor(alpha)).item()

    bad = 0.2 if good == 0.8 else 0.8
    g0, b0 = logp(good), logp(bad)
    p._update(batch)
    assert logp(good) > g0 and logp(bad) < b0


@pytest.mark.parametrize("prefers_high", [True, False])
def test_closed_loop_learns_direction(prefers_high):
    """Loss falls faster under high (or low) exposure: the learned Beta mean must move that way."""
    rng = torch.Generator().manual_seed(0)
    state = {"loss": 3.0}

    def env(a, t):
        out = stats(t, state["loss"])
        noise = 0.001 * torch.randn((), generator=rng).item()
        state["loss"] -= 0.004 * (a if prefers_high else 1 - a) + noise
        return out

    p = BetaExposureController(seed=0, lambda_gt=0.0, **LOSS)
    alphas = drive(p, 1200, env=env)
    late = sum(alphas[-300:]) / 300
    assert (late > 0.65) if prefers_high else (late < 0.35)


# ---- checkpointing ---------------------------------------------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", [BetaExposureController, OneStepBetaController])
def test_state_dict_mid_window_continues_bit_identically(cls):
    kw = dict(hold=4, lookahead=10, update_batch=3, **LOSS)
    a = cls(seed=3, **kw)
    drive(a, 37)  # mid-window (37 % 4 == 1), decisions pending, scored ones waiting for an update
    assert a._in_window == 1 and a._pending and a._ready
    b = cls(seed=12345, **kw)
    b.load_state_dict(_roundtrip(a.state_dict()))
    ra, rb = drive(a, 120, start=37), drive(b, 120, start=37)
    assert ra == rb
    assert a.metrics() == b.metrics() and a.metrics()["updates"] > 3
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    assert list(a.history) == list(b.history)


def test_load_rejects_other_config():
    a = BetaExposureController(hold=4)
    with pytest.raises(ValueError, match="hold"):
        BetaExposureController(hold=5).load_state_dict(a.state_dict())


# ---- bad stats ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"drop": "loss"}, {"drop": "credit"}, {"loss": "abc"}, {"progress": 1.5}])
def test_invalid_stats_are_rejected_without_side_effects(bad):
    p = BetaExposureController(seed=0)
    drive(p, 9)
    ref = BetaExposureController(seed=0)
    ref.load_state_dict(p.state_dict())
    s = stats(9, 1.0)
    if "drop" in bad:
        s.pop(bad["drop"])
    else:
        s.update(bad)
    with pytest.raises(ValueError, match=bad.get("drop", next(iter(bad)))):
        p.observe(s)
    assert drive(p, 30, start=9) == drive(ref, 30, start=9)


BAD_VALUES = [("loss", math.nan), ("loss", math.inf), ("credit", -math.inf), ("mismatch", math.nan),
              ("confidence", math.inf), ("probe_nll", math.nan)]


@pytest.mark.parametrize("key,val", BAD_VALUES)
def test_non_finite_stats_are_skipped_and_never_poison(key, val):
    K, L = 4, 10
    p = BetaExposureController(hold=K, lookahead=L, update_batch=2, seed=0, **LOSS)
    drive(p, 21)
    with pytest.warns(RuntimeWarning, match=key):
        p.observe({**stats(21, loss_at(21), credit=-21.0), key: val})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drive(p, 60, start=22)
    p.finish()
    m = p.metrics()
    assert all(math.isfinite(v) for v in m.values())
    assert all(torch.isfinite(x).all() for x in p.net.parameters())
    assert all(math.isfinite(h["reward"]) for h in p.history)
    if key == "loss":  # decisions whose lookahead holds step 21 (t0 in 12..20) are dropped, others scored
        assert m["dropped"] == 3 and m["scored"] == m["decisions"] - 3
    elif key == "credit":  # only the decision holding step 21 in its window (t0 = 20)
        assert m["dropped"] == 1
    else:
        assert m["dropped"] == 0
    assert all(math.isfinite(v) for v in p._ema.values() if v is not None)


def test_constructor_validation():
    bad = (dict(hold=1), dict(hold=4, lookahead=4), dict(gamma=0.0), dict(update_batch=0), dict(ema=1.0),
           dict(lambda_gt=-0.1), dict(optimizer="rmsprop"), dict(update="sgd"), dict(min_sd=0.5), dict(max_kl=-1.0),
           dict(window_ema=1.0), dict(estimator="mean"), dict(decisions=0), dict(update="reinforce", snr_gate=True),
           dict(preset="fast"), dict(total_steps=0))
    for kw in bad:
        with pytest.raises(ValueError):
            BetaExposureController(**kw)


def test_build_adaptive_overrides():
    p = build("adaptive", seed=2, hold=6, lookahead=18)
    assert isinstance(p, BetaExposureController) and p.K == 6 and p.L == 18
    q = build("adaptive-onestep")
    assert isinstance(q, OneStepBetaController) and q.config["one_step"]


def test_build_non_strict_gives_each_policy_the_settings_it_takes():
    settings = dict(DEFAULTS, hold=3, lookahead=6)
    assert build("adaptive", strict=False, **settings).config["hold"] == 3
    assert build("adaptive-onestep", strict=False, **settings).L == 6
    assert build("random", strict=False, **settings).hold == 3
    full = build("full", strict=False, **settings)  # what a fixed run measures for the reward audit: K and signal
    assert full.alpha == 1.0 and full.hold == 3 and full.config["signal"] == DEFAULTS["signal"]
    with pytest.raises(TypeError):
        build("full", lookahead=6)  # strict (the default): a setting the policy does not take is an error


@pytest.mark.parametrize("spec", ["adaptive", "adaptive-onestep", "random"])
def test_seed_decides_the_decisions(spec):
    def alphas(seed):
        p = build(spec, seed=seed)
        return drive(p, 40)

    assert alphas(0) == alphas(0) and alphas(0) != alphas(1)


def test_without_credit_weight_credit_is_optional():
    p = BetaExposureController(lambda_gt=0.0, seed=0, **LOSS)
    assert not p.uses_credit and BetaExposureController().uses_credit
    for t in range(30):
        p.exposure()
        p.observe({k: v for k, v in stats(t, loss_at(t)).items() if k != "credit"})
    assert p.metrics()["scored"] > 0


@pytest.mark.parametrize("prefers_high", [True, False])
@pytest.mark.parametrize("steps", [100, 1000])
@pytest.mark.parametrize("signal", [None, "loss"])
def test_defaults_learn_a_clean_signal_at_any_budget(prefers_high, steps, signal):
    """A clean "more (or less) exposure helps" signal moves the policy far from its prior (mean 0.5) with the
    defaults told the budget, in a 100-step run as in a 1000-step one: the default signal (the probe accuracy,
    measured where the policy asks, before the step) and the loss."""
    state = {"loss": 3.0, "skill": 0.2}

    def env(a, t):
        out = stats(t, state["loss"], credit=-1.0, progress=t / steps)
        if p.wants("probe_accuracy"):
            out["probe_accuracy"] = state["skill"]
        gain = 0.004 * (a if prefers_high else 1 - a)
        state["loss"] -= gain
        state["skill"] += gain / 4
        return out

    p = BetaExposureController(seed=0, lambda_gt=0.0, total_steps=steps, signal=signal)
    assert p.config["signal"] == (signal or DEFAULTS["signal"])
    drive(p, steps, env=env)
    assert p.metrics()["updates"] >= 20
    a, b = p.current_beta()
    mean = a / (a + b)
    assert (mean > 0.7) if prefers_high else (mean < 0.3)


@pytest.mark.parametrize("spec,kw", [("adaptive", {}), ("adaptive", {"preset": "paper"}), ("adaptive-onestep", {}),
                                     ("random", {})])
def test_a_policy_never_draws_from_the_callers_random_stream(spec, kw):
    """Building and driving a policy leaves torch's global generator alone: an engine seeds its LoRA init from it,
    and an adaptive run must start from the same adapter as a fixed one of the same seed. (Regression: nn.Linear's
    default init of the MLP drew from it.)"""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    p = build(spec, seed=4, total_steps=200, **kw)
    for t in range(40):
        p.exposure()
        p.observe({"loss": 1.0 - 0.01 * t, "mismatch": 0.1, "confidence": 0.5, "credit": -1.0, "progress": t / 200,
                   "probe_accuracy": 0.5 + 0.005 * t})
    p.finish()
    assert torch.equal(torch.get_rng_state(), before)
