"""What a sweep's runs say: statistics over seeds, the paired tests, the markdown tables and the figures.

``engine/sweep.py`` trains the runs and calls :func:`run_statistics` per run, :func:`aggregate` per alpha or method,
:func:`comparisons` for the paper's claims as paired tests, then :func:`tables` and :func:`figures`. Every
statistic is a mean with its 95% t-interval over seeds; a paired difference also gets its paired t.
"""

from __future__ import annotations

import json
import math
import os

from atesd.engine import reward_audit


def canonical(spec: str) -> str:
    """One name per exposure policy, so equal runs are shared: ``full`` and ``fixed:1.0`` -> ``fixed:1``."""
    s = spec.strip().lower()
    if s == "full":
        return "fixed:1"
    if s.startswith("fixed:"):
        return f"fixed:{float(s.split(':', 1)[1]):g}"
    return s


def run_name(key: str, seed: int) -> str:
    return f"{key.replace(':', '_')}-seed{seed}"


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (95% two-sided intervals)."""
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(xs: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and half-width of its 95% t-interval over the non-None values (half-width None below 2 values)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, t975(len(xs) - 1) * sd / math.sqrt(len(xs))


def paired(a: dict[str, float | None], b: dict[str, float | None]) -> dict:
    """Paired comparison over the seeds both have: mean of a - b, its 95% half-width, paired t, n, and the
    per-seed differences. t is +-inf when every difference is equal and non-zero, 0 when all are zero."""
    seeds = sorted((s for s in a if s in b and a[s] is not None and b[s] is not None), key=int)
    diffs = [a[s] - b[s] for s in seeds]
    out = {"n": len(diffs), "seeds": seeds, "diffs": diffs, "mean": None, "ci": None, "t": None}
    if not diffs:
        return out
    m, ci = mean_ci(diffs)
    out.update(mean=m, ci=ci)
    if len(diffs) > 1:
        sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1))
        out["t"] = m / (sd / math.sqrt(len(diffs))) if sd > 0 else (0.0 if m == 0 else math.copysign(math.inf, m))
    return out


STAT_KEYS = (
    "kl_start", "top1_disagree_start", "kl_mean", "top1_disagree_mean", "accuracy_before", "accuracy_after", "gain",
    "alpha_mean", *(f"progress_{k}" for k in reward_audit.KEYS),
)  # fmt: skip
START_STEPS = 5


def start_mismatch(run_dir: str, steps: int = START_STEPS) -> dict[str, float | None]:
    """Token-weighted KL and top-1 disagreement over a run's first ``steps`` steps (``metrics.jsonl``): the
    paper's mismatch D(alpha) = E_{y ~ student}[KL(teacher_alpha || student)] for the student as it starts,
    before training has moved it (the whole-run means also reflect how far each run's student has moved)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(ln) for ln in fh if ln.strip()]
    rows = [r for r in rows if r["step"] <= steps and not r.get("skipped_step") and math.isfinite(r["loss"])]
    tokens = sum(r["rollout_tokens"] for r in rows)
    if not tokens:
        return {"kl_start": None, "top1_disagree_start": None}
    return {
        "kl_start": sum(r["kl"] * r["rollout_tokens"] for r in rows) / tokens,
        "top1_disagree_start": 1.0 - sum(r["top1_agree"] * r["rollout_tokens"] for r in rows) / tokens,
    }


def run_statistics(run_dir: str) -> dict[str, float | None]:
    """What the tables need beyond summary.json: the mismatch at the start and the per-decision signals
    (``engine.reward_audit``: the controller's reward and, with --eval-every K, the accuracy change)."""
    return {**start_mismatch(run_dir), **reward_audit.run_signals(run_dir)}


def aggregate(summaries: list[dict]) -> dict:
    """Mean and 95% half-width (``<key>_ci``) of each statistic over runs, and the per-seed values."""
    out: dict = {"runs": len(summaries), "seeds": [s["seed"] for s in summaries]}
    for k in STAT_KEYS:
        out[k], out[k + "_ci"] = mean_ci([s.get(k) for s in summaries])
        out[k + "_per_seed"] = {str(s["seed"]): s.get(k) for s in summaries}  # str keys: JSON-stable
    out["policy_per_seed"] = {str(s["seed"]): s.get("policy") for s in summaries}
    return out


def fmt(m: float | None, ci: float | None = None, digits: int = 3, sign: bool = False) -> str:
    if m is None:
        return "-"
    text = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return text if ci is None else f"{text} ± {ci:.{digits}f}"


def _fmt_t(t: float | None) -> str:
    return "-" if t is None else ("inf" if math.isinf(t) and t > 0 else "-inf" if math.isinf(t) else f"{t:.1f}")


def comparisons(fixed_rows: list[dict], method_rows: list[dict]) -> dict:
    """The paper's claims as paired tests over seeds.

    ``monotone``: for each step between consecutive alphas, the paired change of KL and of top-1
    disagreement. ``interior_vs_full``: accuracy of each interior alpha minus that of alpha = 1. ``methods``:
    ATESD (``adaptive``; else the first method) minus each other method and minus the best fixed alpha.
    """
    out: dict = {"monotone": [], "interior_vs_full": [], "methods": []}
    by_alpha = {r["alpha"]: r for r in fixed_rows}
    alphas = sorted(by_alpha)
    for lo, hi in zip(alphas, alphas[1:]):
        row = {"from": lo, "to": hi}
        for k in ("kl_start", "top1_disagree_start", "kl_mean", "top1_disagree_mean"):
            row[k] = paired(by_alpha[hi][k + "_per_seed"], by_alpha[lo][k + "_per_seed"])
        out["monotone"].append(row)
    if 1.0 in by_alpha:
        full = by_alpha[1.0]["accuracy_after_per_seed"]
        for a in alphas:
            if 0.0 < a < 1.0:
                out["interior_vs_full"].append({"alpha": a, **paired(by_alpha[a]["accuracy_after_per_seed"], full)})
    if method_rows:
        head = next((r for r in method_rows if canonical(r["method"]) == "adaptive"), method_rows[0])
        mine = head["accuracy_after_per_seed"]
        for r in (r for r in method_rows if r is not head):
            out["methods"].append({"a": head["method"], "b": r["method"], **paired(mine, r["accuracy_after_per_seed"])})
        scored = [r for r in fixed_rows if r["accuracy_after"] is not None]
        if scored:
            best = max(scored, key=lambda r: r["accuracy_after"])
            out["methods"].append(
                {"a": head["method"], "b": f"best fixed (alpha={best['alpha']:g})",
                 **paired(mine, best["accuracy_after_per_seed"])}  # fmt: skip
            )
    return out


def _paired_cell(p: dict, digits: int = 3) -> str:
    return f"{fmt(p['mean'], p['ci'], digits, sign=True)} | {_fmt_t(p['t'])} | {p['n']}"


def _paired_table(title: str, columns: str, rows: list[str]) -> list[str]:
    """A markdown section of paired differences: ``columns`` name the row and the difference; t and n follow."""
    return [f"\n### {title}\n", f"| {columns} | t | n |", "|---|---|---|---|", *rows]


def tables(fixed_rows: list[dict], method_rows: list[dict], header: str, comp: dict | None = None) -> str:
    """Markdown of both parts (a part without rows is left out), with the paired tests of ``comparisons``."""
    comp = comp if comp is not None else comparisons(fixed_rows, method_rows)
    md = [f"# ATESD lab sweep\n\n{header}\n"]
    if fixed_rows:
        seeds = sorted({s for r in fixed_rows for s in r["accuracy_after_per_seed"]}, key=int)
        md += [
            "## Fixed exposure: mismatch and accuracy vs alpha\n",
            f"Mismatch at the start: the first {START_STEPS} steps of each run (the student as it starts); over the "
            "run: all steps.\n",
            "| alpha | runs | KL at start | top-1 disagreement at start | KL over the run "
            "| top-1 disagreement over the run | accuracy after | gain |",
            "|---:|---:|---|---|---|---|---|---|",
        ]
        for r in fixed_rows:
            md.append(
                f"| {r['alpha']:g} | {r['runs']} | {fmt(r['kl_start'], r['kl_start_ci'], 4)} "
                f"| {fmt(r['top1_disagree_start'], r['top1_disagree_start_ci'], 4)} "
                f"| {fmt(r['kl_mean'], r['kl_mean_ci'], 4)} "
                f"| {fmt(r['top1_disagree_mean'], r['top1_disagree_mean_ci'], 4)} "
                f"| {fmt(r['accuracy_after'], r['accuracy_after_ci'])} | {fmt(r['gain'], r['gain_ci'], sign=True)} |"
            )
        md += [
            f"\nAccuracy after training, per seed ({', '.join(map(str, seeds))}):\n",
            "| alpha | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---:|" + "---|" * len(seeds),
        ]
        for r in fixed_rows:
            cells = " | ".join(fmt(r["accuracy_after_per_seed"].get(s)) for s in seeds)
            md.append(f"| {r['alpha']:g} | {cells} |")
        # one base model per seed (its evaluation set depends on the seed, not on alpha): the interval is over seeds
        by_seed = {seed: v for r in fixed_rows for seed, v in r["accuracy_before_per_seed"].items() if v is not None}
        if by_seed:
            md.append(f"\nAccuracy before training: {fmt(*mean_ci(list(by_seed.values())))} (mean and 95% interval "
                      f"over {len(by_seed)} seeds).")
        if comp["monotone"]:
            md += [
                "\n### Mismatch grows with alpha (paired change between consecutive alphas)\n",
                "| alpha step | measured | KL change | t | n | top-1 disagreement change | t | n |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for when, kl, top1 in (("at start", "kl_start", "top1_disagree_start"),
                                   ("over the run", "kl_mean", "top1_disagree_mean")):  # fmt: skip
                for row in comp["monotone"]:
                    md.append(
                        f"| {row['from']:g} -> {row['to']:g} | {when} | {_paired_cell(row[kl], 4)} "
                        f"| {_paired_cell(row[top1], 4)} |"
                    )
        if comp["interior_vs_full"]:
            md += _paired_table("Interior alpha vs full exposure (paired accuracy difference)",
                                "alpha | accuracy minus alpha=1",
                                [f"| {row['alpha']:g} | {_paired_cell(row)} |" for row in comp["interior_vs_full"]])
        if comp.get("reward_alignment"):
            md += _alignment_table(fixed_rows, comp["reward_alignment"])
        md.append("")
    if method_rows:
        md += [
            "## Methods: final held-out accuracy over seeds\n",
            "| method | runs | accuracy after | gain over before | mean alpha | KL per token | after, per seed |",
            "|---|---:|---|---|---|---|---|",
        ]
        for r in method_rows:
            per_seed = ", ".join("-" if a is None else f"{a:.3f}" for a in r["accuracy_after_per_seed"].values())
            md.append(
                f"| {r['method']} | {r['runs']} | {fmt(r['accuracy_after'], r['accuracy_after_ci'])} "
                f"| {fmt(r['gain'], r['gain_ci'], sign=True)} | {fmt(r['alpha_mean'], digits=2)} "
                f"| {fmt(r['kl_mean'], digits=4)} | {per_seed} |"
            )
        if comp["methods"]:
            md += _paired_table("Paired comparisons (accuracy after training)", "comparison | difference",
                                [f"| {row['a']} - {row['b']} | {_paired_cell(row)} |" for row in comp["methods"]])
        md += _policy_table(method_rows)
        md.append("")
    md.append(
        "Mean ± half-width of the 95% t-interval over seeds; paired differences are per seed (same seed, same "
        "held-out problems), t is the paired t statistic. KL and top-1 disagreement are token-weighted means "
        "over each run's rollouts.\n"
    )
    return "\n".join(md)


def _policy_table(method_rows: list[dict]) -> list[str]:
    """Did the adaptive policy learn? Its Beta after the last step and its gate, per run (runs whose summary has
    no ``policy``: fixed, random, or written before it existed, are left out)."""
    lines = [f"| {r['method']} | {seed} | {p['beta_mean']:.2f} | {p['beta_concentration']:.1f} "
             f"| {fmt(p['gate_max'], digits=2)} | {'-' if p['gate_open_steps'] is None else p['gate_open_steps']} "
             f"| {fmt(r['accuracy_after_per_seed'].get(seed))} |"
             for r in method_rows for seed, p in r.get("policy_per_seed", {}).items() if p]
    if not lines:
        return []
    return ["\n### The adaptive policy at the end of each run\n",
            "Beta(a, b) after the last step: mean and concentration a + b (Beta(2, 2), the prior: 0.50 and 4.0); the "
            "window update's SNR gate: its largest value and the steps it was open (0: the rewards never moved the "
            "policy; -: an update without a gate, the paper preset's REINFORCE).\n",
            "| method | seed | final mean | final concentration | gate max | steps gate open | accuracy after |",
            "|---|---|---|---|---|---|---|", *lines]


_SIGNAL_NAMES = {"loss": "P, loss", "accuracy": "P, probe accuracy", "probe_nll": "P, probe NLL",
                 "heldout": "held-out accuracy change"}


def _alignment_table(fixed_rows: list[dict], al: dict) -> list[str]:
    """Markdown of ``reward_audit.alignment``: does each signal's reward rank the alphas like the gain?"""
    keys = [k for k in reward_audit.KEYS if (al.get(k) or {}).get("decisions")]
    md = [
        "\n### Does the controller's reward see what helps? (per decision of K held steps)\n",
        "Each fixed-alpha run scored under each signal as ATESD would score it (`engine/reward_audit.py`): the "
        "learning progress P of every K-step decision (a signal the runs did not measure where the controller "
        "would is left out; `engine.sweep --audit` measures them all), and, when the runs evaluated every K steps, "
        "the held-out accuracy change over the decision. Mean per decision over the runs.\n",
        "| alpha | gain | " + " | ".join(_SIGNAL_NAMES[k] for k in keys) + " |",
        "|---:|---|" + "---|" * len(keys),
    ]
    for r in fixed_rows:
        cells = " | ".join(fmt(r[f"progress_{k}"], r[f"progress_{k}_ci"], 4, sign=True) for k in keys)
        md.append(f"| {r['alpha']:g} | {fmt(r['gain'], r['gain_ci'], sign=True)} | {cells} |")
    if al.get("best_alpha") is None or not keys:
        return md
    md += [
        f"\nAcross alphas: rank correlation of each signal's mean with the gain (rho), and the best (alpha="
        f"{al['best_alpha']:g}) minus the worst (alpha={al['worst_alpha']:g}) alpha in per-decision standard "
        "deviations (separation).\n",
        "| signal | rho with gain | separation | decisions | runs |",
        "|---|---|---|---|---|",
    ]
    for k in keys:
        s = al[k]
        rho = "-" if s["rho"] is None else f"{s['rho']:+.2f}"
        sep = "-" if s["separation"] is None else f"{s['separation']:+.2f}"
        md.append(f"| {_SIGNAL_NAMES[k]} | {rho} | {sep} | {s['decisions']} | {s['runs']} |")
    return md


def _errorbar(ax, xs, rows, key, label, **kw) -> None:
    pts = [(x, r[key], r[key + "_ci"] or 0.0) for x, r in zip(xs, rows) if r[key] is not None]
    if pts:
        x, y, err = zip(*pts)
        ax.errorbar(x, y, yerr=err, capsize=3, label=label, **kw)


def figures(out: str, fixed_rows: list[dict], method_rows: list[dict]) -> list[str]:
    """The PNGs of the parts that have rows (error bars: 95% intervals over seeds); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if fixed_rows:
        xs = [r["alpha"] for r in fixed_rows]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        _errorbar(axes[0], xs, fixed_rows, "kl_start", f"first {START_STEPS} steps", marker="o")
        _errorbar(axes[0], xs, fixed_rows, "kl_mean", "whole run", marker="s", ls="--", color="gray")
        axes[0].set(xlabel="exposure alpha", ylabel="teacher-student KL per token", title="mismatch vs alpha")
        axes[0].legend(fontsize=8)
        _errorbar(axes[1], xs, fixed_rows, "top1_disagree_start", f"first {START_STEPS} steps", marker="o", color="C1")
        _errorbar(axes[1], xs, fixed_rows, "top1_disagree_mean", "whole run", marker="s", ls="--", color="gray")
        axes[1].set(xlabel="exposure alpha", ylabel="top-1 disagreement", title="top-1 disagreement vs alpha")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, "fig_mismatch_vs_alpha.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        _errorbar(axes[0], xs, fixed_rows, "accuracy_after", "after training", marker="o")
        _errorbar(axes[0], xs, fixed_rows, "accuracy_before", "before training", ls="--", color="gray")
        axes[0].set(xlabel="exposure alpha", ylabel="held-out accuracy", title="final accuracy vs alpha")
        axes[0].legend(fontsize=8)
        _errorbar(axes[1], xs, fixed_rows, "gain", "gain", marker="o", color="C2")
        axes[1].axhline(0.0, color="gray", lw=0.8)
        axes[1].set(xlabel="exposure alpha", ylabel="accuracy gain (after - before)", title="gain vs alpha")
        fig.tight_layout()
        paths.append(os.path.join(out, "fig_accuracy_vs_alpha.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if method_rows:
        names = [r["method"] for r in method_rows]
        fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(names) + 2), 3.6))
        for ax, key, title in ((axes[0], "accuracy_after", "final accuracy"), (axes[1], "gain", "gain over before")):
            vals = [r[key] if r[key] is not None else float("nan") for r in method_rows]
            errs = [r[key + "_ci"] or 0.0 for r in method_rows]
            ax.bar(range(len(names)), vals, yerr=errs, capsize=4, color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
            ax.set(ylabel=f"held-out {title}", title=title)
        before = [r["accuracy_before"] for r in method_rows if r["accuracy_before"] is not None]
        if before:
            axes[0].axhline(sum(before) / len(before), ls="--", color="gray", lw=1, label="before training")
            axes[0].legend(fontsize=8)
        axes[1].axhline(0.0, color="gray", lw=0.8)
        fig.suptitle("methods on the lab (mean, 95% interval over seeds)", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(out, "fig_methods.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
