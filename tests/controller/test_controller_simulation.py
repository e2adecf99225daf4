"""The toy student of controller.simulate: the claims reported in docs/controller.md, at full size."""

import pytest

from atesd.controller.simulate import ToyStudent, main, simulate, summarize

SEEDS, STEPS = 5, 2000


@pytest.fixture(scope="module")
def rows():
    res = simulate(SEEDS, STEPS, ("adaptive", "adaptive-onestep", "full", "random"))
    return {r["policy"]: r for r in summarize(res)}


def test_simulator_has_delayed_competence_dependent_best_alpha():
    # the one-step loss change barely depends on whether alpha is good: the effect is delayed
    def loss_drop(alpha, steps):
        s = ToyStudent(noise=0.0, phi=0.0, kappa=0.0)
        first = s.step(alpha, 0, 100)["loss"]
        for t in range(1, steps):
            s.step(alpha, t, 100)
        return first - s.step(alpha, steps, 100)["loss"]

    star = ToyStudent().best_alpha()
    assert loss_drop(star, 1) < 0.2 * loss_drop(star, 12)
    # best alpha moves with competence; full exposure is worse than alpha* early
    s = ToyStudent()
    assert s.best_alpha() < 0.5 and ToyStudent(c0=0.8).best_alpha() > 0.75
    assert loss_drop(1.0, 24) < 0.5 * loss_drop(star, 24)


def test_adaptive_beats_full_and_random_on_every_seed(rows):
    a = rows["adaptive"]
    assert a["wins_vs_full"] == SEEDS and a["wins_vs_random"] == SEEDS
    assert a["progress"] > rows["full"]["progress"] and a["progress"] > rows["random"]["progress"]


def test_adaptive_late_alpha_close_to_best(rows):
    assert rows["adaptive"]["late_gap"] < 0.12


def test_one_step_ablation_is_worse_with_delayed_effect(rows):
    assert rows["adaptive-onestep"]["progress"] < rows["adaptive"]["progress"]
    assert rows["adaptive-onestep"]["late_gap"] > rows["adaptive"]["late_gap"]


def test_cli_prints_table_and_writes_png(tmp_path, capsys):
    out = tmp_path / "sim.png"
    main(["--seeds", "1", "--steps", "200", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| `adaptive` |" in text and "| `full` |" in text
    assert out.stat().st_size > 10_000
