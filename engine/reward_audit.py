"""Does the controller's reward see what helps? Per-decision signals of finished fixed-exposure runs.

ATESD can only learn an exposure if its reward ranks exposures the way the held-out accuracy does. A run at a
fixed alpha is scored here under each learning-progress signal the controller offers (``controller.SIGNALS``:
``loss``, ``accuracy``, ``probe_nll``) exactly as the adaptive controller would score its decisions: the run's
logged steps (``metrics.jsonl``, skipped steps left out as the controller never sees them) are replayed through a
``BetaExposureController`` built from the run's own ``config.yaml`` as the engine builds it (``--steps`` as the
budget, every ``controller_*`` setting given, the rest the preset's, sized from the budget), with only the signal
changed, and each decision's progress P(d) is read from its history. The alpha it would have drawn is never used:
P depends on the logged stream and the K-step schedule only.

A replay passes a measurement where the engine would have passed one to that controller: the probe accuracy
where it asks (each decision's first step), the probe NLL where it asks or every ``probe_every`` steps (the
engine's ``--probe-every``; default: the engine's default, what an adaptive run gets unless told otherwise).
If the run lacks one of those measurements the signal is reported as not measured (None) for that run, never
scored on fewer points. A fixed run measures them when given the signal explicitly and ``--probe-every 1``
(``FixedExposure(signal=...)``; ``engine.sweep --audit`` adds ``--controller-signal accuracy --probe-every 1`` to
its fixed-alpha runs). When the run also evaluated every K steps (``--eval-every K``), each decision also gets the
change of held-out accuracy over its K steps (``heldout``): the target itself, for comparison.

Across alphas (``engine.sweep``'s fixed-exposure part) the two questions are then, per signal: does its mean P
rank the alphas like the final accuracy gain (Spearman rho), and is the difference between the best and the
worst alpha large against the per-decision spread (``separation``, in per-decision standard deviations)? A
signal whose separation is ~0.1 cannot teach a policy anything in the ~15-60 decisions of a run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import statistics
import warnings

import yaml

from atesd.controller import SIGNALS, BetaExposureController
from atesd.controller.presets import SETTINGS, resolve

KEYS = (*SIGNALS, "heldout")  # what decision_signals returns: one list (or None) per signal, and held-out accuracy
_STATS = ("loss", "mismatch", "confidence", "progress")


def _engine_probe_every() -> int:
    from atesd.engine.config import Config

    return next(f.default for f in dataclasses.fields(Config) if f.name == "probe_every")


def _read_run(run_dir: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        cfg = yaml.safe_load(fh) or {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(ln) for ln in fh if ln.strip()]
    return cfg, sorted(rows, key=lambda r: r["step"])


def replay_progress(cfg: dict, rows: list[dict], signal: str, probe_every: int | None = None) -> list[float] | None:
    """P(d) of every decision, in order of its first step, as a ``signal`` controller configured like the run
    ``cfg`` (a run's config.yaml as a dict) would compute it from the logged ``rows``; None when the rows lack a
    measurement that controller would have been given."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
    every = _engine_probe_every() if probe_every is None else int(probe_every)
    given = {k: cfg.get(f"controller_{k}") for k in SETTINGS}
    given.update(signal=signal, lambda_gt=0.0)  # P does not depend on the credit, which a fixed run never logs
    policy = BetaExposureController(total_steps=cfg.get("steps"), preset=cfg.get("controller_preset"),
                                    seed=int(cfg.get("seed") or 0), **{k: v for k, v in given.items() if v is not None})
    policy.history = collections.deque(maxlen=len(rows) + 1)  # every decision, however many
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-finite stats: dropped as in the run, no need to shout
        for r in rows:
            if r.get("skipped_step"):  # the engine never shows a skipped step to the controller
                continue
            stats = {k: r[k] for k in _STATS}
            if policy.wants("probe_accuracy"):
                if "probe_accuracy" not in r:
                    return None
                stats["probe_accuracy"] = r["probe_accuracy"]
            wanted = policy.wants("probe_nll")
            if wanted or (every and r["step"] % every == 0):
                if "probe_nll" not in r:
                    if wanted or signal == "probe_nll":
                        return None
                else:
                    stats["probe_nll"] = r["probe_nll"]
            policy.observe(stats)
    policy.finish()
    return [h["progress"] for h in sorted(policy.history, key=lambda h: h["t0"])]


def decision_signals(run_dir: str, probe_every: int | None = None,
                     settings: dict | None = None) -> dict[str, list[float] | None]:
    """Per decision (t0 = 0, K, 2K, ...) of the run in ``run_dir``: P(d) under each signal (:func:`replay_progress`;
    None: not measured) and ``heldout``, the held-out accuracy after step t0 + K minus after step t0 (step 0: the
    base model) when the run evaluated at both ends of the decision's K steps (else []). ``settings``: controller
    settings to score with instead of the run's (e.g. ``{"estimator": "delta"}``; the audit asks "what would a
    controller configured so have seen", which a fixed run answers for any setting that does not move alpha)."""
    cfg, rows = _read_run(run_dir)
    cfg = {**cfg, **{f"controller_{k}": v for k, v in (settings or {}).items()}}
    out: dict[str, list[float] | None] = {s: replay_progress(cfg, rows, s, probe_every) for s in SIGNALS}
    K = int(resolve(cfg.get("controller_preset"), cfg.get("steps"), decisions=cfg.get("controller_decisions"),
                    hold=cfg.get("controller_hold"))["hold"])
    n_steps = sum(1 for r in rows if not r.get("skipped_step"))
    heldout: list[float] = []
    path = os.path.join(run_dir, "eval_summary.json")
    if os.path.exists(path):
        with open(path) as fh:
            benches = json.load(fh)["benchmarks"]
        if benches:
            hist = {e["step"]: e["accuracy"] for e in next(iter(benches.values()))["history"]}
            heldout = [hist[t + K] - hist[t] for t in range(0, n_steps, K) if t in hist and t + K in hist]
    out["heldout"] = heldout
    return out


def run_signals(run_dir: str) -> dict[str, float | None]:
    """A run's mean per-decision P under each signal (``progress_<signal>``) and held-out accuracy change
    (``progress_heldout``); None when not measured."""
    sig = decision_signals(run_dir)
    return {f"progress_{k}": statistics.fmean(v) if v else None for k, v in sig.items()}


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


def alignment(per_alpha: dict[float, list[str]], gains: dict[float, float | None],
              settings: dict | None = None) -> dict:
    """Across alphas, for each signal of :data:`KEYS`: its mean per alpha (over the runs that measured it), the
    Spearman rho of those means against the mean final ``gains``, and the separation: (mean at the alpha with the
    highest gain - mean at the one with the lowest) / the per-decision standard deviation within an alpha (pooled
    over alphas and seeds); ``runs``: how many runs measured it. ``settings``: as for :func:`decision_signals`."""
    out: dict = {"best_alpha": None, "worst_alpha": None}
    known = {a: g for a, g in gains.items() if g is not None}
    if len(known) >= 2:
        out["best_alpha"], out["worst_alpha"] = max(known, key=known.get), min(known, key=known.get)
    signals = {a: [decision_signals(d, settings=settings) for d in dirs] for a, dirs in per_alpha.items()}
    for key in KEYS:
        per = {a: [x for s in runs if s[key] for x in s[key]] for a, runs in signals.items()}
        per = {a: v for a, v in per.items() if v}
        means = {a: statistics.fmean(v) for a, v in per.items()}
        res: dict = {"mean": means, "rho": None, "separation": None, "decisions": sum(map(len, per.values())),
                     "runs": sum(1 for runs in signals.values() for s in runs if s[key])}
        common = [a for a in means if a in known]
        res["rho"] = spearman([means[a] for a in common], [known[a] for a in common])
        dev = [x - means[a] for a, v in per.items() for x in v]
        sd = math.sqrt(sum(d * d for d in dev) / max(1, len(dev) - len(per))) if dev else 0.0
        b, w = out["best_alpha"], out["worst_alpha"]
        if sd > 0 and b in means and w in means:
            res["separation"] = (means[b] - means[w]) / sd
        out[key] = res
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.reward_audit", description=main.__doc__)
    p.add_argument("sweep_dir", help="an engine.sweep output directory with fixed-alpha runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a controller setting to score with (e.g. estimator=delta, hold=8); repeatable")
    return p


def main(argv: list[str] | None = None) -> dict:
    """``python -m engine.reward_audit SWEEP_DIR [--set estimator=delta ...]``: the audit of a finished sweep's
    fixed-alpha runs (its results.json), scored with the runs' own controller settings or the ones given."""
    args = build_parser().parse_args(argv)
    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in SETTINGS or not value:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE with KEY among {', '.join(SETTINGS)}")
        settings[key] = yaml.safe_load(value)
    with open(os.path.join(args.sweep_dir, "results.json")) as fh:
        results = json.load(fh)
    rows, runs = results["fixed_exposure"], results["runs"]

    def run_dir(exposure: str, seed: int) -> str:  # as the sweep named it, inside this sweep directory
        return os.path.join(args.sweep_dir, os.path.basename(runs[f"{exposure}/seed{seed}"]["run_dir"]))

    dirs = {r["alpha"]: [run_dir(r["exposure"], s) for s in r["seeds"]] for r in rows}
    al = alignment(dirs, {r["alpha"]: r["gain"] for r in rows}, settings)
    print(f"{args.sweep_dir}, settings {settings or 'of the runs'}: best alpha {al['best_alpha']}, worst "
          f"{al['worst_alpha']}\n\n| signal | " + " | ".join(f"P at alpha {a:g}" for a in sorted(dirs))
          + " | rho with gain | separation | decisions | runs |\n|---|" + "---|" * (len(dirs) + 4))
    for key in KEYS:
        r = al[key]
        if not r["decisions"]:
            continue
        means = " | ".join(f"{r['mean'][a]:+.4f}" if a in r["mean"] else "-" for a in sorted(dirs))
        rho = "-" if r["rho"] is None else f"{r['rho']:+.2f}"
        sep = "-" if r["separation"] is None else f"{r['separation']:+.2f}"
        print(f"| {key} | {means} | {rho} | {sep} | {r['decisions']} | {r['runs']} |")
    return al


if __name__ == "__main__":
    main()
