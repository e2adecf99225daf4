"""Rollouts: one shared prefill per prompt samples as running each prompt alone does; top-k and top-p."""

import torch
from engine_tiny import build_model

from atesd.engine.hf_rollout import sample
from atesd.engine.sampling import filter_logits


def test_shared_prefill_matches_separate(tiny_tokenizer):
    model = build_model(len(tiny_tokenizer))
    prompts = [tiny_tokenizer("a longer prompt here")["input_ids"], tiny_tokenizer("hi")["input_ids"]]
    kw = dict(max_new_tokens=10, eos_ids={tiny_tokenizer.eos_token_id}, pad_id=tiny_tokenizer.pad_token_id)
    both = sample(model, prompts, num_samples=3, temperature=0.0, **kw)
    for p, group in zip(prompts, both):
        alone = sample(model, [p], num_samples=1, temperature=0.0, **kw)[0][0]
        assert all(r == alone for r in group) and 1 <= len(alone) <= 10
    # sampled: reproducible from the generator, G distinct draws
    draw = lambda: sample(model, prompts, num_samples=3, generator=torch.Generator().manual_seed(1), **kw)  # noqa: E731
    a, b = draw(), draw()
    assert a == b and len({tuple(r) for r in a[0]}) > 1


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.81)).tolist() == [[False, False, False, True]]
