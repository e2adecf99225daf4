"""Simulated students with a delayed, competence-dependent response to exposure, to test exposure policies at
every run length.

    python -m controller.simulate                        # the grid of docs/controller.md (minutes)
    python -m controller.simulate --budgets 100 --seeds 3 --noise 1 --students low,high   # a quick look
    python -m controller.simulate --out docs/controller_sim.png --markdown docs-tables.md  # the docs' figure
    python -m controller.simulate --bounds --noise 0.3,1,10                              # what any learner could reach

A student has a hidden competence c in [0, 1] (starts at c0), an unrealised-knowledge buffer q and a superficial
fit h. Its best exposure alpha*(c) = clip(a0 + a1 c) is fixed (a1 = 0) or moves as it learns. One student step
under exposure alpha:

    u  = floor + (1 - floor) exp(-(alpha - alpha*)^2 / (2 w^2)),  w = w_lo below alpha*, w_hi above
    q += eta (1 - c) u;  c += q / tau;  q -= q / tau        # gains land with a delay of ~tau steps
    h  = rho h - phi (1 - alpha)                            # low exposure: a quick superficial loss drop

Every exposure teaches something (`floor` of the best); exposure far above alpha* is "too strong to absorb". The
student's learning rate eta = reach / T is sized to the run's budget T, so every budget tells the same story (at
the best exposure the student closes 1 - e^-reach of its headroom). Observed, before the step's update:

    loss = 0.2 + 1.5 (1 - c) + kappa alpha + h + noise      (kappa alpha: mismatch grows with exposure)
    mismatch = 0.1 + 0.6 alpha (1 - 0.5 c), confidence = 0.4 + 0.5 c, credit = -1.2 + credit_alpha alpha + 0.3 c
    probe_nll = 0.3 + 2 (1 - c) + noise (after the update, where the policy asks and every `probe_every` steps)
    probe_accuracy = c + noise (before the update, where the policy asks)

The noise of each signal is `noise` x its expected change per step at the best exposure at the start: the ratio
that decides whether a reward can see anything (docs/controller.md compares it with the lab's 18-26). A *pure
noise* student learns the same whatever alpha (u = 1, no superficial term, credit independent of alpha): its
reward carries no information and a sound policy must stay broad.

Methods: `adaptive` (the controller's defaults, told the budget), `paper` (`--controller-preset paper`),
`random` (uniform, held for the default K), `full` (alpha = 1) and `best-fixed` (the best constant alpha on a
0.05 grid, chosen in hindsight per student and budget: not a policy, a ceiling for constant exposure). The score
is the cumulative skill, the mean over the run of c_t - c_0 (the area under the learning curve). Learning is
deterministic given the alphas: noise only enters what the policy observes, so `full` and `best-fixed` do not
vary with the seed and `random` varies with its own seed only.

Bounds (``--bounds``): explore-then-commit (the prior for a share of the run, then the best fixed alpha known in
hindsight: the score of a learner that identified the best exposure that early) and the default update fed an
oracle loss that falls by the usefulness of each exposure at once (no delay, lure or mismatch; the same noise).

Students: TUNING (designed first, the defaults were chosen on them), HELD_BACK (written after the defaults were
fixed, never tuned on; docs/controller.md reports them as they came) and HELD_BACK_2 (written before the change to
several accuracy measurements per decision was judged on any of them). TRACKING: LAB_LIKE and two variants of it
with their best exposure far from 0.5 (none in the docs' grid, ``all``). LAB_LIKE is a *tracking* student
written after measuring the lab: with ``track`` > 0 its rate is that constant, not sized
to the budget, and it moves toward the level its exposure supports, up or down,
``q += track (c0 + (top - c0) u - c)`` in place of the line above.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace

import torch

from atesd.controller import build
from atesd.controller.base import ExposurePolicy
from atesd.controller.presets import resolve

BUDGETS = (50, 100, 300, 1200, 2000)
NOISE = (0.3, 1.0, 3.0, 10.0, 30.0)
METHODS = ("adaptive", "paper", "random", "full", "best-fixed")
FIXED_GRID = tuple(i / 20 for i in range(21))


@dataclass(frozen=True)
class Design:
    """A simulated student (module docstring). phi is in units of the per-step loss progress at the start."""

    c0: float
    a0: float
    a1: float = 0.0
    w_lo: float = 0.2
    w_hi: float = 0.2
    floor: float = 0.2
    tau: float = 3.0
    reach: float = 1.5
    rho: float = 0.6
    phi: float = 1.0
    kappa: float = 0.5
    credit_alpha: float = 0.05
    credit_noise: float = 0.05
    informative: bool = True  # False: the pure-noise student
    track: float = 0.0  # > 0: a tracking student (module docstring): this rate per step, whatever the budget
    top: float = 1.0  # a tracking student's level at its best exposure
    note: str = ""


TUNING: dict[str, Design] = {
    "low": Design(c0=0.2, a0=0.2, w_lo=0.15, w_hi=0.3, floor=0.3, tau=2, note="weak student, best 0.2"),
    "high": Design(c0=0.5, a0=0.85, w_lo=0.3, w_hi=0.15, floor=0.3, tau=3, note="strong student, best 0.85"),
    "mid-slow": Design(c0=0.3, a0=0.55, w_lo=0.2, w_hi=0.2, floor=0.2, tau=8, note="best 0.55, delay 8"),
    "rising": Design(c0=0.1, a0=0.1, a1=1.0, w_lo=0.15, w_hi=0.2, floor=0.15, tau=4,
                     note="best 0.2 rising with competence to ~0.8"),
    "wide": Design(c0=0.3, a0=0.35, w_lo=0.4, w_hi=0.4, floor=0.4, tau=1, note="best 0.35, broad, no delay"),
}
# Written after the defaults were fixed (commit 6c67664) and never tuned on. The window update changed once more
# after that (b1910a3: the regression estimate of the natural gradient), before any held-back result was seen
# beyond a 60-step, 2-seed smoke run in which every method still sat at its prior.
HELD_BACK: dict[str, Design] = {
    "falling": Design(c0=0.2, a0=0.9, a1=-0.8, w_lo=0.2, w_hi=0.2, floor=0.2, tau=5,
                      note="best 0.74 falling with competence to ~0.35"),
    "sharp": Design(c0=0.4, a0=0.7, w_lo=0.1, w_hi=0.1, floor=0.1, tau=8, phi=2.0,
                    note="best 0.7, narrow, delay 8, strong low-exposure lure"),
    "edge-low": Design(c0=0.15, a0=0.05, w_lo=0.2, w_hi=0.25, floor=0.25, tau=6,
                       note="best 0.05 (answer only), delay 6"),
}
# A second held-back set, written (2026-12-04, before any run on them) ahead of the change it judges: accuracy
# measured several times per decision on long runs (`probe_points`), chosen on the TUNING students only.
HELD_BACK_2: dict[str, Design] = {
    "mid-lure": Design(c0=0.3, a0=0.45, w_lo=0.15, w_hi=0.15, floor=0.2, tau=3, phi=3.0,
                       note="best 0.45, a strong low-exposure lure"),
    "high-rising": Design(c0=0.3, a0=0.5, a1=0.5, w_lo=0.2, w_hi=0.2, floor=0.25, tau=2,
                          note="best 0.65 rising with competence toward full exposure"),
    "flat-low": Design(c0=0.25, a0=0.15, w_lo=0.3, w_hi=0.35, floor=0.5, tau=4,
                       note="best 0.15, a weak preference (little to gain from adapting)"),
}
# Written 2026-12-05 after measuring the lab (docs/controller.md, "Why"), to reproduce it, not to tune on: learning
# front-loaded (a fixed rate, not sized to the budget: most of it within ~12 steps) toward a level that depends on
# the exposure (the lab's fixed alphas plateau at 0.55 / 0.80 / 0.75 / 0.69 for 0.25 / 0.5 / 0.75 / 1).
LAB_LIKE: dict[str, Design] = {
    "lab-like": Design(c0=0.45, a0=0.55, w_lo=0.15, w_hi=0.35, floor=0.2, tau=1, track=0.1, top=0.9,
                       note="tracking: fast to an alpha-dependent level, best 0.55 (the lab's shape)"),
}
# Written 2026-12-05 to judge exploit_end beyond the lab's shape (docs/controller.md, "Exploit at the end"): the
# lab-like student with its best exposure far from the prior's mean, 0.5, below and above.
TRACKING: dict[str, Design] = {
    **LAB_LIKE,
    "track-low": replace(LAB_LIKE["lab-like"], a0=0.15, note="tracking like lab-like, best 0.15"),
    "track-high": replace(LAB_LIKE["lab-like"], a0=0.9, note="tracking like lab-like, best 0.9"),
}
PURE_NOISE = Design(c0=0.3, a0=0.5, floor=1.0, phi=0.0, credit_alpha=0.0, tau=3, informative=False,
                    note="learns the same whatever alpha")
STUDENTS: dict[str, Design] = {**TUNING, **HELD_BACK, **HELD_BACK_2, "pure-noise": PURE_NOISE, **TRACKING}


@dataclass
class Student:
    design: Design
    steps: int
    noise: float = 1.0  # x the per-step change of each signal at the best exposure at the start
    seed: int = 0
    probe_every: int = 5
    oracle: bool = False  # report an oracle loss (below) instead of the student's: for `bounds` only
    c: float = field(init=False)
    q: float = field(init=False, default=0.0)
    h: float = field(init=False, default=0.0)
    taught: float = field(init=False, default=0.0)  # sum of the usefulness of the exposures so far

    def __post_init__(self) -> None:
        d = self.design
        self.c = d.c0
        self.eta = d.track or d.reach / self.steps
        headroom = (d.top if d.track else 1.0) - d.c0
        self.mu = 1.5 * self.eta * headroom  # expected loss decrease per step at the best exposure, at the start
        self.loss_sd = self.noise * self.mu
        self.nll_sd = self.noise * 2.0 * self.eta * headroom
        self.acc_sd = self.noise * self.eta * headroom
        self.phi = d.phi * self.mu
        self._rng = random.Random(7919 * self.seed + 17)

    def best_alpha(self) -> float:
        d = self.design
        return min(1.0, max(0.0, d.a0 + d.a1 * self.c))

    def usefulness(self, alpha: float) -> float:
        d = self.design
        if not d.informative:
            return 1.0
        star = self.best_alpha()
        w = d.w_lo if alpha < star else d.w_hi
        return d.floor + (1 - d.floor) * math.exp(-((alpha - star) ** 2) / (2 * w * w))

    def accuracy(self) -> float:
        return self.c + self._rng.gauss(0.0, self.acc_sd)

    def probe_nll(self) -> float:
        return 0.3 + 2.0 * (1 - self.c) + self._rng.gauss(0.0, self.nll_sd)

    def step(self, alpha: float, t: int) -> dict[str, float]:
        """One student step under ``alpha`` (t: 0-based); the stats the engine would report for it."""
        d, g = self.design, self._rng.gauss
        stats = {
            "loss": 0.2 + 1.5 * (1 - self.c) + d.kappa * alpha + self.h + g(0.0, self.loss_sd),
            "mismatch": 0.1 + 0.6 * alpha * (1 - 0.5 * self.c) + g(0.0, 0.01),
            "confidence": 0.4 + 0.5 * self.c + g(0.0, 0.01),
            "credit": -1.2 + d.credit_alpha * alpha + 0.3 * self.c + g(0.0, d.credit_noise),
            "progress": (t + 1) / self.steps,
        }
        if self.oracle:  # falls by mu x the usefulness of each exposure at once: no delay, lure or mismatch
            stats["loss"] = 1.0 - self.mu * self.taught + g(0.0, self.loss_sd)
        self.taught += self.usefulness(alpha)
        if d.track:  # toward the level this exposure supports, from above or below
            self.q += self.eta * (d.c0 + (d.top - d.c0) * self.usefulness(alpha) - self.c)
        else:
            self.q += self.eta * (1 - self.c) * self.usefulness(alpha)
        self.c = min(1.0, max(0.0, self.c + self.q / d.tau))
        self.q -= self.q / d.tau
        self.h = d.rho * self.h - self.phi * (1 - alpha)
        return stats


def make_policy(method: str, steps: int, seed: int) -> ExposurePolicy:
    """A METHODS entry (or a `build` spec, optionally with settings: 'adaptive?hold=8,lr=0.1') for a run of
    ``steps``; 'best-fixed' is resolved by the caller."""
    if method == "paper":
        return build("adaptive", seed=seed, total_steps=steps, preset="paper")
    spec, _, over = method.partition("?")
    kw: dict = {}
    for item in filter(None, over.replace("&", ",").split(",")):  # '&' separates settings in a --methods list
        k, v = item.split("=")
        ints = ("hold", "lookahead", "update_batch", "hidden", "decisions", "probe_points")
        kw[k] = v if k in ("optimizer", "signal", "baseline", "estimator", "preset", "exploit_end") else (
            v == "true" if k in ("snr_gate", "detrend") else int(v) if k in ints else float(v))
    if spec in ("adaptive", "adaptive-onestep", "random"):
        kw.setdefault("total_steps", steps)
    return build(spec, seed=seed, **kw)


def run(policy: ExposurePolicy, design: Design, steps: int, seed: int, noise: float, oracle: bool = False) -> dict:
    """Train one student for ``steps`` under ``policy``, driven as engine.train drives it (probe accuracy before a
    step when asked, probe NLL after its update when asked and every probe_every steps). ``oracle``: the reported
    loss is the oracle one (``Student.oracle``)."""
    s = Student(design, steps, noise, seed, oracle=oracle)
    alphas, best, skill = [], [], 0.0
    for t in range(steps):
        before = {"probe_accuracy": s.accuracy()} if policy.wants("probe_accuracy") else {}
        a = policy.exposure()
        alphas.append(a)
        best.append(s.best_alpha())
        stats = {**s.step(a, t), **before}
        skill += s.c - design.c0
        if policy.wants("probe_nll") or (t + 1) % s.probe_every == 0:
            stats["probe_nll"] = s.probe_nll()
        policy.observe(stats)
    policy.finish()
    out = {"skill": skill / steps, "final": s.c - design.c0, "alphas": alphas, "best": best}
    if hasattr(policy, "current_beta"):
        a, b = policy.current_beta()
        out["final_mean"], out["final_sd"] = a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    return out


def best_fixed(design: Design, steps: int) -> tuple[float, float]:
    """(alpha, cumulative skill) of the best constant exposure on FIXED_GRID (deterministic: noise-free)."""
    scores = {a: run(build(f"fixed:{a}"), design, steps, 0, 0.0)["skill"] for a in FIXED_GRID}
    a = max(scores, key=scores.get)
    return a, scores[a]


@dataclass
class Cell:
    """One (student, budget, noise) cell: per method, the per-seed runs."""

    student: str
    steps: int
    noise: float
    runs: dict[str, list[dict]]
    best_alpha: float


def grid(students: list[str], budgets: list[int], noises: list[float], seeds: int,
         methods: tuple[str, ...] = METHODS, keep_curves: bool = False, progress=None) -> list[Cell]:
    """Every method on every (student, budget, noise) over ``seeds`` seeds (torch on one thread: the policy's
    tensors are tiny). Noise-independent methods (random, full, best-fixed) are run once per budget and shared.
    ``progress(done, total, what)``, when given, is called after each (student, budget)."""
    nt = torch.get_num_threads()
    torch.set_num_threads(1)
    cells: list[Cell] = []
    try:
        for name in students:
            design = STUDENTS[name]
            for steps in budgets:
                shared: dict[str, list[dict]] = {}
                ba, bs = best_fixed(design, steps) if "best-fixed" in methods else (math.nan, math.nan)
                if "best-fixed" in methods:
                    r = run(build(f"fixed:{ba}"), design, steps, 0, 0.0)
                    shared["best-fixed"] = [r] * seeds
                if "full" in methods:
                    shared["full"] = [run(build("full"), design, steps, 0, 0.0)] * seeds
                if "random" in methods:
                    shared["random"] = [run(make_policy("random", steps, sd), design, steps, sd, 1.0)
                                        for sd in range(seeds)]
                for noise in noises:
                    runs = dict(shared)
                    for m in methods:
                        if m not in shared:
                            runs[m] = [run(make_policy(m, steps, sd), design, steps, sd, noise) for sd in range(seeds)]
                    if not keep_curves:
                        runs = {m: [{k: v for k, v in r.items() if k not in ("alphas", "best")} | {
                            "late_alpha": _mean(r["alphas"][-max(1, steps // 4):])} for r in rs]
                            for m, rs in runs.items()}
                    cells.append(Cell(name, steps, noise, runs, ba))
                if progress is not None:
                    progress(len(cells) // len(noises), len(students) * len(budgets), f"{name}, {steps} steps")
    finally:
        torch.set_num_threads(nt)
    return cells


def _mean(x: list[float]) -> float:
    return sum(x) / len(x) if x else math.nan


def wins(cell: Cell, method: str, ref: str) -> tuple[int, int]:
    """(seeds where `method`'s cumulative skill beats `ref`'s, paired by seed; seeds)."""
    a, b = cell.runs[method], cell.runs[ref]
    return sum(x["skill"] > y["skill"] for x, y in zip(a, b)), len(a)


# ---- bounds: what any learner of these students could reach ---------------------------------------------
EXPLORE = (0.25, 0.5, 0.75)  # shares of the run the explore-then-commit bound spends at the prior


class ExploreThenCommit(ExposurePolicy):
    """A bound, not a policy: the adaptive controller's prior (Beta(2, 2), one draw held ``hold`` steps) for the
    first ``explore`` steps, then ``commit`` (the best fixed alpha, known in hindsight) to the end: what a learner
    that had identified the best exposure after ``explore`` steps, and then committed to it, would score."""

    def __init__(self, explore: int, commit: float, hold: int, seed: int = 0) -> None:
        self.explore, self.commit, self.hold = int(explore), float(commit), int(hold)
        self._rng = random.Random(10_007 + seed)
        self._t, self._alpha = 0, None

    def exposure(self) -> float:
        if self._t >= self.explore:
            return self.commit
        if self._alpha is None:
            self._alpha = self._rng.betavariate(2.0, 2.0)
        return self._alpha

    def observe(self, stats) -> None:
        self._t += 1
        if self._t % self.hold == 0:
            self._alpha = None


def _oracle_methods(steps: int) -> dict[str, tuple]:
    """name -> (policy factory of the seed, whether the student reports the oracle loss). The oracle loss is
    scored with the loss signal and a lookahead of K + 1 (its segment intercepts leave K same-alpha steps)."""
    k = resolve(None, steps)["hold"]
    return {
        "defaults, their own signal": (lambda sd: make_policy("adaptive", steps, sd), False),
        "defaults, oracle loss": (lambda sd: build("adaptive", seed=sd, total_steps=steps, signal="loss",
                                                   lookahead=k + 1), True),
        "no gate, oracle loss": (lambda sd: build("adaptive", seed=sd, total_steps=steps, signal="loss",
                                                  lookahead=k + 1, snr_gate=False), True),
    }


def _tally(acc: list[int], skills: list[float], rnd: list[float], full: float) -> None:
    """acc += (1 if the seeds beat random and full in at least 80% of seeds, seeds beating random)."""
    r = sum(a > b for a, b in zip(skills, rnd))
    f = sum(a > full for a in skills)
    acc[0] += min(r, f) >= 0.8 * len(skills)
    acc[1] += r


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def bounds(students: list[str], budgets: list[int], noises: list[float], seeds: int,
           explore: tuple[float, ...] = EXPLORE, progress=None) -> str:
    """Markdown: two bounds on the target (beating random and full in 80% of seeds), per budget, pooled over the
    learning ``students``: (1) explore-then-commit to the hindsight-best alpha after each share of the run in
    ``explore`` (no noise enters); (2) per noise level, the default update fed an oracle reward (the loss falls by
    the usefulness of each exposure at once: no delay, lure or mismatch, the same noise), with and without its
    gate, beside the defaults on the student's own signals. ``progress(done, total, what)``: as for :func:`grid`."""
    learners = [n for n in students if STUDENTS[n].informative]
    oracle_names = list(_oracle_methods(max(budgets)))
    head1 = ["T", "K (decisions)"] + [f"commit after {f:.0%}: {x}" for f in explore
                                      for x in ("students at target", "seeds > random")]
    head2 = ["T", "noise"] + [f"{m}: {x}" for m in oracle_names for x in ("students at target", "seeds > random")]
    rows1, rows2 = [], []
    n, total = len(learners), len(learners) * seeds
    nt = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for steps in budgets:
            k = resolve(None, steps)["hold"]
            commit = {f: [0, 0] for f in explore}
            oracle = {(m, x): [0, 0] for m in oracle_names for x in noises}
            for name in learners:
                d = STUDENTS[name]
                best, _ = best_fixed(d, steps)
                full = run(build("full"), d, steps, 0, 0.0)["skill"]
                rnd = [run(make_policy("random", steps, sd), d, steps, sd, 1.0)["skill"] for sd in range(seeds)]
                for share in explore:
                    _tally(commit[share], [run(ExploreThenCommit(round(share * steps), best, k, sd), d, steps, sd,
                                               1.0)["skill"] for sd in range(seeds)], rnd, full)
                for x in noises:
                    for m, (make, use_oracle) in _oracle_methods(steps).items():
                        _tally(oracle[m, x], [run(make(sd), d, steps, sd, x, oracle=use_oracle)["skill"]
                                              for sd in range(seeds)], rnd, full)
                if progress is not None:
                    done = budgets.index(steps) * len(learners) + learners.index(name) + 1
                    progress(done, len(budgets) * len(learners), f"{name}, {steps} steps")
            rows1.append([str(steps), f"{k} ({math.ceil(steps / k)})"] + [
                v for f in explore for v in (f"{commit[f][0]}/{n}", f"{commit[f][1]}/{total}")])
            rows2 += [[str(steps), f"{x:g}"] + [v for m in oracle_names for v in (
                f"{oracle[m, x][0]}/{n}", f"{oracle[m, x][1]}/{total}")] for x in noises]
    finally:
        torch.set_num_threads(nt)
    return "\n".join([
        f"### bound 1: explore at the prior, then commit to the best fixed alpha ({', '.join(learners)}; "
        f"{seeds} seeds)", "", _md_table(head1, rows1), "",
        "### bound 2: the default update fed an oracle reward", "", _md_table(head2, rows2)])


