"""Does the controller's reward see what helps? Per-decision signals of finished fixed-exposure runs.

ATESD can only learn an exposure if its reward ranks exposures the way the held-out accuracy does. A run at a
fixed alpha is scored here exactly as the adaptive controller would score it: decisions start every K steps
(``controller_hold``), and each gets the learning progress P(d) of the loss over its lookahead
(``controller_lookahead``, ``controller_gamma``, ``controller_estimator``: ``controller.reward.loss_slope_progress``
or the paper's ``learning_progress``; losses across a decision boundary never compared, the loss EMA at the
decision as its scale), all read from the run's own ``config.yaml`` (unset settings resolved as the controller
resolves them, from the preset and ``steps``) and ``metrics.jsonl``. When
the run also evaluated every K steps (``--eval-every K``), each decision gets the change of held-out accuracy
over its K steps too: a signal that measures the target itself, for comparison.

Across alphas (``engine.sweep``'s fixed-exposure part) the two questions are then: does mean P rank the alphas
like the final accuracy gain (Spearman rho), and is the difference between the best and the worst alpha large
against the per-decision spread (``separation``, in per-decision standard deviations)? A reward whose separation
is ~0.1 cannot teach a policy anything in the ~15-25 decisions of a short run.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import yaml

from atesd.controller.presets import resolve
from atesd.controller.reward import learning_progress, loss_slope_progress


def _read_config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        return yaml.safe_load(fh)


def decision_signals(run_dir: str) -> dict[str, list[float]]:
    """Per decision (t0 = 0, K, 2K, ...): ``progress`` P(d) as the controller computes it and, when the run
    evaluated at both ends of the decision's K steps, ``accuracy_progress`` (held-out accuracy after step
    t0 + K minus after step t0; step 0 is the base model)."""
    cfg = _read_config(run_dir)
    keys = ("preset", "decisions", "hold", "lookahead", "gamma", "ema", "estimator")  # unset: the preset's, sized
    c = resolve(total_steps=cfg.get("steps"), **{k: cfg.get(f"controller_{k}") for k in keys})  # from --steps
    K, L, gamma, ema = c["hold"], c["lookahead"], c["gamma"], c["ema"]
    progress_of = loss_slope_progress if c["estimator"] == "slope" else learning_progress
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(ln) for ln in fh if ln.strip()]
    # the controller never observes a skipped step (non-finite loss or gradient): neither does this
    losses = [float(r["loss"]) for r in sorted(rows, key=lambda r: r["step"]) if not r.get("skipped_step")]
    progress: list[float] = []
    level = None  # the controller's loss EMA: its scale for the decision sampled next
    for t0 in range(0, len(losses), K):
        window = losses[t0 : t0 + L + 1]
        if len(window) >= 2 and all(math.isfinite(x) for x in window):
            scale = abs(window[0]) if level is None else level
            starts = [(t0 + i) % K == 0 for i in range(len(window))]
            progress.append(progress_of(window, starts, gamma=gamma, scale=max(scale, 1e-12)))
        for x in losses[t0 : t0 + K]:
            if math.isfinite(x):
                level = x if level is None else ema * level + (1 - ema) * x
    accuracy: list[float] = []
    path = os.path.join(run_dir, "eval_summary.json")
    if os.path.exists(path):
        with open(path) as fh:
            benches = json.load(fh)["benchmarks"]
        if benches:
            hist = {e["step"]: e["accuracy"] for e in next(iter(benches.values()))["history"]}
            accuracy = [hist[t + K] - hist[t] for t in range(0, len(losses), K) if t in hist and t + K in hist]
    return {"progress": progress, "accuracy_progress": accuracy}


def run_signals(run_dir: str) -> dict[str, float | None]:
    """A run's mean per-decision ``reward_progress`` and ``accuracy_progress`` (None when absent)."""
    sig = decision_signals(run_dir)
    return {
        "reward_progress": statistics.fmean(sig["progress"]) if sig["progress"] else None,
        "accuracy_progress": statistics.fmean(sig["accuracy_progress"]) if sig["accuracy_progress"] else None,
    }


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def alignment(per_alpha: dict[float, list[str]], gains: dict[float, float | None]) -> dict:
    """Across alphas: for each signal, its mean per alpha, the Spearman rho of those means against the mean
    final ``gains``, and the separation: (mean at the alpha with the highest gain - mean at the one with the
    lowest) / the per-decision standard deviation within an alpha (pooled over alphas and seeds)."""
    out: dict = {"best_alpha": None, "worst_alpha": None}
    known = {a: g for a, g in gains.items() if g is not None}
    if len(known) >= 2:
        out["best_alpha"], out["worst_alpha"] = max(known, key=known.get), min(known, key=known.get)
    for key in ("progress", "accuracy_progress"):
        per = {a: [x for d in dirs for x in decision_signals(d)[key]] for a, dirs in per_alpha.items()}
        per = {a: v for a, v in per.items() if v}
        means = {a: statistics.fmean(v) for a, v in per.items()}
        res: dict = {"mean": means, "rho": None, "separation": None, "decisions": sum(map(len, per.values()))}
        common = [a for a in means if a in known]
        res["rho"] = spearman([means[a] for a in common], [known[a] for a in common])
        dev = [x - means[a] for a, v in per.items() for x in v]
        sd = math.sqrt(sum(d * d for d in dev) / max(1, len(dev) - len(per))) if dev else 0.0
        b, w = out["best_alpha"], out["worst_alpha"]
        if sd > 0 and b in means and w in means:
            res["separation"] = (means[b] - means[w]) / sd
        out[key] = res
    return out
