"""controller.simulate: the simulated students behave as documented, and small versions of the grid's claims."""

import math

import pytest

from atesd.controller import build
from atesd.controller.simulate import (
    HELD_BACK,
    HELD_BACK_2,
    LAB_LIKE,
    PURE_NOISE,
    STUDENTS,
    TRACKING,
    TUNING,
    Design,
    ExploreThenCommit,
    Student,
    best_fixed,
    bounds,
    grid,
    main,
    make_policy,
    noise_ok,
    run,
    wins,
)


def test_student_sizes_learning_to_the_budget_and_noise_to_the_progress():
    for steps in (50, 2000):
        s = Student(TUNING["low"], steps, noise=3.0)
        assert s.eta == pytest.approx(TUNING["low"].reach / steps)
        assert s.loss_sd == pytest.approx(3.0 * 1.5 * s.eta * (1 - TUNING["low"].c0))
    # the same alphas over a 5x longer budget tell the same story (competence per fraction of the run)
    short = run(build("fixed:0.2"), TUNING["low"], 100, 0, 0.0)
    long = run(build("fixed:0.2"), TUNING["low"], 500, 0, 0.0)
    assert short["final"] == pytest.approx(long["final"], rel=0.05)


@pytest.mark.parametrize("tau", [1, 8])
def test_gains_land_with_the_delay(tau):
    s = Student(Design(c0=0.3, a0=0.5, tau=tau), 100)
    s.step(0.5, 0)
    first = s.c - 0.3
    for t in range(1, 20):
        s.step(0.5, t)
    assert (first > 0.5 * (s.c - 0.3) / 20) if tau == 1 else (first < 0.3 * (s.c - 0.3) / 20)


def test_best_exposure_teaches_most_and_pure_noise_does_not_care():
    for name, d in {**TUNING, **HELD_BACK, **HELD_BACK_2}.items():
        s = Student(d, 300)
        star = s.best_alpha()
        assert all(s.usefulness(star) >= s.usefulness(a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)), name
    noise = Student(PURE_NOISE, 300)
    assert {noise.usefulness(a) for a in (0.0, 0.5, 1.0)} == {1.0} and PURE_NOISE.credit_alpha == 0.0
    rising = Student(TUNING["rising"], 300)
    before = rising.best_alpha()
    for t in range(300):
        rising.step(rising.best_alpha(), t)
    assert rising.best_alpha() > before + 0.3  # a moving best exposure


def test_noise_only_enters_what_the_policy_sees():
    a = run(build("fixed:0.4"), TUNING["wide"], 100, 0, 0.3)
    b = run(build("fixed:0.4"), TUNING["wide"], 100, 5, 30.0)
    assert a["skill"] == b["skill"] and a["final"] == b["final"]


def test_run_drives_the_policy_like_the_engine():
    """probe_nll after the update where the policy asks: the probe_nll signal scores decisions."""
    p = make_policy("adaptive?signal=probe_nll", 300, 0)
    run(p, TUNING["mid-slow"], 300, 0, 1.0)
    m = p.metrics()
    assert m["scored"] >= m["decisions"] - 2 and m["updates"] > 0
    q = make_policy("adaptive?signal=accuracy", 300, 0)
    run(q, TUNING["mid-slow"], 300, 0, 1.0)
    assert q.metrics()["scored"] >= q.metrics()["decisions"] - 2


def test_small_grid_adaptive_learns_where_the_signal_is_clear():
    """A slice of the docs' grid (mid-slow, 300 steps, noise 1x): adaptive beats random and full in most seeds,
    and moves toward the best exposure; the paper preset is run beside it."""
    cells = grid(["mid-slow", "low"], [300], [1.0], 5, ("adaptive", "paper", "random", "full", "best-fixed"))
    mid, low = cells
    assert wins(mid, "adaptive", "random")[0] >= 4 and wins(mid, "adaptive", "full")[0] == 5
    assert mid.best_alpha == pytest.approx(0.55) and low.best_alpha == pytest.approx(0.2)
    late = sum(r["late_alpha"] for r in low.runs["adaptive"]) / 5
    assert late < 0.5  # moved from the prior's 0.5 toward 0.2
    assert all(r["skill"] <= low.runs["best-fixed"][0]["skill"] + 1e-3 for r in low.runs["adaptive"])


