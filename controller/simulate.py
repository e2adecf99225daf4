"""A toy student with a delayed, competence-dependent response to exposure, to test exposure policies.

    python -m controller.simulate                                  # figure in runs/controller_sim.png
    python -m controller.simulate --seeds 5 --out docs/controller_sim.png   # regenerate the docs' figure

Hidden state: competence c in [0, 1] (starts at c0), an unrealised-knowledge buffer q, a superficial-fit
term h. The best exposure moves with competence, alpha*(c) = a0 + a1 c. One student step under alpha:

    g  = eta (1 - c) (alpha* - s_lo max(0, alpha* - alpha) - s_hi max(0, alpha - alpha*))
    q += g;  c += q / tau;  q -= q / tau          # gains land with a delay of ~tau steps
    h  = rho h - phi (1 - alpha)                  # low exposure: quick superficial loss drop that fades

So exposure up to alpha* teaches more; beyond it the teacher's targets exceed what the student absorbs
(at c0, full exposure gains only an eighth of the best). Observed stats, each with Gaussian noise
(`noise`; credit 20x), loss measured before the step's update:

    loss = 0.2 + 1.5 (1 - c) + kappa alpha + h   (kappa alpha: mismatch grows with exposure)
    mismatch = 0.1 + 0.6 alpha (1 - 0.5 c), confidence = 0.4 + 0.5 c, credit = -1.2 + 0.4 c + 0.05 alpha,
    probe_nll = 0.3 + 2 (1 - c) every `probe_every` steps.

A one-step loss proxy sees mostly h and prefers low alpha; real progress needs alpha near alpha*(c), and
shows up in the loss only ~tau steps later. Cumulative progress = c_T - c_0.
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

POLICIES = ("adaptive", "adaptive-onestep", "full", "random", "fixed:0.5", "linear:0.4:0.9", "oracle")
ABLATIONS = ("adaptive?lambda_gt=0", "adaptive?gamma=0.9", "adaptive?gamma=0.9,lambda_gt=0")


@dataclass
class ToyStudent:
    c0: float = 0.3
    a0: float = 0.3
    a1: float = 0.6
    eta: float = 0.001
    s_lo: float = 1.5
    s_hi: float = 0.8
    tau: float = 8.0
    rho: float = 0.6
    phi: float = 0.001
    kappa: float = 0.5
    noise: float = 0.001
    probe_every: int = 10
    seed: int = 0
    c: float = field(init=False)
    q: float = field(init=False, default=0.0)
    h: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.c = self.c0
        self._rng = random.Random(10_000 + self.seed)

    def best_alpha(self) -> float:
        return min(1.0, self.a0 + self.a1 * self.c)

    def step(self, alpha: float, t: int, total: int) -> dict[str, float]:
        """One student step under `alpha`; returns the stats the engine would report for it."""
        n = lambda s=1.0: self._rng.gauss(0.0, self.noise * s)
        stats = {
            "loss": 0.2 + 1.5 * (1 - self.c) + self.kappa * alpha + self.h + n(),
            "mismatch": 0.1 + 0.6 * alpha * (1 - 0.5 * self.c) + n(),
            "confidence": 0.4 + 0.5 * self.c + n(),
            "credit": -1.2 + 0.4 * self.c + 0.05 * alpha + n(20),
            "progress": t / max(total - 1, 1),
        }
        if t % self.probe_every == 0:
            stats["probe_nll"] = 0.3 + 2.0 * (1 - self.c) + n()
        star = self.best_alpha()
        short, over = max(0.0, star - alpha), max(0.0, alpha - star)
        g = self.eta * (1 - self.c) * (star - self.s_lo * short - self.s_hi * over)
        self.q += g
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
    kw = {k: float(v) for k, v in (item.split("=") for item in over.split(",") if item)}
    return build(name, seed=seed, **kw)


def run(policy: ExposurePolicy, steps: int, seed: int) -> dict[str, list[float]]:
    """Train a ToyStudent for `steps` under `policy`; per-step alpha, best alpha, competence."""
    s = ToyStudent(seed=seed)
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


def simulate(seeds: int = 5, steps: int = 2000, policies: tuple[str, ...] = POLICIES) -> dict[str, list]:
    """{spec: [run per seed]}. Runs torch single-threaded (the policy's tensors are tiny; on a loaded
    2-core machine thread hand-offs cost more than the math), restoring the thread count after."""
    nt = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {spec: [run(make_policy(spec, sd), steps, sd) for sd in range(seeds)] for spec in policies}
    finally:
        torch.set_num_threads(nt)


def _mean(x: list[float]) -> float:
    return sum(x) / len(x)


def _sd(x: list[float]) -> float:
    m = _mean(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / max(len(x) - 1, 1))


def summarize(res: dict[str, list[dict]], late: float = 0.25) -> list[dict]:
    """Per policy: progress mean/sd, seeds beating 'full' / 'random' (paired by seed), and over the last
    `late` fraction of steps the mean alpha, the mean best alpha and their mean absolute gap."""
    prog = {spec: [r["progress"][0] for r in runs] for spec, runs in res.items()}
    rows = []
    for spec, runs in res.items():
        n = len(runs[0]["alpha"])
        lo = int(n * (1 - late))
        la = [_mean(r["alpha"][lo:]) for r in runs]
        lb = [_mean(r["best"][lo:]) for r in runs]
        row = {"policy": spec, "progress": _mean(prog[spec]), "progress_sd": _sd(prog[spec]),
               "late_alpha": _mean(la), "late_best": _mean(lb),
               "late_gap": _mean([abs(a - b) for a, b in zip(la, lb)])}
        for ref in ("full", "random"):
            row[f"wins_vs_{ref}"] = sum(a > b for a, b in zip(prog[spec], prog[ref])) if ref in prog else None
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    fmt = lambda w, n: "-" if w is None else f"{w}/{n}"
    out = ["| policy | progress c_T - c_0 (mean ± sd) | seeds > full | seeds > random | late alpha | "
           "late best alpha | late gap |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r.get("seeds", "?")
        out.append(f"| `{r['policy']}` | {r['progress']:.3f} ± {r['progress_sd']:.3f} | "
                   f"{fmt(r['wins_vs_full'], n)} | {fmt(r['wins_vs_random'], n)} | {r['late_alpha']:.2f} | "
                   f"{r['late_best']:.2f} | {r['late_gap']:.2f} |")
    return "\n".join(out)


def plot(res: dict[str, list[dict]], path: str, win: int = 50) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = lambda runs, key: [_mean([r[key][t] for r in runs]) for t in range(len(runs[0][key]))]
    smooth = lambda x: [_mean(x[max(0, t - win + 1):t + 1]) for t in range(len(x))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for spec, runs in res.items():
        ax1.plot(avg(runs, "c"), label=spec)
    for spec in ("adaptive", "adaptive-onestep", "random"):
        if spec in res:
            ax2.plot(smooth(avg(res[spec], "alpha")), label=f"{spec}")
    if "adaptive" in res:
        ax2.plot(avg(res["adaptive"], "best"), "k--", label="best alpha*(c) along adaptive's run")
    n = len(next(iter(res.values())))
    ax1.set(xlabel="student step", ylabel="competence c", title=f"Toy student, mean of {n} seeds")
    ax2.set(xlabel="student step", ylabel="alpha", ylim=(0, 1),
            title=f"Exposure chosen (mean of {n} seeds, {win}-step moving average)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Exposure policies on a toy student with delayed effects.")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument(
        "--out",
        default="runs/controller_sim.png",
        help="PNG path ('' to skip the plot); the docs' figure, docs/controller_sim.png, only when named",
    )
    ap.add_argument("--ablations", action="store_true", help=f"also run {', '.join(ABLATIONS)}")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    res = simulate(args.seeds, args.steps, POLICIES + (ABLATIONS if args.ablations else ()))
    rows = summarize(res)
    for r in rows:
        r["seeds"] = args.seeds
    print(table(rows))
    print(f"\n{args.seeds} seeds x {args.steps} steps, {time.perf_counter() - t:.1f} s")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        plot({k: v for k, v in res.items() if k in POLICIES}, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
