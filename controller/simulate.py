"""A toy student with a delayed, competence-dependent response to exposure, to test exposure policies.

    python -m controller.simulate                       # 'low' and 'high' scenarios, 100 steps, 5 seeds;
                                                        # figure in runs/controller_sim.png
    python -m controller.simulate --scenario moving --steps 2000 --out docs/controller_sim.png  # the docs' figure
    python -m controller.simulate --noise-sweep         # where the 100-step result stops holding

Hidden state: competence c in [0, 1] (starts at c0), an unrealised-knowledge buffer q, a superficial-fit
term h. The best exposure moves with competence, alpha*(c) = min(1, a0 + a1 c). One student step under alpha:

    u  = floor + (1 - floor) exp(-(alpha - alpha*)^2 / (2 w^2)),  w = w_lo below alpha*, w_hi above
    q += eta (1 - c) u;  c += q / tau;  q -= q / tau        # gains land with a delay of ~tau steps
    h  = rho h - phi (1 - alpha)                            # low exposure: a quick superficial loss drop

So every exposure teaches something (`floor` of the best), exposure near alpha* teaches most, and exposure
far above it gives targets the student cannot absorb (the paper's "too strong to absorb"). Observed stats,
loss measured before the step's update, with Gaussian noise of sd `noise` (credit: `credit_noise`):

    loss = 0.2 + 1.5 (1 - c) + kappa alpha + h   (kappa alpha: mismatch grows with exposure, mechanically)
    mismatch = 0.1 + 0.6 alpha (1 - 0.5 c), confidence = 0.4 + 0.5 c, probe_nll = 0.3 + 2 (1 - c) every
    `probe_every` steps, credit = -1.2 + credit_alpha alpha + 0.3 c (the teacher predicts the reference
    better the more of it it sees: the credit term pulls toward high exposure in every scenario).

A one-step loss proxy sees mostly h and prefers low alpha; real progress needs alpha near alpha*(c) and shows
in the loss only ~tau steps later. Progress = c_T - c_0. Scenarios (SCENARIOS): 'low' (a weak student, best
exposure ~0.2: a full reference is far too strong), 'high' (a strong student, best exposure ~0.9), both
sized so a well-exposed student gains ~0.1-0.15 competence in 100 steps; 'moving' (best exposure 0.48 rising
to ~0.75 as the student learns, over 2000 steps). `noise` is the per-step loss noise; the tables state it as
a multiple of the expected per-step loss decrease at the best exposure at the start, which is the number
that decides whether a loss-based reward can see anything (docs/controller.md compares it with the lab).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch

from atesd.controller import build
from atesd.controller.base import ExposurePolicy

POLICIES = ("adaptive", "adaptive-onestep", "random", "full", "fixed:0.5", "oracle")
ABLATIONS = ("adaptive?lambda_gt=0", "adaptive?gamma=1.0", "adaptive?lr=0.01", "adaptive?update_batch=8")

SCENARIOS: dict[str, dict[str, float]] = {
    # weak student: best exposure ~0.2-0.25; full exposure teaches ~1/3 of the best
    "low": dict(c0=0.2, a0=0.15, a1=0.3, eta=0.0025, tau=3.0, w_lo=0.15, w_hi=0.3, floor=0.3),
    # strong student: best exposure ~0.9-1.0; answer-only teaches ~1/3 of the best
    "high": dict(c0=0.5, a0=0.75, a1=0.3, eta=0.0025, tau=3.0, w_lo=0.3, w_hi=0.15, floor=0.3),
    # best exposure 0.48 at the start, rising with competence; long run
    "moving": dict(c0=0.3, a0=0.3, a1=0.6, eta=0.0008, tau=8.0, w_lo=0.15, w_hi=0.2, floor=0.1),
}


@dataclass
class ToyStudent:
    c0: float = 0.3
    a0: float = 0.3
    a1: float = 0.6
    eta: float = 0.0008
    tau: float = 8.0
    w_lo: float = 0.15
    w_hi: float = 0.2
    floor: float = 0.1
    rho: float = 0.6
    phi: float = 0.001
    kappa: float = 0.5
    noise: float = 0.001
    credit_alpha: float = 0.5
    credit_noise: float = 0.02
    probe_every: int = 5
    seed: int = 0
    c: float = field(init=False)
    q: float = field(init=False, default=0.0)
    h: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.c = self.c0
        self._rng = random.Random(10_000 + self.seed)

    def best_alpha(self) -> float:
        return min(1.0, self.a0 + self.a1 * self.c)

    def usefulness(self, alpha: float) -> float:
        """u(alpha) in [floor, 1]: the fraction of the best possible gain a step under alpha gives."""
        star = self.best_alpha()
        w = self.w_lo if alpha < star else self.w_hi
        return self.floor + (1 - self.floor) * math.exp(-((alpha - star) ** 2) / (2 * w * w))

    def step_progress(self) -> float:
        """Expected loss decrease per step at the best exposure (once the delay has passed)."""
        return 1.5 * self.eta * (1 - self.c)

    def step(self, alpha: float, t: int, total: int) -> dict[str, float]:
        """One student step under `alpha`; returns the stats the engine would report for it."""
        n = lambda sd: self._rng.gauss(0.0, sd)
        stats = {
            "loss": 0.2 + 1.5 * (1 - self.c) + self.kappa * alpha + self.h + n(self.noise),
            "mismatch": 0.1 + 0.6 * alpha * (1 - 0.5 * self.c) + n(self.noise),
            "confidence": 0.4 + 0.5 * self.c + n(self.noise),
            "credit": -1.2 + self.credit_alpha * alpha + 0.3 * self.c + n(self.credit_noise),
            "progress": t / max(total - 1, 1),
        }
        if t % self.probe_every == 0:
            stats["probe_nll"] = 0.3 + 2.0 * (1 - self.c) + n(self.noise)
        self.q += self.eta * (1 - self.c) * self.usefulness(alpha)
        self.c = min(1.0, max(0.0, self.c + self.q / self.tau))
        self.q -= self.q / self.tau
        self.h = self.rho * self.h - self.phi * (1 - alpha)
        return stats


class Oracle(ExposurePolicy):
    """Not a policy: reads the simulator's hidden alpha*(c) every step. The reference ceiling."""

    student: ToyStudent | None = None

    def exposure(self) -> float:
        return self.student.best_alpha()


