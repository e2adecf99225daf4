"""engine.reward_audit: fixed-alpha runs scored under each signal exactly as the adaptive controller scores its
decisions."""

import json
import math

import pytest
import yaml

from atesd.controller import BetaExposureController, FixedExposure
from atesd.engine.reward_audit import (
    KEYS,
    alignment,
    decision_signals,
    main,
    replay_progress,
    run_signals,
    spearman,
)

ENGINE_PROBE_EVERY = 5  # engine.config's --probe-every default: what an adaptive run gets unless told otherwise


def loss_at(t, alpha=0.5, seed=0):
    return 1.0 + 0.3 * math.sin(1.3 * t + seed) - 0.01 * t + 0.2 * alpha


def accuracy_at(t, rate=0.01, seed=0):
    return 0.4 + rate * t + 0.03 * math.sin(0.7 * t + seed)


def nll_at(t, rate=0.01, seed=0):
    return 2.0 - rate * t + 0.02 * math.sin(0.9 * t + seed)


def stats_at(t, steps, alpha=0.5, seed=0):
    return {"loss": loss_at(t, alpha, seed), "mismatch": 0.1 * alpha, "confidence": 0.5, "progress": (t + 1) / steps}


def fixed_run(path, steps, *, alpha=0.5, seed=0, rate=0.01, controller=None, probe_every=1, measure=True,
              skipped=(), heldout=None):
    """A run directory as engine.train writes it for ``--exposure fixed:<alpha>`` measuring for the audit
    (``--controller-signal accuracy --probe-every <probe_every>``): config.yaml, metrics.jsonl (1-based steps; the
    probe accuracy before a step's update where FixedExposure asks, the probe NLL after it every probe_every steps)
    and, with ``heldout`` ({step: accuracy}), eval_summary.json."""
    path.mkdir(parents=True)
    settings = {f"controller_{k}": v for k, v in (controller or {}).items()}
    cfg = {"steps": steps, "seed": seed, "probe_every": probe_every, "exposure": f"fixed:{alpha}", **settings,
           "controller_signal": "accuracy" if measure else None}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    policy = FixedExposure(alpha, signal="accuracy" if measure else None, total_steps=steps,
                           **{k: v for k, v in (controller or {}).items() if k in ("hold", "preset", "decisions")})
    rows = []
    for t in range(steps):
        row = {"step": t + 1, "alpha": alpha, **stats_at(t, steps, alpha, seed), "skipped_step": int(t in skipped)}
        if policy.wants("probe_accuracy"):
            row["probe_accuracy"] = accuracy_at(t, rate, seed)
        if probe_every and (t + 1) % probe_every == 0:
            row["probe_nll"] = nll_at(t, rate, seed)
        if t in skipped:
            row["loss"] = float("nan")
        else:
            policy.observe(row)
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if heldout is not None:
        hist = [{"step": s, "accuracy": a} for s, a in heldout.items()]
        (path / "eval_summary.json").write_text(json.dumps({"benchmarks": {"lab-val": {"history": hist}}}))
    return str(path)


def live_progress(signal, steps, controller=None, seed=0, rate=0.01, skipped=()):
    """P(d) per decision of an adaptive controller with ``signal`` fed the engine's way: the probe accuracy before a
    step where it asks, the probe NLL after it where it asks or every --probe-every steps (the engine default);
    a skipped step is never shown to it."""
    p = BetaExposureController(total_steps=steps, signal=signal, lambda_gt=0.0, seed=seed, **(controller or {}))
    for t in range(steps):
        if t in skipped:
            continue
        s = stats_at(t, steps, 0.5, seed)
        if p.wants("probe_accuracy"):
            s["probe_accuracy"] = accuracy_at(t, rate, seed)
        if p.wants("probe_nll") or (t + 1) % ENGINE_PROBE_EVERY == 0:
            s["probe_nll"] = nll_at(t, rate, seed)
        p.exposure()
        p.observe(s)
    p.finish()
    return [h["progress"] for h in sorted(p.history, key=lambda h: h["t0"])]


CONTROLLERS = [
    (40, None),  # default preset, K and L sized from the budget (K=4, L=8)
    (90, {"hold": 8}),  # explicit K: L, gamma, lr sized from it; the probe NLL asked every 2nd step
    (300, None),  # K=5, L=9: one probe NLL per step asked, one every 5 steps on top
    (30, {"preset": "paper"}),  # K=4, L=12, the paper's delta estimator
    (40, {"estimator": "delta", "lookahead": 10}),
]


@pytest.mark.parametrize("signal", ["loss", "accuracy", "probe_nll"])
@pytest.mark.parametrize("steps,controller", CONTROLLERS)
def test_each_signal_is_scored_as_the_controller_scores_it(tmp_path, signal, steps, controller):
    run = fixed_run(tmp_path / "r", steps, controller=controller)
    got = decision_signals(run)[signal]
    want = live_progress(signal, steps, controller)
    assert got is not None and len(got) >= 4
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_the_probe_nll_is_replayed_where_the_controller_would_have_it_not_wherever_it_was_logged(tmp_path):
    run = fixed_run(tmp_path / "r", 90, controller={"hold": 8})  # logged every step; asked every 2nd (+ every 5th)
    audited = decision_signals(run)["probe_nll"]
    assert audited == pytest.approx(live_progress("probe_nll", 90, {"hold": 8}))
    every_step = replay_progress(yaml.safe_load(open(f"{run}/config.yaml")),
                                 [json.loads(ln) for ln in open(f"{run}/metrics.jsonl")], "probe_nll", probe_every=1)
    assert len(every_step) == len(audited) and every_step != pytest.approx(audited, rel=1e-6)


