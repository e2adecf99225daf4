"""The paper's lab experiments: fixed-exposure sweep (Fig. 2) and method comparison over seeds (Table 1).

    python -m engine.sweep                                    # both parts, 5 seeds, 2 jobs x 1 thread
    python -m engine.sweep --out runs/sweep-a                 # a chosen output directory (reruns reuse it)
    python -m engine.sweep --parts methods --methods adaptive,full --seeds 0,1,2,3
    python -m engine.sweep --steps 20 --eval-problems 50 -- --lr 5e-4 --max-new-tokens 64

1. fixed exposure: ``fixed:<alpha>`` for every ``--alphas`` x ``--seeds``: per-token teacher-student KL (``kl``,
   token-weighted mean over the run) and top-1 disagreement (1 - ``top1_agree``) vs alpha, final held-out
   accuracy and gain (after - before) vs alpha; paired over seeds, the change of KL and disagreement between
   consecutive alphas (the paper's monotone mismatch growth) and each interior alpha's accuracy minus that of
   alpha = 1 (suboptimality of full exposure); and whether ATESD's reward would rank the alphas like the gain
   (``engine.reward_audit``: its per-decision learning progress under each signal the runs measured, with
   ``--audit`` all three, and, with ``-- --eval-every K``, the held-out accuracy change per decision).
2. methods: every ``--methods`` exposure spec (``controller.build``; ``full`` is OPSD, alpha=1) x ``--seeds``:
   final accuracy and gain, and ATESD (``adaptive``, else the first method) minus each other one and minus the
   best fixed alpha, paired over seeds.

Every statistic is a mean with its 95% t-interval over seeds; a paired difference also gets its paired t.
Each run is ``python -m engine.train --exposure <spec> --seed <s> --output-dir <out>/<spec>-seed<s>`` plus the
pass-through flags; runs shared by both parts (``full`` == ``fixed:1``) run once. A run whose ``summary.json``
exists is reused and one with checkpoints is resumed, so an interrupted sweep continues where it stopped.
Outputs in ``--out``: ``sweep.md`` (tables, also printed), ``fig_mismatch_vs_alpha.png``,
``fig_accuracy_vs_alpha.png``, ``fig_methods.png`` (error bars: 95% intervals) and ``results.json`` (every
run's summary, the aggregated rows and the paired tests). Flags after ``--`` go to every training run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed

from atesd.engine import reward_audit
from atesd.engine.sweep_report import (
    aggregate,
    canonical,
    comparisons,
    figures,
    fmt,
    run_name,
    run_statistics,
    tables,
)

DEFAULT_ALPHAS = "0,0.25,0.5,0.75,1"
DEFAULT_METHODS = "adaptive,full,random,adaptive-onestep"
DEFAULT_SEEDS = "0,1,2,3,4"
RESERVED = ("--exposure", "--seed", "--output-dir", "--resume", "--stop-after", "--config")
CONFIG_FILE = "sweep_config.json"
# --audit: what the fixed-alpha runs add so that every signal can be scored (FixedExposure measures the probe accuracy
# where an accuracy controller would, the probe NLL every step); measuring never changes training
AUDIT_FLAGS = ["--controller-signal", "accuracy", "--probe-every", "1"]


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
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="training seeds of every run (default: %(default)s)")
    p.add_argument(
        "--methods", default=DEFAULT_METHODS, help="exposure specs compared in part 2 (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None, help="problems per step (default: the recipe's)")
    p.add_argument(
        "--eval-problems", type=int, default=None, help="held-out lab problems (default: the recipe's)"
    )
    p.add_argument(
        "--audit",
        action="store_true",
        help="fixed-alpha runs also measure every controller signal (" + " ".join(AUDIT_FLAGS) + " on those runs "
        "only), so the reward audit scores loss, accuracy and probe NLL; the methods keep the plain flags",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="parallel worker processes; 1 trains in this process (default: min(2, CPU cores))",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per job (default: max(1, CPU cores // jobs))"
    )
    return p


def _train_one(argv: list[str], threads: int, log_path: str) -> dict:
    """Train one run (in this process) with its stdout and stderr (warnings) in ``log_path``; returns its
    summary.json."""
    import torch

    from atesd.engine.invocation import parse
    from atesd.engine.run import train

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.time()
    try:
        with open(log_path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
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
    bad = [f for f in extra if f.split("=", 1)[0] in RESERVED + (tuple(AUDIT_FLAGS[::2]) if args.audit else ())]
    if bad:
        reserved = RESERVED + (tuple(AUDIT_FLAGS[::2]) if args.audit else ())
        raise SystemExit(f"error: the sweep sets {', '.join(reserved)} itself; drop {' '.join(bad)}")
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
    from atesd.engine.invocation import parse

    try:
        parse(common)  # a bad pass-through flag fails here, not in every run
    except ValueError as e:  # engine.errors.UsageError: one line naming the flag
        raise SystemExit(f"error: {e}") from None
    out = args.out or os.path.join("runs", f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, CONFIG_FILE)
    fixed_args = common + (AUDIT_FLAGS if args.audit else [])  # the fixed-alpha runs' flags
    if os.path.exists(cfg_path):
        with open(cfg_path) as fh:
            saved = json.load(fh)
        before = (saved["train_args"], saved.get("fixed_args", saved["train_args"]))
        if before != (common, fixed_args):
            raise SystemExit(
                f"error: {out} holds runs made with train flags {before[0]} (fixed alphas: {before[1]}), not "
                f"{common} (fixed alphas: {fixed_args}); use another --out"
            )
    with open(cfg_path, "w") as fh:
        json.dump({"train_args": common, "fixed_args": fixed_args}, fh, indent=1)

    # the plan: one run per (canonical spec, seed), shared by both parts
    keys = [canonical(f"fixed:{a}") for a in alphas] + [canonical(m) for m in methods]
    plan = list(dict.fromkeys((k, s) for k in keys for s in seeds))
    results: dict[str, dict] = {}
    todo = []
    for key, seed in plan:
        run_dir = os.path.join(out, run_name(key, seed))
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            with open(os.path.join(run_dir, "summary.json")) as fh:
                summary = json.load(fh)
            results[f"{key}/seed{seed}"] = {**summary, **run_statistics(run_dir), "reused": True}
            continue
        resume = os.path.isdir(os.path.join(run_dir, "checkpoints")) and any(
            d.startswith("step-") for d in os.listdir(os.path.join(run_dir, "checkpoints"))
        )
        flags = fixed_args if key.startswith("fixed:") else common  # full == fixed:1 is measured too
        argv_run = ["--exposure", key, "--seed", str(seed), "--output-dir", run_dir, *flags]
        argv_run += ["--resume"] if resume else []
        todo.append((f"{key}/seed{seed}", argv_run, os.path.join(run_dir, "train.log")))
    print(
        f"sweep {out}: {len(plan)} runs ({len(plan) - len(todo)} finished already), "
        f"{args.jobs} job(s) x {threads} thread(s)",
        flush=True,
    )
    from tqdm import tqdm

    t_start = time.time()
    bar = tqdm(total=len(todo), desc="sweep", unit="run", file=sys.stderr, disable=not todo)

    def report(i: int, rid: str, res: dict) -> None:
        if "error" not in res:
            res.update(run_statistics(res["run_dir"]))
        results[rid] = res
        if "error" in res:
            line = f"[{i}/{len(todo)}] {rid}: FAILED: {res['error']}"
        else:
            line = (
                f"[{i}/{len(todo)}] {rid}: accuracy {fmt(res['accuracy_before'])} -> "
                f"{fmt(res['accuracy_after'])}, KL {fmt(res['kl_mean'], digits=4)}, "
                f"top-1 disagreement {fmt(res['top1_disagree_mean'])} ({res['wall_s']:.0f} s)"
            )
        bar.write(line, file=sys.stdout)
        sys.stdout.flush()
        bar.update(1)

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
    bar.close()
    wall = time.time() - t_start

    def ok(key: str) -> list[dict]:
        return [r for s in seeds if "error" not in (r := results[f"{key}/seed{s}"])]

    fixed_rows = [{"alpha": a, "exposure": (k := canonical(f"fixed:{a}")), **aggregate(ok(k))} for a in alphas]
    method_rows = [{"method": m, "exposure": canonical(m), **aggregate(ok(canonical(m)))} for m in methods]
    audit_note = f" (fixed alphas: + `{' '.join(AUDIT_FLAGS)}`)" if args.audit else ""
    header = (
        f"`python -m engine.sweep {' '.join(argv)}{' -- ' + ' '.join(extra) if extra else ''}`: seeds "
        f"{','.join(map(str, seeds))}; train flags `{' '.join(common)}`"
        f"{audit_note}; {len(todo)} runs trained in "
        f"{wall / 60:.1f} min ({args.jobs} job(s) x {threads} thread(s), {os.cpu_count()} CPU cores)"
        f"{f', {len(plan) - len(todo)} reused from an earlier invocation' if len(plan) > len(todo) else ''}; "
        f"{time.strftime('%Y-%m-%d')}."
    )
    comp = comparisons(fixed_rows, method_rows)
    if fixed_rows:
        dirs = {
            r["alpha"]: [os.path.join(out, run_name(r["exposure"], s)) for s in r["seeds"]] for r in fixed_rows
        }
        comp["reward_alignment"] = reward_audit.alignment(dirs, {r["alpha"]: r["gain"] for r in fixed_rows})
    md = tables(fixed_rows, method_rows, header, comp)
    with open(os.path.join(out, "sweep.md"), "w") as fh:
        fh.write(md)
    print(md)
    figs = figures(out, fixed_rows, method_rows)
    summary = {
        "out": out,
        "train_args": common,
        "fixed_args": fixed_args,
        "seeds": seeds,
        "alphas": alphas,
        "methods": methods,
        "fixed_exposure": fixed_rows,
        "method_comparison": method_rows,
        "paired_tests": comp,
        "wall_s": round(wall, 1),
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
