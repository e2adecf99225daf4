"""The paper's Table 1 in one command: ``python -m engine.reproduce --model qwen3-1.7b``.

Trains OPSD (full exposure, ``--exposure full``) and ATESD (``--exposure adaptive``) with the same seed, data and
budget, evaluating every saved checkpoint (``--eval-every`` = ``--save-every``; the Qwen3 recipes: AIME 2024,
AIME 2025 and HMMT Feb 2025 at steps 25/50/75/100 with the paper's protocol, Average@12), then writes into
``--output-dir`` (default ``runs/reproduce-<model>``):

    opsd/, atesd/            the two training runs (each a normal run directory)
    table.md                 Table 1's shape: best Average@n per benchmark over the trained checkpoints (the
                             step in parentheses), their mean, and the base model (step 0) as its own row
    accuracy_vs_steps.png    accuracy against steps, one panel per benchmark
    reproduce.json           the numbers behind both

Every other flag goes to both runs unchanged (``--data``, ``--steps``, ``--seed``, ``--eval-benchmarks``, ...;
``python -m engine.train --help``). Run it again with the same ``--output-dir`` after an interruption: a finished
run is kept, an unfinished one resumes from its last checkpoint. Works under any launcher
(``torchrun --nproc_per_node 8 -m engine.reproduce --model qwen3-8b``): both runs use all ranks; rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from atesd.engine import checkpoint, distributed, threads
from atesd.engine.errors import UsageError
from atesd.engine.invocation import parse
from atesd.engine.options import OneLineParser

METHODS = {"opsd": ("full", "OPSD (full exposure)"), "atesd": ("adaptive", "ATESD (adaptive exposure)")}
OWNED = ("--exposure", "--output-dir", "--output_dir", "--resume")


def _flags(rest: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in rest if a.startswith("--")}


def run_method(method: str, out: str, rest: list[str]) -> str:
    """Train (or resume, or keep) ``out/<method>``; returns its run directory."""
    from atesd.engine.run import train

    run_dir = os.path.join(out, method)
    argv = [*rest, "--exposure", METHODS[method][0], "--output-dir", run_dir]
    cfg, _ = parse(argv)
    if "--eval-every" not in _flags(rest) and "--eval_every" not in _flags(rest):
        argv += ["--eval-every", str(cfg.save_every)]  # evaluate every saved checkpoint
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        print(f"{method}: finished before, kept ({run_dir})", flush=True)
        return run_dir
    resume = ["--resume", run_dir] if checkpoint.checkpoints(run_dir) else []
    print(f"{method}: {'resuming' if resume else 'training'} {run_dir}", flush=True)
    cfg, target = parse(argv + resume)
    return train(cfg, target)


def collect(runs: dict[str, str]) -> dict:
    """Per benchmark: the base model's accuracy, and per method the best trained checkpoint and the history."""
    table: dict = {"benchmarks": {}, "runs": runs, "unfinished": []}
    for method, run_dir in runs.items():
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            table["unfinished"].append(method)
        with open(os.path.join(run_dir, "eval_summary.json")) as fh:
            benches = json.load(fh)["benchmarks"]
        for name, b in benches.items():
            row = table["benchmarks"].setdefault(name, {"base": None, "methods": {}})
            if b.get("base") and row["base"] is None:
                row["base"] = b["base"]["accuracy"]
            row["methods"][method] = {"best": b["best"],
                                      "history": [(e["step"], e["accuracy"]) for e in b["history"]],
                                      "n_samples": b["history"][-1].get("n_samples", 1)}
    return table


def markdown(table: dict, model: str) -> str:
    names = list(table["benchmarks"])
    n = {m["n_samples"] for b in table["benchmarks"].values() for m in b["methods"].values()}
    metric = f"Average@{n.pop()}" if len(n) == 1 else "accuracy"

    def cells(values: list[float | None], steps: list[int | None] | None = None) -> list[str]:
        out = []
        for i, v in enumerate(values):
            s = "-" if v is None else f"{100 * v:.2f}"
            if steps and steps[i] is not None and v is not None:
                s += f" ({steps[i]})"
            out.append(s)
        real = [v for v in values if v is not None]
        return out + [f"{100 * sum(real) / len(real):.2f}" if len(real) == len(values) and real else "-"]

    lines = [f"| {model} | " + " | ".join(names) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    lines.append("| Base | " + " | ".join(cells([table["benchmarks"][b]["base"] for b in names])) + " |")
    for method, (_, label) in METHODS.items():
        if not any(method in table["benchmarks"][b]["methods"] for b in names):
            continue
        best = [table["benchmarks"][b]["methods"].get(method, {}).get("best") for b in names]
        lines.append(f"| {label} | " + " | ".join(cells([x and x["accuracy"] for x in best],
                                                         [x and x["step"] for x in best])) + " |")
    partial = (f"**Partial**: {', '.join(table['unfinished'])} stopped before the last step; run the same command "
               "again to finish.\n\n" if table.get("unfinished") else "")
    return (f"{partial}{metric} (%) per benchmark, best trained checkpoint (its step in parentheses); Base is the "
            "model before training (step 0), never a candidate for best.\n\n" + "\n".join(lines) + "\n")


def plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table["benchmarks"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, data in table["benchmarks"][name]["methods"].items():
            steps, acc = zip(*data["history"])
            ax.plot(steps, [100 * a for a in acc], marker="o", label=METHODS[method][1])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """engine.reproduce's own flags; any other flag goes to both runs' engine.train."""
    ap = OneLineParser(prog="python -m engine.reproduce", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset, hub id or local directory (as engine.train)")
    ap.add_argument("--output-dir", default=None, help="default runs/reproduce-<model>")
    ap.add_argument("--methods", default="opsd,atesd", help="comma list of opsd, atesd (default both)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = build_parser().parse_known_args(argv)
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise UsageError(f"--methods: unknown {bad or methods}; choose from {', '.join(METHODS)}")
        owned = sorted(_flags(rest) & set(OWNED))
        if owned:
            raise UsageError(f"{owned[0]}: engine.reproduce sets it for each run (use --output-dir for the pair)")
        out = args.output_dir or os.path.join("runs", f"reproduce-{os.path.basename(args.model.rstrip('/'))}")
        rest = ["--model", args.model, *rest]
        cfg, _ = parse(rest)  # every flag checked before anything trains
        kind = distributed.device_of(cfg.device).type
        on_cpu = threads.configured(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), follow=True)
        with distributed.process_group(kind, cfg.dist_timeout), on_cpu if kind == "cpu" else contextlib.nullcontext():
            runs = {m: run_method(m, out, rest) for m in methods}
            table = collect(runs)
            if distributed.is_main():
                text = markdown(table, args.model)
                with open(os.path.join(out, "table.md"), "w") as fh:
                    fh.write(text)
                with open(os.path.join(out, "reproduce.json"), "w") as fh:
                    json.dump(table, fh, indent=1)
                plot(table, os.path.join(out, "accuracy_vs_steps.png"))
                print(text + f"\nwritten: {out}/table.md, accuracy_vs_steps.png, reproduce.json", flush=True)
        return table
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as e:
        if "--debug" in argv:
            raise
        where = getattr(e, "run_log", None)
        more = f"the traceback is in {where}" if where else "run with --debug for the traceback"
        print(f"error: {type(e).__name__}: {e} ({more})", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
