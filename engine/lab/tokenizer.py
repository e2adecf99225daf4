"""A small BPE tokenizer for the lab task, wrapped as a ``PreTrainedTokenizerFast`` with a Qwen chat template.

Digits and punctuation are always single tokens (so arithmetic stays digit-level); runs of letters and spaces
are merged by BPE learned on the lab corpus, which roughly halves sequence length versus characters.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train BPE (``vocab_size`` incl. specials and all printable ASCII) on ``corpus``; chat template set."""
    alphabet = sorted(set(string.printable) - set("\x0b\x0c\r"))
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(alphabet) + len(SPECIAL_TOKENS)} base tokens "
            "(printable ASCII and the special tokens)"
        )
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    # Every char that is not a letter or space is its own piece; BPE merges only within letter/space runs.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^A-Za-z ]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
