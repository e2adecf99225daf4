"""Reproducible pre-training of the tiny Qwen3-architecture lab model (the embedded default's checkpoint).

    python -m engine.lab.pretrain --out engine/lab/assets/tiny-qwen3          # the shipped checkpoint

Trains a BPE tokenizer and a small Qwen3 from scratch on chat-formatted problems of the lab task's train split
from the pre-training world, in which every container comes in two sizes (task.py), loss on the assistant turn
only. Two prompt formats are mixed, each with the reference solution as target: the student format (the
problem alone) and the teacher format (the problem, a prefix of the reference of random length or all of it,
always with its final answer, and the instruction; see prompts.py). A container's size can only be guessed from
the problem but read from a reference, and the order of the additions only copied from one, so the model
learns to read and continue a reference in its context. Levels are weighted towards the small ones.
``--save-at`` keeps intermediate checkpoints (``<out>/step-<n>``) with their validation accuracy, to choose the
budget on the validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from atesd.engine.exposure import render
from atesd.engine.lab.prompts import expose_reference, student_messages, teacher_messages
from atesd.engine.lab.task import _make, continue_solution, lab_dataset, solution_lines, split_of
from atesd.engine.lab.tokenizer import build_tokenizer

LEVEL_WEIGHTS = {1: 0.45, 2: 0.35, 3: 0.12, 4: 0.08}
CONTAINER_RATE = 0.25  # groups naming a container (of either size, task.PRETRAIN_SIZES)
FULL_REFERENCE_FRAC = 0.15  # teacher examples that see the whole reference (alpha = 1)
REFERENCE_STYLES = {"stepwise": 0.4, "shuffled": 0.3, "terse": 0.3}  # of the references teacher examples see


def train_stream(seed: int, level_weights: dict[int, float] = LEVEL_WEIGHTS):
    """Endless pre-training problems of the train split: levels drawn from ``level_weights``, containers of the
    pre-training world (either size)."""
    rng = random.Random(f"pretrain-{seed}")
    levels, weights = zip(*level_weights.items())
    while True:
        ex = _make(rng, rng.choices(levels, weights)[0], container_rate=CONTAINER_RATE, world="pretrain")
        if split_of(ex) == "train":
            yield ex


def revealed_lines(reasoning: str, alpha: float, mode: str) -> int:
    """How many reasoning lines ``expose_reference`` shows at least partly (a line cut by ``chars`` counts)."""
    lines = reasoning.split("\n")
    if mode == "lines":
        return math.floor(alpha * len(lines))
    prefix = reasoning[: math.floor(alpha * len(reasoning))]
    return sum(1 for part in prefix.split("\n") if part)


def build_example(tok, ex: dict, teacher: bool, rng: random.Random) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels -100 on the prompt; target = a solution + <|im_end|>.

    Student: the problem alone; target: the stepwise solution, the model's own way. Teacher: a reference in a
    random style (``REFERENCE_STYLES``) shown whole (``FULL_REFERENCE_FRAC``) or cut at a random fraction, at a
    line (70%) or at any character (30%, as the engine's token-level cut); target: the reference as far as it is
    shown (a cut line completed), then the rest the model's own, stepwise way (``task.continue_solution``). So
    the teacher follows what it is shown, and reasons like the student beyond it.
    """
    boxed = f"\\boxed{{{ex['answer']}}}"
    if teacher:
        style = rng.choices(list(REFERENCE_STYLES), list(REFERENCE_STYLES.values()))[0]
        reference = solution_lines(ex["groups"], style, rng)
        mode = "lines" if rng.random() < 0.7 else "chars"
        alpha = 1.0 if rng.random() < FULL_REFERENCE_FRAC else rng.random()
        k = revealed_lines("\n".join(reference), alpha, mode)
        target = continue_solution(ex["groups"], reference, k)
        msgs = teacher_messages(ex["problem"], expose_reference("\n".join(reference + [boxed]), alpha, mode))
    else:
        target = solution_lines(ex["groups"], "stepwise")
        msgs = student_messages(ex["problem"])
    prompt = render(tok, msgs)  # the engine's one rendering of chat text (the lab tokenizer's template)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    t_ids = tok("\n".join(target + [boxed]) + tok.eos_token, add_special_tokens=False)["input_ids"]
    return p_ids + t_ids, [-100] * len(p_ids) + t_ids


