"""Shared by the examples: the models and tokenizer they train, and a tiny offline stand-in for CI.

``--tiny`` (the default when no model is named) builds random Qwen3 models with the lab's 320-token tokenizer,
which ships inside the package (no download): a student, and a teacher of a different hidden width with its own
head, to show that the fused op takes both. Otherwise the named Hugging Face models are loaded.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM


def tiny_tokenizer_path() -> str:
    import atesd.engine.lab as lab

    return os.path.join(os.path.dirname(lab.__file__), "assets", "tiny-qwen3")


def tiny_model(vocab_size: int, hidden: int, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config)


def load(args: argparse.Namespace, teacher_padding: int = 8) -> tuple[PreTrainedModel, PreTrainedModel, AutoTokenizer]:
    """(student, teacher, tokenizer); the teacher is frozen, in eval mode. The tiny teacher has its own hidden
    width and a vocabulary padded by ``teacher_padding`` rows (as Qwen checkpoints of different sizes have)."""
    if args.tiny:
        tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
        student = tiny_model(len(tokenizer), hidden=32, seed=0)
        teacher = tiny_model(len(tokenizer) + teacher_padding, hidden=48, seed=1)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.student)
        student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher or args.student, dtype=torch.bfloat16)
    teacher.eval().requires_grad_(False)
    return student, teacher, tokenizer


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--student", help="Hugging Face model id or path (default: --tiny)")
    p.add_argument("--teacher", help="teacher model id or path (default: the student's)")
    p.add_argument("--tiny", action="store_true", help="random tiny Qwen3 models, offline (CI)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps")
    p.add_argument("--output-dir", default=None, help="where a trainer may write (default: a temporary folder)")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    args.tiny = args.tiny or args.student is None
    return args


PROBLEMS = [
    ("What is 12 + 7?", "12 + 7 = 19. The answer is 19."),
    ("What is 9 * 3?", "9 * 3 = 27. The answer is 27."),
    ("What is 40 - 15?", "40 - 15 = 25. The answer is 25."),
    ("What is 6 + 6 + 6?", "6 + 6 = 12, 12 + 6 = 18. The answer is 18."),
]


def make_batch(tokenizer, rows: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Prompt + answer token ids, left-padded: input_ids, attention_mask [B, L] and labels [B, L] (the token ids,
    -100 on the prompt and the padding, so only the answer counts). Labels are not shifted here."""
    seqs = []
    for prompt, answer in rows:
        p = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append((p, a))
    width = max(len(p) + len(a) for p, a in seqs)
    pad = tokenizer.pad_token_id
    ids, mask, labels = [], [], []
    for p, a in seqs:
        n_pad = width - len(p) - len(a)
        ids.append([pad] * n_pad + p + a)
        mask.append([0] * n_pad + [1] * (len(p) + len(a)))
        labels.append([-100] * (n_pad + len(p)) + a)
    return {k: torch.tensor(v) for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states [B, L, H] that feed the LM head, through the model's own forward (so a
    DDP / FSDP wrapper's hooks run), with logits only for the last position (``logits_to_keep=1``: no [B, L, V])."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                use_cache=False)
    return out.hidden_states[-1]


def load_student(args: argparse.Namespace) -> tuple[PreTrainedModel, AutoTokenizer]:
    """The student and the tokenizer alone, as ``load`` builds them (for a trainer whose teacher runs elsewhere)."""
    if args.tiny:
        tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
        return tiny_model(len(tokenizer), hidden=32, seed=0), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    return AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32), tokenizer


def load_teacher(args: argparse.Namespace, teacher_padding: int = 8) -> PreTrainedModel:
    """The teacher alone (frozen, eval mode), as ``load`` builds it (for the process or job that serves it)."""
    if args.tiny:
        tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
        teacher = tiny_model(len(tokenizer) + teacher_padding, hidden=48, seed=1)
    else:
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher or args.student, dtype=torch.bfloat16)
    return teacher.eval().requires_grad_(False)
