"""The paper's lab experiments: fixed-exposure sweep (Fig. 2) and method comparison over seeds (Table 1).

    python -m engine.sweep                                    # both parts, tiny model on the lab, 1 job
    python -m engine.sweep --jobs 2 --out runs/sweep-a        # two worker processes, one torch thread each
    python -m engine.sweep --parts methods --methods adaptive,full --seeds 0,1,2,3
    python -m engine.sweep --steps 20 --eval-problems 50 -- --lr 5e-4 --max-new-tokens 64

1. fixed exposure: ``fixed:<alpha>`` for every ``--alphas`` x ``--seeds``: per-token teacher-student KL (``kl``,
   token-weighted mean over the run) and top-1 disagreement (1 - ``top1_agree``) vs alpha, final held-out
   accuracy and gain (after - before) vs alpha.
2. methods: every ``--methods`` exposure spec (``controller.build``; ``full`` is OPSD, alpha=1) x ``--seeds``:
   final accuracy and gain, mean and std over seeds.

Each run is ``python -m engine.train --exposure <spec> --seed <s> --output-dir <out>/<spec>-seed<s>`` plus the
pass-through flags; runs shared by both parts (``full`` == ``fixed:1``) run once. A run whose ``summary.json``
exists is reused and one with checkpoints is resumed, so an interrupted sweep continues where it stopped.
Outputs in ``--out``: ``sweep.md`` (tables, also printed), ``fig_mismatch_vs_alpha.png``,
``fig_accuracy_vs_alpha.png``, ``fig_methods.png`` (error bars: sample std over seeds) and ``results.json``
(every run's summary plus the aggregated rows). Flags after ``--`` go to every training run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed

DEFAULT_ALPHAS = "0,0.25,0.5,0.75,1"
DEFAULT_METHODS = "adaptive,full,fixed:0.5,random,adaptive-onestep"
RESERVED = ("--exposure", "--seed", "--output-dir", "--resume", "--stop-after", "--config")
CONFIG_FILE = "sweep_config.json"


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


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} must be a comma list of numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] [-- train flags...]",
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/sweep-<time>)")
    p.add_argument(
        "--parts",
        default="fixed,methods",
        help="which parts to run: fixed (alpha sweep), methods (comparison) or both (default: %(default)s)",
    )
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help="fixed exposures of part 1 (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds of every run (default: %(default)s)")
    p.add_argument(
        "--methods", default=DEFAULT_METHODS, help="exposure specs compared in part 2 (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None, help="problems per step (default: the recipe's)")
    p.add_argument(
        "--eval-problems", type=int, default=None, help="held-out lab problems (default: the recipe's)"
    )
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default: 1, in-process)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per job (default: max(1, CPU cores // jobs))"
    )
    return p


def _train_one(argv: list[str], threads: int, log_path: str) -> dict:
    """Train one run (in this process) with its stdout in ``log_path``; returns its summary.json."""
    import torch

    from atesd.engine.config import parse
    from atesd.engine.train import train

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.time()
    try:
        with open(log_path, "a") as fh, contextlib.redirect_stdout(fh):
            try:
                run_dir = train(*parse(argv))
            except Exception:
                fh.write(traceback.format_exc())
                raise
    finally:
        torch.set_num_threads(saved)
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    summary["wall_s"] = round(time.time() - t0, 1)
    return summary


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (0 for one value; None for none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _aggregate(summaries: list[dict]) -> dict:
    out: dict = {"runs": len(summaries), "seeds": [s["seed"] for s in summaries]}
    for k in ("kl_mean", "top1_disagree_mean", "accuracy_before", "accuracy_after", "gain", "alpha_mean"):
        out[k], out[k + "_std"] = _mean_std([s.get(k) for s in summaries])
    out["accuracy_after_per_seed"] = [s.get("accuracy_after") for s in summaries]
    return out


def _fmt(m: float | None, s: float | None = None, digits: int = 3, sign: bool = False) -> str:
    if m is None:
        return "-"
    text = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return text if s is None else f"{text} ± {s:.{digits}f}"


def tables(fixed_rows: list[dict], method_rows: list[dict], header: str) -> str:
    """Markdown of both parts (a part without rows is left out)."""
    md = [f"# ATESD lab sweep\n\n{header}\n"]
    if fixed_rows:
        md += [
            "## Fixed exposure: mismatch and accuracy vs alpha\n",
            "| alpha | runs | KL per token | top-1 disagreement | accuracy before | accuracy after | gain |",
            "|---:|---:|---|---|---|---|---|",
        ]
        for r in fixed_rows:
            md.append(
                f"| {r['alpha']:g} | {r['runs']} | {_fmt(r['kl_mean'], r['kl_mean_std'], 4)} "
                f"| {_fmt(r['top1_disagree_mean'], r['top1_disagree_mean_std'])} "
                f"| {_fmt(r['accuracy_before'])} | {_fmt(r['accuracy_after'], r['accuracy_after_std'])} "
                f"| {_fmt(r['gain'], r['gain_std'], sign=True)} |"
            )
        md.append("")
    if method_rows:
        md += [
            "## Methods: final held-out accuracy over seeds\n",
            "| method | runs | accuracy after | gain over before | mean alpha | KL per token | after, per seed |",
            "|---|---:|---|---|---|---|---|",
        ]
        for r in method_rows:
            per_seed = ", ".join("-" if a is None else f"{a:.3f}" for a in r["accuracy_after_per_seed"])
            md.append(
                f"| {r['method']} | {r['runs']} | {_fmt(r['accuracy_after'], r['accuracy_after_std'])} "
                f"| {_fmt(r['gain'], r['gain_std'], sign=True)} | {_fmt(r['alpha_mean'], digits=2)} "
                f"| {_fmt(r['kl_mean'], digits=4)} | {per_seed} |"
            )
        md.append("")
    md.append("Mean ± sample std over seeds; KL and top-1 disagreement are token-weighted means over each run.\n")
    return "\n".join(md)


def _errorbar(ax, xs, rows, key, label, **kw) -> None:
    pts = [(x, r[key], r[key + "_std"]) for x, r in zip(xs, rows) if r[key] is not None]
    if pts:
        x, y, err = zip(*pts)
        ax.errorbar(x, y, yerr=err, capsize=3, label=label, **kw)


def figures(out: str, fixed_rows: list[dict], method_rows: list[dict]) -> list[str]:
    """The PNGs of the parts that have rows; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if fixed_rows:
        xs = [r["alpha"] for r in fixed_rows]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        _errorbar(axes[0], xs, fixed_rows, "kl_mean", "KL", marker="o")
        axes[0].set(xlabel="exposure alpha", ylabel="teacher-student KL per token", title="mismatch vs alpha")
        _errorbar(axes[1], xs, fixed_rows, "top1_disagree_mean", "top-1", marker="o", color="C1")
        axes[1].set(xlabel="exposure alpha", ylabel="top-1 disagreement", title="top-1 disagreement vs alpha")
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
            errs = [r[key + "_std"] or 0.0 for r in method_rows]
            ax.bar(range(len(names)), vals, yerr=errs, capsize=4, color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
            ax.set(ylabel=f"held-out {title}", title=title)
        before = [r["accuracy_before"] for r in method_rows if r["accuracy_before"] is not None]
        if before:
            axes[0].axhline(sum(before) / len(before), ls="--", color="gray", lw=1, label="before training")
            axes[0].legend(fontsize=8)
        axes[1].axhline(0.0, color="gray", lw=0.8)
        fig.suptitle("methods on the lab (mean ± std over seeds)", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(out, "fig_methods.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict:
    """Run (or continue) the sweep; returns the content of results.json."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)

    from atesd import controller

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"fixed", "methods"}:
        raise SystemExit(f"error: --parts must name fixed and/or methods, got {args.parts!r}")
    alphas = _floats(args.alphas, "--alphas") if "fixed" in parts else []
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise SystemExit(f"error: --alphas must lie in [0, 1], got {args.alphas!r}")
    seeds = [int(s) for s in _floats(args.seeds, "--seeds")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if "methods" in parts else []
    if not seeds or ("fixed" in parts and not alphas) or ("methods" in parts and not methods):
        raise SystemExit("error: need at least one seed, and alphas / methods for the parts asked for")
    for m in methods:
        try:
            controller.build(m)
        except ValueError as e:
            raise SystemExit(f"error: --methods: {e}") from None
    bad = [f for f in extra if f.split("=", 1)[0] in RESERVED]
    if bad:
        raise SystemExit(f"error: the sweep sets {', '.join(RESERVED)} itself; drop {' '.join(bad)}")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)

    common = ["--no-progress"]
    for flag, v in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if v is not None:
            common += [flag, str(v)]
    if args.eval_problems is not None:
        common += ["--eval-problems", str(args.eval_problems)]
    common += extra
    from atesd.engine.config import parse

    try:
        parse(common)  # a bad pass-through flag fails here, not in every run
    except ValueError as e:  # engine.errors.UsageError: one line naming the flag
        raise SystemExit(f"error: {e}") from None
    out = args.out or os.path.join("runs", f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, CONFIG_FILE)
    if os.path.exists(cfg_path):
        with open(cfg_path) as fh:
            before = json.load(fh)["train_args"]
        if before != common:
            raise SystemExit(
                f"error: {out} holds runs made with train flags {before}, not {common}; use another --out"
            )
    with open(cfg_path, "w") as fh:
        json.dump({"train_args": common}, fh, indent=1)

    # the plan: one run per (canonical spec, seed), shared by both parts
    keys = [canonical(f"fixed:{a}") for a in alphas] + [canonical(m) for m in methods]
    plan = list(dict.fromkeys((k, s) for k in keys for s in seeds))
    results: dict[str, dict] = {}
    todo = []
    for key, seed in plan:
        run_dir = os.path.join(out, run_name(key, seed))
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            with open(os.path.join(run_dir, "summary.json")) as fh:
                results[f"{key}/seed{seed}"] = {**json.load(fh), "reused": True}
            continue
        resume = os.path.isdir(os.path.join(run_dir, "checkpoints")) and any(
            d.startswith("step-") for d in os.listdir(os.path.join(run_dir, "checkpoints"))
        )
        argv_run = ["--exposure", key, "--seed", str(seed), "--output-dir", run_dir, *common]
        argv_run += ["--resume"] if resume else []
        todo.append((f"{key}/seed{seed}", argv_run, os.path.join(run_dir, "train.log")))
    print(
        f"sweep {out}: {len(plan)} runs ({len(plan) - len(todo)} finished already), "
        f"{args.jobs} job(s) x {threads} thread(s)",
        flush=True,
    )

    def report(i: int, rid: str, res: dict) -> None:
        results[rid] = res
        if "error" in res:
            print(f"[{i}/{len(todo)}] {rid}: FAILED: {res['error']}", flush=True)
        else:
            print(
                f"[{i}/{len(todo)}] {rid}: accuracy {_fmt(res['accuracy_before'])} -> "
                f"{_fmt(res['accuracy_after'])}, KL {_fmt(res['kl_mean'], digits=4)}, "
                f"top-1 disagreement {_fmt(res['top1_disagree_mean'])} ({res['wall_s']:.0f} s)",
                flush=True,
            )

    if args.jobs == 1:
        for i, (rid, argv_run, log_path) in enumerate(todo, 1):
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            try:
                res = _train_one(argv_run, threads, log_path)
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                res = {"error": f"{type(e).__name__}: {e}"}
            report(i, rid, res)
    elif todo:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {}
            for rid, argv_run, log_path in todo:
                os.makedirs(os.path.dirname(log_path), exist_ok=True)
                futures[pool.submit(_train_one, argv_run, threads, log_path)] = rid
            for i, fut in enumerate(as_completed(futures), 1):
                try:
                    res = fut.result()
                except Exception as e:  # noqa: BLE001
                    res = {"error": f"{type(e).__name__}: {e}"}
                report(i, futures[fut], res)

    def ok(key: str) -> list[dict]:
        return [r for s in seeds if "error" not in (r := results[f"{key}/seed{s}"])]

    fixed_rows = [{"alpha": a, "exposure": (k := canonical(f"fixed:{a}")), **_aggregate(ok(k))} for a in alphas]
    method_rows = [{"method": m, "exposure": canonical(m), **_aggregate(ok(canonical(m)))} for m in methods]
    header = (
        f"Tiny lab runs: seeds {','.join(map(str, seeds))}; train flags `{' '.join(common)}`; "
        f"{time.strftime('%Y-%m-%d')}."
    )
    md = tables(fixed_rows, method_rows, header)
    with open(os.path.join(out, "sweep.md"), "w") as fh:
        fh.write(md)
    print(md)
    figs = figures(out, fixed_rows, method_rows)
    summary = {
        "out": out,
        "train_args": common,
        "seeds": seeds,
        "alphas": alphas,
        "methods": methods,
        "fixed_exposure": fixed_rows,
        "method_comparison": method_rows,
        "figures": [os.path.basename(p) for p in figs],
        "runs": results,
    }
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    failed = [rid for rid, r in results.items() if "error" in r]
    print(f"wrote {out}/sweep.md, results.json, {', '.join(summary['figures'])}", flush=True)
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (see their train.log)")
    return summary


def cli() -> None:
    """Console-script entry point (``atesd-sweep``): :func:`main` without its return value."""
    main()


if __name__ == "__main__":
    main()
