"""Teacher-pass throughput with and without prefix sharing (DESIGN 4.2).

    pytest benchmarks/bench_prefix_sharing.py --benchmark -s

One problem's teacher work is G=4 rollouts of R tokens plus the credit branch, all behind the same
[prompt ; exposed reference] of P + 4R tokens (reference 4x the rollout length, alpha = 1 as in OPSD).

    shared    the packed tree: prompt and reference computed once per problem (engine.scoring)
    unshared  every root-to-leaf path as its own row of a padded batch, plain causal attention

Figure of merit: rollout tokens scored per second (the tokens the loss needs). Shapes: a small random Qwen3
on CPU, and Qwen3-1.7B's architecture (random weights, bf16) when CUDA is available;
BENCH_PREFIX_SHAPES=small,1.7b overrides. The model is random: throughput depends on the shape only.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from atesd.engine.models import decoder
from atesd.engine.packing import Segment, pack
from atesd.engine.scoring import attention_used, hidden_states, paths

SHAPES = {
    # name: (model config kwargs, problems B, prompt P, rollout R)
    "small": (
        dict(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            vocab_size=1024,
        ),
        2,
        64,
        64,
    ),
    "1.7b": (
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
        ),
        2,
        256,
        1024,
    ),
}
G = 4


def _shapes() -> list[str]:
    env = os.environ.get("BENCH_PREFIX_SHAPES")
    if env:
        return env.split(",")
    return ["small", "1.7b"] if torch.cuda.is_available() else ["small"]


def _setup(shape: str):
    kwargs, B, P, R = SHAPES[shape]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = Qwen3Config(
        max_position_embeddings=16384, tie_word_embeddings=False, attn_implementation="sdpa", **kwargs
    )
    model = Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    V = kwargs["vocab_size"]
    ids = lambda n: torch.randint(10, V, (n,)).tolist()  # noqa: E731
    trees = []
    for _ in range(B):  # a teacher tree's shape (engine.scoring.teacher_tree): prompt -> rollouts + credit branch
        prompt = ids(P + 4 * R + 8 + 16)  # head, revealed reasoning, answer line, tail
        trees.append([Segment(prompt)] + [Segment(ids(R), 0) for _ in range(G)] + [Segment(ids(4 * R + 8), 0)])
    return model, trees, B * G * R, device


def _unshared_batch(model, trees, device):
    rows = [p[0].tokens for t in trees for p in paths(t)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: causal attention never sees the pads of a row
        ids[i, : len(r)], attn[i, : len(r)] = torch.tensor(r), 1
    return decoder(model)(
        input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False
    ).last_hidden_state


@pytest.mark.parametrize("shape", _shapes())
@pytest.mark.parametrize("mode", ["shared", "unshared"])
def test_teacher_pass_throughput(benchmark, shape, mode):
    model, trees, rollout_tokens, device = _setup(shape)
    attention = "flex" if device == "cuda" else "dense"
    packed = pack(trees)

    def run():
        with torch.no_grad():
            if mode == "shared":
                out = hidden_states(model, packed, attention)
            else:
                out = _unshared_batch(model, trees, device)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    processed = packed.numel if mode == "shared" else sum(len(p[0].tokens) for t in trees for p in paths(t))
    # the path that ran (a flex failure runs the dense mask and says so), not the one asked for
    used = attention_used() if mode == "shared" else "sdpa causal"
    benchmark.extra_info.update(
        rollout_tokens_per_s=rollout_tokens / seconds,
        tokens_processed=processed,
        attention=used,
        device=device,
    )
    print(
        f"\n[prefix-sharing] {shape:5s} {mode:8s} {device}: {rollout_tokens / seconds:10.1f} rollout tok/s, "
        f"{processed} tokens through the model, median {seconds * 1e3:.1f} ms, attention {used}"
    )