class _Progress:
    """One stderr line per finished (student, budget) with the elapsed time and a linear estimate of the rest."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int, what: str) -> None:
        spent = time.perf_counter() - self.t0
        left = spent / done * (total - done)
        print(f"simulate: {done}/{total} ({what}) in {spent:.0f} s, ~{left:.0f} s left", file=sys.stderr,
              flush=True)


def _parse_list(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Exposure policies on simulated students, at several budgets and noise "
                                             "levels (docs/controller.md).")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma list of run lengths (steps)")
    ap.add_argument("--steps", type=int, default=None, help="one budget (overrides --budgets)")
    ap.add_argument("--noise", default=",".join(f"{x:g}" for x in NOISE),
                    help="comma list of noise levels, x the per-step progress at the best exposure")
    ap.add_argument("--students", default="all",
                    help=f"comma list of {', '.join(STUDENTS)}; or all (the docs' grid: all but the tracking "
                         "students), tuning, held-back, held-back-2, lab-like, tracking")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma list of methods (adaptive, paper, random, full, best-fixed) or build specs with "
                         "settings, e.g. 'adaptive?decisions=32' ('&' between two settings)")
    ap.add_argument("--out", default="runs/controller_sim.png",
                    help="PNG path ('' to skip the figure); the docs' figure, docs/controller_sim.png, only when named")
    ap.add_argument("--markdown", default="", help="also write the tables to this file")
    ap.add_argument("--bounds", action="store_true",
                    help="instead of the grid: the two bounds on the target (explore-then-commit with the hindsight-"
                         "best alpha; the default update fed an oracle reward, at each --noise), --methods ignored")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    budgets = [args.steps] if args.steps else _parse_list(args.budgets, int)
    noises = _parse_list(args.noise, float)
    groups = {"all": [s for s in STUDENTS if s not in TRACKING], "tuning": list(TUNING), "held-back": list(HELD_BACK),
              "held-back-2": list(HELD_BACK_2), "lab-like": list(LAB_LIKE), "tracking": list(TRACKING)}
    students = groups.get(args.students) or _parse_list(args.students, str)
    unknown = [s for s in students if s not in STUDENTS]
    if unknown:
        ap.error(f"unknown student(s) {unknown}; choose from {', '.join(STUDENTS)}")
    methods = tuple(_parse_list(args.methods, str))
    t = time.perf_counter()
    if args.bounds:
        text = bounds(students, budgets, noises, args.seeds, progress=_Progress())
        text += f"\n\n{args.seeds} seeds, {time.perf_counter() - t:.0f} s\n"
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(text)
        return
    cells = grid(students, budgets, noises, args.seeds, methods, progress=_Progress())
    text = report(cells, [m for m in methods if m not in ("random", "full", "best-fixed")])
    text += f"\n\n{len(cells)} cells, {args.seeds} seeds, {time.perf_counter() - t:.0f} s\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        plot(cells, args.out)
        print(f"wrote {args.out}")


# ---- the tables --------------------------------------------------------------------------------------------
def target_met(cells: list[Cell], method: str) -> bool:
    """Both win rates (vs random and vs full) at least 80% in every one of ``cells``."""
    return all(min(wins(c, method, "random")[0], wins(c, method, "full")[0]) >= 0.8 * len(c.runs[method])
               for c in cells)


def noise_ok(run: dict) -> bool:
    """The pure-noise target for one run: final policy mean within 0.15 of 0.5 and sd above 0.15."""
    return abs(run["final_mean"] - 0.5) <= 0.15 and run["final_sd"] > 0.15


def summary_table(cells: list[Cell], methods: list[str]) -> str:
    """Per (budget, noise), pooled over the cells' students and seeds: seeds beating random, beating full, and
    the students whose cell meets the target (both at least 80% of seeds)."""
    keys = sorted({(c.steps, c.noise) for c in cells})
    head = ["T", "noise"] + [f"{m}: {x}" for m in methods for x in ("> random", "> full", "students at target")]
    rows: list[list[str]] = []
    for steps, noise in keys:
        cs = [c for c in cells if (c.steps, c.noise) == (steps, noise)]
        row = [str(steps), f"{noise:g}"]
        for m in methods:
            n = sum(len(c.runs[m]) for c in cs)
            row += [f"{sum(wins(c, m, 'random')[0] for c in cs)}/{n}", f"{sum(wins(c, m, 'full')[0] for c in cs)}/{n}",
                    f"{sum(target_met([c], m) for c in cs)}/{len(cs)}"]
        rows.append(row)
    return _md_table(head, rows)


def student_table(cells: list[Cell], method: str) -> str:
    """Per student and budget, one column per noise level: seeds beating random, seeds beating full (r, f)."""
    noises = sorted({c.noise for c in cells})
    head = ["student", "T", "best fixed alpha"] + [f"noise {x:g}" for x in noises]
    rows: list[list[str]] = []
    for name in dict.fromkeys(c.student for c in cells):
        for steps in sorted({c.steps for c in cells if c.student == name}):
            cs = {c.noise: c for c in cells if c.student == name and c.steps == steps}
            row = [name, str(steps), f"{next(iter(cs.values())).best_alpha:.2f}"]
            for x in noises:
                r, n = wins(cs[x], method, "random")
                f, _ = wins(cs[x], method, "full")
                row.append(f"{r}, {f}" + ("" if min(r, f) >= 0.8 * n else " ✗"))
            rows.append(row)
    return _md_table(head, rows)


def skill_table(cells: list[Cell], methods: list[str], noise: float) -> str:
    """Mean cumulative skill per student and budget at one noise level, every method side by side."""
    cols = [m for m in (*methods, "random", "full", "best-fixed") if m in cells[0].runs]
    head = ["student", "T"] + cols + ["adaptive alpha, last quarter", "best alpha (hindsight, fixed)"]
    rows: list[list[str]] = []
    for c in cells:
        if c.noise != noise:
            continue
        row = [c.student, str(c.steps)] + [f"{_mean([r['skill'] for r in c.runs[m]]):.4f}" for m in cols]
        la = [r["late_alpha"] for r in c.runs[methods[0]]]
        row += [f"{_mean(la):.2f} ± {_sd(la):.2f}", f"{c.best_alpha:.2f}"]
        rows.append(row)
    return _md_table(head, rows)


def noise_table(cells: list[Cell], methods: list[str]) -> str:
    """Pure-noise student: the final policy (at the state of a next decision) per budget and noise level."""
    head = ["T", "noise"] + [f"{m}: {x}" for m in methods for x in ("final mean (min-max)", "final sd (min)",
                                                                  "seeds at target")]
    rows: list[list[str]] = []
    for c in cells:
        row = [str(c.steps), f"{c.noise:g}"]
        for m in methods:
            fm, fs = [r["final_mean"] for r in c.runs[m]], [r["final_sd"] for r in c.runs[m]]
            row += [f"{_mean(fm):.2f} ({min(fm):.2f}-{max(fm):.2f})", f"{_mean(fs):.2f} ({min(fs):.2f})",
                    f"{sum(noise_ok(r) for r in c.runs[m])}/{len(fm)}"]
        rows.append(row)
    return _md_table(head, rows)


def report(cells: list[Cell], methods: list[str]) -> str:
    """Markdown: summary per group of students, per-student win table of the first method, skills, pure noise."""
    parts = []
    noisy = [c for c in cells if c.student == "pure-noise"]
    for title, names in (("tuning students", TUNING), ("held-back students", HELD_BACK),
                         ("held-back students, second set", HELD_BACK_2)):
        cs = [c for c in cells if c.student in names]
        if cs and methods:
            parts += [f"### {title}: seeds beating random / full (cumulative skill, paired by seed)", "",
                      summary_table(cs, methods), ""]
    learn = [c for c in cells if c.student != "pure-noise"]
    if learn and methods:
        parts += [f"### per student: `{methods[0]}` seeds > random, seeds > full (✗: below 80% of seeds)", "",
                  student_table(learn, methods[0]), ""]
        for noise in sorted({c.noise for c in learn})[:1] + sorted({c.noise for c in learn})[-1:]:
            parts += [f"### mean cumulative skill at noise {noise:g}", "", skill_table(learn, methods, noise), ""]
    if noisy and methods:
        parts += ["### pure-noise student: the final policy (target: |mean - 0.5| <= 0.15 and sd > 0.15)", "",
                  noise_table(noisy, methods), ""]
    return "\n".join(parts).rstrip()


def _sd(x: list[float]) -> float:
    m = _mean(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / max(len(x) - 1, 1)) if x else math.nan


def plot(cells: list[Cell], path: str) -> None:
    """One figure: per method (rows), the share of seeds meeting the target per budget x noise, for the tuning
    students, the held-back students (both: beating random and full) and the pure-noise student (staying broad)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in cells[0].runs if m not in ("random", "full", "best-fixed")]
    groups = [(t, [c for c in cells if c.student in names]) for t, names in (
        ("tuning students: seeds beating random and full", TUNING),
        ("held-back students: seeds beating random and full", HELD_BACK),
        ("held-back, second set: seeds beating random and full", HELD_BACK_2),
        ("pure noise: seeds ending broad", {"pure-noise": PURE_NOISE}))]
    groups = [(t, cs) for t, cs in groups if cs]
    if not methods or not groups:
        return
    fig, axes = plt.subplots(len(methods), len(groups), figsize=(5.2 * len(groups), 3.6 * len(methods)),
                             squeeze=False)
    for i, m in enumerate(methods):
        for j, (title, cs) in enumerate(groups):
            budgets, noises = sorted({c.steps for c in cs}), sorted({c.noise for c in cs})
            grid_ = [[math.nan] * len(noises) for _ in budgets]
            for bi, steps in enumerate(budgets):
                for ni, noise in enumerate(noises):
                    sel = [c for c in cs if (c.steps, c.noise) == (steps, noise)]
                    if "pure noise" in title:
                        ok = [noise_ok(r) for c in sel for r in c.runs[m]]
                    else:
                        ok = [x["skill"] > max(y["skill"], z["skill"]) for c in sel
                              for x, y, z in zip(c.runs[m], c.runs["random"], c.runs["full"])]
                    grid_[bi][ni] = sum(ok) / len(ok) if ok else math.nan
            ax = axes[i][j]
            ax.imshow(grid_, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for bi in range(len(budgets)):
                for ni in range(len(noises)):
                    ax.text(ni, bi, f"{grid_[bi][ni]:.0%}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(noises)), [f"{x:g}x" for x in noises])
            ax.set_yticks(range(len(budgets)), [str(b) for b in budgets])
            ax.set(xlabel="reward noise / per-step progress", ylabel="budget (steps)", title=f"{m}: {title}")
            ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


__all__ = ["BUDGETS", "EXPLORE", "HELD_BACK", "HELD_BACK_2", "LAB_LIKE", "METHODS", "NOISE", "PURE_NOISE", "STUDENTS",
           "TRACKING", "TUNING", "Design", "ExploreThenCommit", "Student", "bounds", "grid", "main", "report", "run"]


if __name__ == "__main__":
    main()
