"""engine.reward_audit: fixed-alpha runs scored exactly as the adaptive controller scores its decisions."""

import json
import math

import pytest
import yaml

from atesd.controller import BetaExposureController
from atesd.engine.reward_audit import alignment, decision_signals, run_signals, spearman


def _run(path, losses, accuracies=None, *, hold=4, lookahead=8, gamma=0.9, ema=0.9, skipped=()):
    path.mkdir(parents=True)
    cfg = {"controller_hold": hold, "controller_lookahead": lookahead, "controller_gamma": gamma, "controller_ema": ema}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": t + 1, "loss": x, "skipped_step": int(t in skipped)} for t, x in enumerate(losses)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if accuracies is not None:
        hist = [{"step": s, "accuracy": a} for s, a in accuracies.items()]
        (path / "eval_summary.json").write_text(json.dumps({"benchmarks": {"lab": {"history": hist}}}))
    return str(path)


def _losses(n):
    return [1.0 + 0.3 * math.sin(1.3 * t) - 0.01 * t for t in range(n)]


@pytest.mark.parametrize("n,hold,lookahead,gamma", [(30, 4, 8, 0.9), (23, 3, 7, 1.0), (9, 4, 8, 0.5)])
def test_progress_is_the_controllers_own(tmp_path, n, hold, lookahead, gamma):
    losses = _losses(n)
    run = _run(tmp_path / "r", losses, hold=hold, lookahead=lookahead, gamma=gamma)
    p = BetaExposureController(hold=hold, lookahead=lookahead, gamma=gamma, lambda_gt=0.0, seed=0)
    for t, x in enumerate(losses):
        p.exposure()
        p.observe({"loss": x, "mismatch": 0.1, "confidence": 0.5, "progress": t / n})
    p.finish()
    got = decision_signals(run)["progress"]
    assert got == pytest.approx([h["progress"] for h in sorted(p.history, key=lambda h: h["t0"])], rel=1e-12)
    assert len(got) == math.ceil((n - 1) / hold)  # the last decision needs one step after its first


def test_skipped_steps_are_not_observed(tmp_path):
    losses = _losses(20)
    with_skip = _run(tmp_path / "a", losses[:5] + [float("nan")] + losses[5:], skipped={5})
    assert decision_signals(with_skip)["progress"] == decision_signals(_run(tmp_path / "b", losses))["progress"]


def test_accuracy_progress_needs_evals_at_both_ends(tmp_path):
    run = _run(tmp_path / "r", _losses(12), {0: 0.5, 4: 0.55, 8: 0.5, 12: 0.7})
    assert decision_signals(run)["accuracy_progress"] == pytest.approx([0.05, -0.05, 0.2])
    sparse = _run(tmp_path / "s", _losses(12), {0: 0.5, 12: 0.7})  # eval only before and after
    assert decision_signals(sparse)["accuracy_progress"] == []
    assert run_signals(sparse)["accuracy_progress"] is None
    assert run_signals(run)["accuracy_progress"] == pytest.approx(0.2 / 3)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties get average ranks
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_alignment_ranks_and_separation(tmp_path):
    # accuracy rises fastest at alpha 0.5; the loss falls fastest at alpha 1 (a reward that ranks them wrongly)
    dirs, gains = {}, {0.0: -0.1, 0.5: 0.3, 1.0: 0.1}
    for a, g in gains.items():
        for seed in range(2):
            slope = {0.0: 0.0, 0.5: 0.01, 1.0: 0.03}[a]
            losses = [1.0 - slope * t + 0.02 * math.sin(3.1 * t + seed) for t in range(24)]
            acc = {s: 0.5 + g * s / 24 + 0.01 * ((s // 4 + seed) % 2) for s in range(0, 25, 4)}
            dirs.setdefault(a, []).append(_run(tmp_path / f"{a}-{seed}", losses, acc))
    al = alignment(dirs, gains)
    assert al["best_alpha"] == 0.5 and al["worst_alpha"] == 0.0
    assert al["accuracy_progress"]["rho"] == pytest.approx(1.0) and al["accuracy_progress"]["separation"] > 1
    assert al["progress"]["rho"] == pytest.approx(0.5)  # P ranks 1 > 0.5 > 0; the gain ranks 0.5 > 1 > 0
    assert al["progress"]["decisions"] == 2 * 3 * 6
