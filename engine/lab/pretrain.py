"""Reproducible pre-training of the tiny Qwen3-architecture lab model (the embedded default's checkpoint).

    python -m engine.lab.pretrain --out engine/lab/assets/tiny-qwen3 [--steps 1500 --seed 0]

Trains a BPE tokenizer and a ~0.9M-parameter Qwen3 from scratch on chat-formatted lab problems (train split),
loss on the assistant target only. Two prompt formats are mixed: the student format (problem only) and the
teacher format (problem + exposed reference with random alpha in [0, 1] + instruction, see prompts.py), so
the model learns to use a reference in its context. Levels are weighted towards the easy ones so the model
ends competent on levels 1-2 and weaker on 3-4, which leaves distillation something to teach.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from atesd.engine.lab.prompts import expose_reference, student_messages, teacher_messages
from atesd.engine.lab.task import _make, is_test_problem
from atesd.engine.lab.tokenizer import build_tokenizer

LEVEL_WEIGHTS = {1: 0.40, 2: 0.35, 3: 0.17, 4: 0.08}


def train_stream(seed: int):
    """Endless train-split problems with levels drawn from LEVEL_WEIGHTS."""
    rng = random.Random(f"pretrain-{seed}")
    levels, weights = zip(*LEVEL_WEIGHTS.items())
    while True:
        ex = _make(rng, rng.choices(levels, weights)[0])
        if not is_test_problem(ex["problem"]):
            yield ex


def build_example(tok, ex: dict, teacher: bool, rng: random.Random) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels -100 on the prompt; target = solution + <|im_end|>."""
    if teacher:
        mode = "lines" if rng.random() < 0.7 else "chars"
        msgs = teacher_messages(ex["problem"], expose_reference(ex["solution"], rng.random(), mode))
    else:
        msgs = student_messages(ex["problem"])
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    t_ids = tok(ex["solution"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    return p_ids + t_ids, [-100] * len(p_ids) + t_ids


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] input_ids / attention_mask / labels (labels -100 on padding)."""
    T = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def model_config(vocab_size: int, tok) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--teacher-frac", type=float, default=0.4, help="fraction of teacher-format batches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=50, help="test problems per level for the final report")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Tokenizer corpus: prompts and targets of both formats, from the train stream only.
    stream = train_stream(args.seed)
    corpus = []
    for _ in range(3000):
        ex = next(stream)
        corpus.append(ex["problem"] + "\n" + ex["solution"])
        corpus.append(teacher_messages(ex["problem"], ex["solution"])[0]["content"])
        corpus.append("user\nassistant\n")
    tok = build_tokenizer(corpus)
    model = Qwen3ForCausalLM(model_config(len(tok), tok))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}  params {n_params / 1e6:.2f}M", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
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

    model.train()
    t0, ema = time.time(), None
    for step in range(1, args.steps + 1):
        teacher = rng.random() < args.teacher_frac
        batch = collate(
            [build_example(tok, next(stream), teacher, rng) for _ in range(args.batch_size)], tok.pad_token_id
        )
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
    train_s = time.time() - t0

    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "teacher_frac": args.teacher_frac,
        "level_weights": LEVEL_WEIGHTS,
        "params": n_params,
        "train_seconds": round(train_s, 1),
        "threads": args.threads,
    }

    from atesd.engine.evaluate import evaluate_lab
    from atesd.engine.lab.task import lab_dataset

    test = lab_dataset("test", 4 * args.eval_n, seed=0)
    greedy = evaluate_lab(model, tok, test, temperature=0.0)
    sampled = evaluate_lab(model, tok, test, temperature=1.0, n_samples=4, seed=args.seed)
    info["test_greedy"] = greedy
    info["test_sampled_t1"] = sampled
    print(json.dumps(info, indent=1), flush=True)
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
