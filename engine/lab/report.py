"""Per-level accuracy of a lab model as student (problem only) and as teacher (exposed reference, per alpha).

    python -m engine.lab.report [--model engine/lab/assets/tiny-qwen3 --n-per-level 50]

Prints a markdown table: greedy and sampled (rollout settings T=1.1, top_p 0.95, top_k 20) student accuracy,
and greedy teacher accuracy at alpha in {0, 0.5, 1}, on the held-out test split.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atesd.engine.evaluate import evaluate_lab
from atesd.engine.lab import TINY_MODEL_DIR, lab_dataset
from atesd.engine.lab.prompts import expose_reference, teacher_messages


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=TINY_MODEL_DIR)
    ap.add_argument("--n-per-level", type=int, default=50)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    test = lab_dataset("test", 4 * args.n_per_level, seed=0)
    rows = {
        "student greedy": evaluate_lab(model, tok, test),
        f"student T=1.1 (Average@{args.samples})": evaluate_lab(
            model, tok, test, n_samples=args.samples, temperature=1.1, top_p=0.95, top_k=20
        ),
    }
    for alpha in (0.0, 0.5, 1.0):

        def teacher(p: dict, a: float = alpha) -> list[dict]:
            return teacher_messages(p["problem"], expose_reference(p["solution"], a))

        rows[f"teacher alpha={alpha:g} greedy"] = evaluate_lab(model, tok, test, messages_fn=teacher)
    print(f"| {'':32s} | " + " | ".join(f"L{lv}" for lv in (1, 2, 3, 4)) + " | all |")
    print("|" + "---|" * 6)
    for name, r in rows.items():
        cells = " | ".join(f"{r['per_level'][lv]:.2f}" for lv in (1, 2, 3, 4))
        print(f"| {name:32s} | {cells} | {r['accuracy']:.2f} |")
    out = {k: {"accuracy": v["accuracy"], "per_level": v["per_level"]} for k, v in rows.items()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