def test_pure_noise_student_leaves_the_policy_broad():
    cells = grid(["pure-noise"], [300], [1.0, 30.0], 5, ("adaptive?signal=loss",))
    assert all(noise_ok(r) for c in cells for r in c.runs["adaptive?signal=loss"])
    # the default signal (probe accuracy, one measurement per decision) misses the target in one seed of ten here,
    # as measured in the grid (docs/controller.md: seed 2 ends with sd 0.10 at 1x, with mean 0.33 at 30x)
    for c in grid(["pure-noise"], [300], [1.0, 30.0], 10, ("adaptive",)):
        assert sum(map(noise_ok, c.runs["adaptive"])) >= 9


def test_cli_writes_tables_and_figure(tmp_path, capsys):
    out, md = tmp_path / "sim.png", tmp_path / "sim.md"
    main(["--seeds", "1", "--budgets", "50", "--noise", "1", "--students", "low,pure-noise", "--out", str(out),
          "--markdown", str(md)])
    captured = capsys.readouterr()
    text = captured.out
    assert "tuning students" in text and "pure-noise student" in text and "| low | 50 |" in text
    assert "simulate: 2/2 (pure-noise, 50 steps) in " in captured.err  # progress on stderr, tables on stdout
    assert md.read_text().strip() in text and out.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["--students", "nobody", "--out", ""])


def test_held_back_students_are_registered_apart():
    assert set(HELD_BACK).isdisjoint(TUNING) and len(HELD_BACK) >= 2
    assert not set(HELD_BACK_2) & (set(TUNING) | set(HELD_BACK)) and len(HELD_BACK_2) >= 2
    assert set(STUDENTS) == {*TUNING, *HELD_BACK, *HELD_BACK_2, "pure-noise", *TRACKING}
    assert set(LAB_LIKE) < set(TRACKING)
    assert all(math.isfinite(d.a0) for d in (*HELD_BACK.values(), *HELD_BACK_2.values()))


def test_explore_then_commit_holds_prior_draws_then_commits():
    p = ExploreThenCommit(explore=10, commit=0.2, hold=4, seed=3)
    seen = []
    for _ in range(16):
        seen.append(p.exposure())
        p.observe({})
    assert seen[0] == seen[3] != seen[4] == seen[7] != seen[8] == seen[9]  # one draw per K=4 steps
    assert all(0.0 < a < 1.0 for a in seen[:10]) and seen[10:] == [0.2] * 6
    assert seen[:10] != [ExploreThenCommit(10, 0.2, 4, seed=4).exposure()] * 10  # seeded


def test_oracle_loss_falls_by_the_usefulness_of_each_exposure_at_once():
    d = TUNING["mid-slow"]  # delay 8: the real loss barely moves in the first steps
    s = Student(d, 100, noise=0.0, oracle=True)
    alphas = [0.55, 0.0, 1.0, 0.55]
    losses = [s.step(a, t)["loss"] for t, a in enumerate(alphas)]
    for t in range(3):
        assert losses[t] - losses[t + 1] == pytest.approx(s.mu * s.usefulness(alphas[t]))
    assert losses[0] - losses[1] > losses[1] - losses[2]  # the best exposure teaches most, without delay
    plain = Student(d, 100, noise=0.0)
    same = Student(d, 100, noise=0.0, oracle=True)
    for t, a in enumerate(alphas):  # only the reported loss differs: learning is the same
        plain.step(a, t)
        same.step(a, t)
    assert plain.c == same.c


def test_bounds_tables():
    text = bounds(["low", "pure-noise"], [50], [1.0], 3, explore=(0.0, 1.0))
    assert "pure-noise" not in text and "(low; 3 seeds)" in text
    rows = [line for line in text.splitlines() if line.startswith("| 50 |")]
    assert len(rows) == 2
    cells = rows[0].strip("| ").split(" | ")
    assert cells[1] == "4 (13)"
    assert best_fixed(TUNING["low"], 50)[0] == pytest.approx(0.2)
    assert cells[2:4] == ["1/1", "3/3"]  # committing to the best from the first step beats random and full
    assert len(rows[1].split(" | ")) == 2 + 6