def make_policy(spec: str, seed: int) -> ExposurePolicy:
    """`build` spec, optionally with constructor overrides: 'adaptive?gamma=0.9,lambda_gt=0'; or 'oracle'."""
    if spec == "oracle":
        return Oracle()
    name, _, over = spec.partition("?")
    kw = {}
    for item in filter(None, over.split(",")):
        k, v = item.split("=")
        kw[k] = v if k == "optimizer" else int(v) if k in ("hold", "lookahead", "update_batch", "hidden") else float(v)
    return build(name, seed=seed, **kw)


def student_for(scenario: str, seed: int, noise_mult: float = 1.0) -> ToyStudent:
    """The scenario's student; its loss noise is `noise_mult` x the per-step best progress at the start
    (NOISE_RATIO x for the published tables)."""
    s = ToyStudent(seed=seed, **SCENARIOS[scenario])
    s.noise = NOISE_RATIO * noise_mult * s.step_progress()
    return s


# Loss noise per step = NOISE_RATIO x the expected per-step loss decrease at the best exposure at the start.
NOISE_RATIO = 0.5


def run(policy: ExposurePolicy, steps: int, seed: int, scenario: str = "moving",
        noise_mult: float = 1.0) -> dict[str, list[float]]:
    """Train a scenario's ToyStudent for `steps` under `policy`; per-step alpha, best alpha, competence."""
    s = student_for(scenario, seed, noise_mult)
    if isinstance(policy, Oracle):
        policy.student = s
    out: dict[str, list[float]] = {"alpha": [], "best": [], "c": []}
    for t in range(steps):
        a = policy.exposure()
        out["alpha"].append(a)
        out["best"].append(s.best_alpha())
        policy.observe(s.step(a, t, steps))
        out["c"].append(s.c)
    policy.finish()
    out["progress"] = [s.c - s.c0]
    return out


def simulate(seeds: int = 5, steps: int = 100, policies: tuple[str, ...] = POLICIES, scenario: str = "low",
             noise_mult: float = 1.0) -> dict[str, list]:
    """{spec: [run per seed]}. Runs torch single-threaded (the policy's tensors are tiny; on a loaded
    2-core machine thread hand-offs cost more than the math), restoring the thread count after."""
    nt = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {spec: [run(make_policy(spec, sd), steps, sd, scenario, noise_mult) for sd in range(seeds)]
                for spec in policies}
    finally:
        torch.set_num_threads(nt)


def _mean(x: list[float]) -> float:
    return sum(x) / len(x)


def _sd(x: list[float]) -> float:
    m = _mean(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / max(len(x) - 1, 1))


def summarize(res: dict[str, list[dict]], late: int = 40) -> list[dict]:
    """Per policy: progress mean/sd, seeds beating 'full' / 'random' (paired by seed), and over the last
    `late` steps the mean alpha, the mean best alpha and their mean absolute gap (per seed, averaged)."""
    prog = {spec: [r["progress"][0] for r in runs] for spec, runs in res.items()}
    rows = []
    for spec, runs in res.items():
        la = [_mean(r["alpha"][-late:]) for r in runs]
        lb = [_mean(r["best"][-late:]) for r in runs]
        row = {"policy": spec, "seeds": len(runs), "progress": _mean(prog[spec]), "progress_sd": _sd(prog[spec]),
               "late_alpha": _mean(la), "late_alpha_sd": _sd(la), "late_best": _mean(lb),
               "late_gap": _mean([abs(a - b) for a, b in zip(la, lb)])}
        for ref in ("full", "random"):
            row[f"wins_vs_{ref}"] = sum(a > b for a, b in zip(prog[spec], prog[ref])) if ref in prog else None
        rows.append(row)
    return rows


