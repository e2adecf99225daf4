"""Accuracy of a lab model as student (problem only) and as teacher (exposed reference, per alpha).

    python -m engine.lab.report [--model engine/lab/assets/tiny-qwen3 --split val --n-per-level 100]

Prints a markdown table on the chosen split (``val`` by default: settings are chosen there, never on ``test``):
greedy student accuracy, sampled student accuracy at the rollout settings (T=1.1, top_p 0.95, top_k 20), and
greedy teacher accuracy with the reference exposed at alpha in {0, 0.25, 0.5, 0.75, 1} (cut by characters, as
the engine's token-level cut), per level and split by whether a problem names a container (whose size only the
reference states).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atesd.engine.evaluation import evaluate_task
from atesd.engine.lab import TINY_MODEL_DIR, lab_dataset
from atesd.engine.lab.prompts import expose_reference, teacher_messages
from atesd.engine.lab.recipe import TASK

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def evaluate_lab(
    model,
    tokenizer,
    problems: Sequence[dict],
    *,
    n_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    seed: int = 0,
    keep_results: bool = False,
    messages_fn: Callable[[dict], list[dict]] | None = None,
) -> dict:
    """Lab-task accuracy (:func:`evaluate_task` with the ``lab`` task): ``{"accuracy", "per_level", "n",
    "n_samples", "pass@k"}``. ``temperature=0`` is greedy; accuracy is Average@n over ``n_samples`` samples
    otherwise. ``messages_fn`` as in :func:`evaluate_problems` (default: the lab's student prompt)."""
    return evaluate_task(
        model, tokenizer, problems, TASK, n_samples=n_samples, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
        keep_results=keep_results, messages_fn=messages_fn,
    )


def breakdown(problems: list[dict], result: dict) -> dict[str, float]:
    """Average@n per ``L<level>`` and per ``L<level>+c`` / ``L<level>-c`` (with / without a container)."""
    cells: dict[str, list[float]] = defaultdict(list)
    for p, r in zip(problems, result["results"]):
        cells[f"L{p['level']}"].append(r["frac_correct"])
        cells[f"L{p['level']}{'+c' if p['containers'] else '-c'}"].append(r["frac_correct"])
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}


def report(model, tok, problems: list[dict], samples: int = 4) -> dict[str, dict]:
    """``{row name: {"accuracy", "cells"}}`` for the student (greedy, sampled) and the teacher per alpha."""
    rows = {
        "student greedy": evaluate_lab(model, tok, problems, keep_results=True),
        f"student T=1.1 (Average@{samples})": evaluate_lab(
            model, tok, problems, n_samples=samples, temperature=1.1, top_p=0.95, top_k=20, keep_results=True
        ),
    }
    for alpha in ALPHAS:

        def teacher(p: dict, a: float = alpha) -> list[dict]:
            return teacher_messages(p["problem"], expose_reference(p["solution"], a, "chars"))

        rows[f"teacher alpha={alpha:g} greedy"] = evaluate_lab(
            model, tok, problems, messages_fn=teacher, keep_results=True
        )
    return {name: {"accuracy": r["accuracy"], "cells": breakdown(problems, r)} for name, r in rows.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=TINY_MODEL_DIR)
    ap.add_argument("--split", default="val", choices=("val", "test", "train"))
    ap.add_argument("--levels", default="1,2", help="comma list of levels (default: %(default)s)")
    ap.add_argument("--n-per-level", type=int, default=100)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    levels = tuple(int(x) for x in args.levels.split(","))
    problems = lab_dataset(args.split, len(levels) * args.n_per_level, seed=0, levels=levels)
    out = report(model, tok, problems, args.samples)
    cols = list(next(iter(out.values()))["cells"])
    print(f"{args.split} split, {len(problems)} problems; +c: names a container, -c: does not\n")
    print(f"| {'':34s} | all | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * (len(cols) + 1))
    for name, r in out.items():
        print(f"| {name:34s} | {r['accuracy']:.2f} | " + " | ".join(f"{r['cells'][c]:.2f}" for c in cols) + " |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