def test_cli_bounds(tmp_path, capsys):
    md = tmp_path / "bounds.md"
    main(["--bounds", "--seeds", "1", "--budgets", "50", "--noise", "1", "--students", "low", "--markdown", str(md)])
    text = capsys.readouterr().out
    assert "bound 1" in text and "bound 2" in text and md.read_text().strip() in text


def test_the_lab_like_student_learns_fast_to_a_level_its_exposure_sets_whatever_the_budget():
    d = LAB_LIKE["lab-like"]
    final = {a: run(build(f"fixed:{a}"), d, 60, 0, 0.0)["final"] + d.c0 for a in (0.0, 0.25, 0.5, 0.75, 1.0)}
    # the lab's shape (val, 60 steps: 0.40 / 0.55 / 0.80 / 0.75 / 0.69): interior best, low exposure worst
    assert final[0.5] > final[0.75] > final[1.0] > final[0.25] > final[0.0]
    for steps in (60, 240):  # not sized to the budget: most of the gain within the first 15 steps
        s = Student(d, steps)
        assert s.eta == d.track
        for t in range(15):
            s.step(0.5, t)
        assert s.c - d.c0 > 0.75 * (final[0.5] - d.c0)
    s = Student(d, 100)  # it tracks: a worse exposure lowers the level it reached
    for t in range(40):
        s.step(0.5, t)
    high = s.c
    for t in range(40, 80):
        s.step(0.25, t)
    assert s.c < high - 0.2
    assert Student(d, 60, noise=2.0).acc_sd == pytest.approx(2.0 * d.track * (d.top - d.c0))


def test_the_docs_grid_leaves_the_lab_like_student_out(capsys):
    main(["--students", "all", "--budgets", "50", "--noise", "1", "--seeds", "1", "--methods",
          "adaptive,random,full", "--out", ""])
    text = capsys.readouterr().out
    assert "| low | 50 |" in text and not any(name in text for name in TRACKING)
    main(["--students", "lab-like", "--budgets", "60", "--noise", "1", "--seeds", "2", "--methods",
          "adaptive,random,full", "--out", ""])
    assert "| lab-like | 60 |" in capsys.readouterr().out


def test_exploit_end_mean_on_tracking_students_bets_on_the_policys_mean():
    """docs/controller.md, "Exploit at the end": at 60 steps the policy is still near Beta(2, 2), so the last
    decisions' mean is ~0.5: it lifts a tracking student whose best exposure is near 0.5 (lab-like, 0.55) and
    lowers one whose best is far from it (track-high, 0.9), against the same controller drawing to the end."""
    assert best_fixed(TRACKING["track-low"], 60)[0] == pytest.approx(0.15, abs=0.06)
    assert best_fixed(TRACKING["track-high"], 60)[0] == pytest.approx(0.9, abs=0.06)

    def final(name, spec):
        return sum(run(make_policy(spec, 60, sd), TRACKING[name], 60, sd, 1.0)["final"] for sd in range(4)) / 4

    for name, sign in (("lab-like", 1), ("track-high", -1)):
        gain = final(name, "adaptive?exploit_end=mean") - final(name, "adaptive")
        assert sign * gain > 0.03, (name, gain)


def test_exploit_end_fit_follows_the_runs_evidence_where_mean_bets_on_the_prior():
    """docs/controller.md, "Exploit at the end by the run's own evidence": on track-high (best 0.9) with a clean
    signal, fit ends the run near the best exposure (its fitted curve passes the gate) where mean parks it at ~0.5."""
    d = TRACKING["track-high"]

    def final(spec, steps):
        return sum(run(make_policy(spec, steps, sd), d, steps, sd, 1.0)["final"] for sd in range(4)) / 4

    off, mean, fit = (final(f"adaptive?exploit_end={e}", 240) for e in ("off", "mean", "fit"))
    assert fit > off + 0.05 and fit > mean + 0.1, (off, mean, fit)