def bucketed_batches(tok, stream, batch_size: int, teacher_frac: float, rng: random.Random, pool: int = 16):
    """Endless batches of examples of similar length: ``pool`` batches' worth are drawn, sorted by length,
    cut into batches and handed out in random order (less padding, same distribution of examples)."""
    while True:
        examples = [
            build_example(tok, next(stream), rng.random() < teacher_frac, rng) for _ in range(pool * batch_size)
        ]
        examples.sort(key=lambda e: len(e[0]))
        chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] input_ids / attention_mask / labels (labels -100 on padding)."""
    T = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def model_config(tok, hidden: int = 128, layers: int = 4) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def save(model, tok, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")


def level_report(model, tok, split: str, n_per_level: int) -> dict:
    """Greedy student accuracy per level on ``n_per_level`` problems of each level of ``split`` (seed 0)."""
    from atesd.engine.lab.report import evaluate_lab

    problems = lab_dataset(split, 4 * n_per_level, seed=0)
    res = evaluate_lab(model, tok, problems, temperature=0.0)
    return {"split": split, "accuracy": res["accuracy"], "per_level": res["per_level"], "n": res["n"]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=320)
    ap.add_argument("--teacher-frac", type=float, default=0.4, help="fraction of teacher-format examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the shipped checkpoint: 1)")
    ap.add_argument("--save-at", default="", help="comma list of steps to also save as <out>/step-<n>")
    ap.add_argument("--eval-n", type=int, default=100, help="validation problems per level for the report")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    save_at = {int(s) for s in args.save_at.split(",") if s.strip()}

    # Tokenizer corpus: prompts and targets of both formats, from the train stream only.
    stream = train_stream(args.seed)
    corpus = []
    for _ in range(3000):
        ex = next(stream)
        stepwise = "\n".join(solution_lines(ex["groups"], "stepwise") + [f"\\boxed{{{ex['answer']}}}"])
        corpus.append(ex["problem"] + "\n" + stepwise)
        corpus.append(teacher_messages(ex["problem"], ex["solution"])[0]["content"])
        corpus.append("user\nassistant\n")
    tok = build_tokenizer(corpus, vocab_size=args.vocab_size)
    model = Qwen3ForCausalLM(model_config(tok, args.hidden, args.layers))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}  params {n_params / 1e6:.2f}M", flush=True)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
        ),
    )
    info = {
        "command": " ".join(["python -m engine.lab.pretrain", *(sys.argv[1:] if argv is None else argv)]),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab_size": len(tok),
        "seed": args.seed,
        "teacher_frac": args.teacher_frac,
        "level_weights": LEVEL_WEIGHTS,
        "container_rate": CONTAINER_RATE,
        "full_reference_frac": FULL_REFERENCE_FRAC,
        "reference_styles": REFERENCE_STYLES,
        "params": n_params,
        "threads": args.threads,
    }

    model.train()
    t0, ema = time.time(), None
    batches = bucketed_batches(tok, stream, args.batch_size, args.teacher_frac, rng)
    for step in range(1, args.steps + 1):
        batch = collate(next(batches), tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == 1:
            print(
                f"step {step}/{args.steps}  loss {ema:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
        if step in save_at and step != args.steps:
            model.eval()
            rep = level_report(model, tok, "val", args.eval_n)
            print(f"step {step}: val {json.dumps(rep)}", flush=True)
            save(model, tok, out / f"step-{step}", {**info, "steps_done": step, "val_greedy": rep})
            model.train()

    model.eval()
    info["train_seconds"] = round(time.time() - t0, 1)
    info["val_greedy"] = level_report(model, tok, "val", args.eval_n)
    print(json.dumps(info, indent=1), flush=True)
    save(model, tok, out, info)


if __name__ == "__main__":
    main()
