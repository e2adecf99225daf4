"""Test helpers: tiny random Qwen3 + a character tokenizer with a Qwen-style chat template (no hub)."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's template, reduced: enable_thinking=False writes an empty think block, as Qwen3's does.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character (vocab ~105): every string round-trips exactly."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, hidden: int = 48, layers: int = 2) -> Qwen3ForCausalLM:
    """Random Qwen3; a wide init (0.3) gives peaked, context-dependent predictions, so the KL has signal."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.3,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(cfg).float().eval()


def write_dataset(path, n: int = 40, seed: int = 0, extra_bad: bool = True) -> str:
    """Two-step arithmetic problems, line-by-line solutions ending in \\boxed{}, as jsonl (+2 bad rows)."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
            sol = f"{a}+{b}={a + b}\n{a + b}*{c}={(a + b) * c}\nSo \\boxed{{{(a + b) * c}}}"
            f.write(json.dumps({"problem": f"({a}+{b})*{c}?", "solution": sol}) + "\n")
        if extra_bad:
            f.write(json.dumps({"problem": "x", "solution": "no answer here"}) + "\n")
            f.write(json.dumps({"problem": None, "solution": "\\boxed{1}"}) + "\n")
    return str(path)