def table(rows: list[dict], late: int = 40) -> str:
    fmt = lambda w, n: "-" if w is None else f"{w}/{n}"
    out = [f"| policy | progress c_T - c_0 (mean ± sd) | seeds > random | seeds > full | alpha, last {late} "
           "steps (mean ± sd over seeds) | best alpha, same steps | gap |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["seeds"]
        out.append(f"| `{r['policy']}` | {r['progress']:.4f} ± {r['progress_sd']:.4f} | "
                   f"{fmt(r['wins_vs_random'], n)} | {fmt(r['wins_vs_full'], n)} | "
                   f"{r['late_alpha']:.2f} ± {r['late_alpha_sd']:.2f} | {r['late_best']:.2f} | {r['late_gap']:.2f} |")
    return "\n".join(out)


def noise_sweep(seeds: int, steps: int, mults: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)) -> str:
    """Adaptive vs random, both 100-step scenarios, at several loss-noise levels: a markdown table."""
    out = ["| scenario | loss noise / per-step best progress | adaptive progress | random progress | "
           "seeds adaptive > random | adaptive alpha, last 40 steps | best alpha |", "|---|---|---|---|---|---|---|"]
    for scenario in ("low", "high"):
        for m in mults:
            rows = {r["policy"]: r for r in summarize(simulate(seeds, steps, ("adaptive", "random"), scenario, m))}
            a, r = rows["adaptive"], rows["random"]
            out.append(f"| {scenario} | {NOISE_RATIO * m:g} | {a['progress']:.4f} | {r['progress']:.4f} | "
                       f"{a['wins_vs_random']}/{seeds} | {a['late_alpha']:.2f} | {a['late_best']:.2f} |")
    return "\n".join(out)


def plot(results: dict[str, dict[str, list[dict]]], path: str, win: int = 8) -> None:
    """One row per scenario: competence per policy, and the adaptive policy's alpha against the best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = lambda runs, key: [_mean([r[key][t] for r in runs]) for t in range(len(runs[0][key]))]
    smooth = lambda x: [_mean(x[max(0, t - win + 1):t + 1]) for t in range(len(x))]
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    for (scenario, res), (ax1, ax2) in zip(results.items(), axes):
        n = len(next(iter(res.values())))
        for spec, runs in res.items():
            ax1.plot(avg(runs, "c"), label=spec)
        for spec in ("adaptive", "adaptive-onestep", "random"):
            if spec in res:
                ax2.plot(smooth(avg(res[spec], "alpha")), label=spec)
        if "adaptive" in res:
            ax2.plot(avg(res["adaptive"], "best"), "k--", label="best alpha*(c) along adaptive's run")
        ax1.set(xlabel="student step", ylabel="competence c", title=f"'{scenario}': competence, mean of {n} seeds")
        ax2.set(xlabel="student step", ylabel="alpha", ylim=(0, 1),
                title=f"'{scenario}': exposure chosen (mean of {n} seeds, {win}-step moving average)")
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Exposure policies on a toy student with delayed effects.")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--scenario", default="low,high", help=f"comma list of {', '.join(SCENARIOS)}")
    ap.add_argument(
        "--out",
        default="runs/controller_sim.png",
        help="PNG path ('' to skip the plot); the docs' figure, docs/controller_sim.png, only when named",
    )
    ap.add_argument("--ablations", action="store_true", help=f"also run {', '.join(ABLATIONS)}")
    ap.add_argument("--noise-sweep", action="store_true", help="adaptive vs random at several noise levels")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    results = {}
    for scenario in [s.strip() for s in args.scenario.split(",") if s.strip()]:
        if scenario not in SCENARIOS:
            ap.error(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
        res = simulate(args.seeds, args.steps, POLICIES + (ABLATIONS if args.ablations else ()), scenario)
        results[scenario] = {k: v for k, v in res.items() if k in POLICIES}
        s = student_for(scenario, 0)
        print(f"\nscenario '{scenario}': {args.steps} steps, {args.seeds} seeds, best alpha at start "
              f"{s.best_alpha():.2f}, loss noise {s.noise:.4g} = {NOISE_RATIO:g} x per-step best progress\n")
        late = 40 if args.steps <= 200 else args.steps // 4  # the last 40 of ~100 steps; the last quarter else
        print(table(summarize(res, late=late), late=late))
    if args.noise_sweep:
        print(f"\nnoise sweep ({args.steps} steps, {args.seeds} seeds)\n")
        print(noise_sweep(args.seeds, args.steps))
    print(f"\n{time.perf_counter() - t:.1f} s")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        plot(results, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
