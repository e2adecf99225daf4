"""The toy student of controller.simulate: the claims reported in docs/controller.md, at full size."""

import pytest

from atesd.controller.simulate import NOISE_RATIO, SCENARIOS, ToyStudent, main, simulate, student_for, summarize

SEEDS = 5


@pytest.fixture(scope="module")
def short():
    """The headline: 100 steps, both scenarios, the published noise level."""
    return {sc: {r["policy"]: r for r in summarize(simulate(SEEDS, 100, ("adaptive", "random", "full"), sc))}
            for sc in ("low", "high")}


def test_scenarios_have_a_delayed_effect_and_their_best_exposure():
    def loss_drop(scenario, alpha, steps):
        s = ToyStudent(**{**SCENARIOS[scenario], "noise": 0.0, "phi": 0.0, "kappa": 0.0})
        first = s.step(alpha, 0, 100)["loss"]
        for t in range(1, steps):
            s.step(alpha, t, 100)
        return first - s.step(alpha, steps, 100)["loss"]

    low, high = student_for("low", 0), student_for("high", 0)
    assert low.best_alpha() < 0.3 and high.best_alpha() > 0.85
    assert low.noise == pytest.approx(NOISE_RATIO * low.step_progress())
    # the first step sees little of a decision's effect: it lands over ~tau steps
    assert loss_drop("low", low.best_alpha(), 1) < loss_drop("low", low.best_alpha(), 8) / 8
    # full exposure is too strong for the weak student; answer-only too weak for the strong one
    assert loss_drop("low", 1.0, 30) < 0.5 * loss_drop("low", low.best_alpha(), 30)
    assert loss_drop("high", 0.0, 30) < 0.5 * loss_drop("high", high.best_alpha(), 30)


@pytest.mark.parametrize("scenario", ["low", "high"])
def test_100_steps_adaptive_moves_toward_the_best_and_beats_random(short, scenario):
    a, r = short[scenario]["adaptive"], short[scenario]["random"]
    prior = 0.5  # Beta(2, 2)
    assert abs(a["late_alpha"] - a["late_best"]) < abs(prior - a["late_best"]) - 0.1  # moved toward the best
    assert a["progress"] > r["progress"] and a["wins_vs_random"] >= 4


def test_2000_steps_moving_best_adaptive_beats_random_and_full():
    rows = {r["policy"]: r for r in summarize(simulate(SEEDS, 2000, ("adaptive", "random", "full"), "moving"),
                                              late=500)}
    a = rows["adaptive"]
    assert a["wins_vs_random"] == SEEDS and a["wins_vs_full"] == SEEDS
    assert a["late_gap"] < 0.2


def test_cli_prints_tables_and_writes_png(tmp_path, capsys):
    out = tmp_path / "sim.png"
    main(["--seeds", "1", "--steps", "60", "--out", str(out)])
    text = capsys.readouterr().out
    assert "scenario 'low'" in text and "scenario 'high'" in text and "| `adaptive` |" in text
    assert out.stat().st_size > 10_000