def test_settings_are_resolved_from_the_budget_like_the_controller(tmp_path):
    # T = 640, no K given: K = 640 / 64 = 10, 64 decisions; an explicit K wins
    assert len(decision_signals(fixed_run(tmp_path / "a", 640))["loss"]) == 64
    # K = 20: the accuracy probe 4 times per decision (steps 0, 5, 10, 15 of each), so the last decision has 4 points
    assert len(decision_signals(fixed_run(tmp_path / "b", 640, controller={"hold": 20}))["accuracy"]) == 32
    # once per decision: the last decision has one measurement and is dropped
    once = fixed_run(tmp_path / "b1", 640, controller={"hold": 20, "probe_points": 1})
    assert len(decision_signals(once)["accuracy"]) == 31
    assert len(decision_signals(fixed_run(tmp_path / "c", 640, controller={"hold": 20}))["loss"]) == 32


def test_skipped_steps_are_not_observed(tmp_path):
    with_skip = decision_signals(fixed_run(tmp_path / "a", 41, skipped={5}))
    for signal in ("loss", "accuracy", "probe_nll"):
        assert with_skip[signal] == pytest.approx(live_progress(signal, 41, skipped={5}), rel=1e-12)
    assert with_skip["loss"] != pytest.approx(decision_signals(fixed_run(tmp_path / "b", 41))["loss"])


def test_signals_the_run_did_not_measure_are_none_never_scored_on_fewer_points(tmp_path):
    plain = decision_signals(fixed_run(tmp_path / "a", 40, measure=False, probe_every=5))  # a fixed run's defaults
    assert plain["accuracy"] is None and plain["probe_nll"] is None and len(plain["loss"]) == 10
    # K = 8 asks a probe NLL every 2nd step; the run measured every 4th: not the controller's points
    sparse = decision_signals(fixed_run(tmp_path / "b", 64, controller={"hold": 8}, probe_every=4))
    assert sparse["probe_nll"] is None and sparse["accuracy"] is not None
    assert run_signals(str(tmp_path / "a"))["progress_accuracy"] is None


def test_heldout_accuracy_change_needs_evals_at_both_ends(tmp_path):
    run = fixed_run(tmp_path / "r", 12, heldout={0: 0.5, 4: 0.55, 8: 0.5, 12: 0.7})
    assert decision_signals(run)["heldout"] == pytest.approx([0.05, -0.05, 0.2])
    sparse = fixed_run(tmp_path / "s", 12, heldout={0: 0.5, 12: 0.7})  # eval only before and after
    assert decision_signals(sparse)["heldout"] == []
    assert run_signals(sparse)["progress_heldout"] is None
    assert run_signals(run)["progress_heldout"] == pytest.approx(0.2 / 3)
    assert set(run_signals(run)) == {f"progress_{k}" for k in KEYS}


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties get average ranks
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_alignment_per_signal_ranks_and_separation(tmp_path):
    # the probe accuracy and NLL improve fastest at alpha 0.5 (as the gain ranks them); the loss falls the same
    # way at every alpha (its level moves with alpha, which the controller's segment intercepts remove)
    gains, rate = {0.0: -0.1, 0.5: 0.3, 1.0: 0.1}, {0.0: 0.0, 0.5: 0.02, 1.0: 0.01}
    dirs = {a: [fixed_run(tmp_path / f"{a}-{s}", 48, alpha=a, seed=s, rate=rate[a]) for s in range(2)]
            for a in gains}
    dirs[0.5].append(fixed_run(tmp_path / "plain", 48, alpha=0.5, measure=False, probe_every=5))  # loss only
    al = alignment(dirs, gains)
    assert al["best_alpha"] == 0.5 and al["worst_alpha"] == 0.0
    for key in ("accuracy", "probe_nll"):
        assert al[key]["rho"] == pytest.approx(1.0) and al[key]["separation"] > 0.5
        assert al[key]["runs"] == 6
    assert al["loss"]["runs"] == 7 and al["loss"]["decisions"] == 7 * 12
    assert abs(al["loss"]["separation"]) < 0.2  # alpha-independent loss progress: nothing to tell the alphas apart
    assert al["accuracy"]["decisions"] == 6 * 11  # the last decision has one measurement: dropped, as live
    assert al["heldout"]["decisions"] == 0 and al["heldout"]["rho"] is None


def test_cli_audits_a_sweep_with_its_own_or_given_settings(tmp_path, capsys):
    gains, rate = {0.0: -0.1, 0.5: 0.3}, {0.0: 0.0, 0.5: 0.02}
    for a in gains:
        fixed_run(tmp_path / f"fixed_{a:g}-seed0", 40, alpha=a, rate=rate[a])
    rows = [{"alpha": a, "exposure": f"fixed:{a:g}", "seeds": [0], "gain": g} for a, g in gains.items()]
    runs = {f"fixed:{a:g}/seed0": {"run_dir": f"elsewhere/fixed_{a:g}-seed0"} for a in gains}  # as engine.sweep writes
    (tmp_path / "results.json").write_text(json.dumps({"fixed_exposure": rows, "runs": runs}))
    own = main([str(tmp_path)])
    assert "| accuracy | " in capsys.readouterr().out and own["accuracy"]["decisions"] == 2 * 9
    delta = main([str(tmp_path), "--set", "estimator=delta", "--set", "hold=8"])
    assert delta["loss"]["decisions"] == 2 * 5 and delta["loss"]["mean"] != own["loss"]["mean"]
    want = live_progress("accuracy", 40, {"estimator": "delta", "hold": 8}, rate=0.02)
    assert delta["accuracy"]["mean"][0.5] == pytest.approx(sum(want) / len(want))
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main([str(tmp_path), "--set", "bogus=1"])
