"""Sharding-invariant sampling (engine/sampling.py): it samples the filtered distribution, never a filtered-out token,
and a row's draws do not depend on the other rows of its batch."""

import torch
from engine_tiny import build_model

from atesd.engine.hf_rollout import sample
from atesd.engine.sampling import filter_logits, inverse_cdf, problem_seeds, row_uniforms

LOGITS = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -0.2, -1.0, -3.0, 0.9, 1.1, -0.5, 0.1])


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_samples_the_filtered_distribution():
    n, t = 40_000, 5  # 40k rows, each with its own uniform stream; the token drawn at position t
    probs = filter_logits(LOGITS[None] / 1.1, top_k=6, top_p=0.9).softmax(-1)[0]
    support = int((probs > 0).sum())
    assert 2 < support < 6  # both filters cut something
    u = row_uniforms(problem_seeds(0, 1, range(n)), 1, t + 1)[:, t]
    tokens = inverse_cdf(probs.expand(n, -1), u)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    assert counts[probs == 0].sum() == 0  # filtered-out tokens never drawn
    # chi-square with support-1 <= 4 degrees of freedom: 23.5 is its 1e-4 upper quantile
    assert _chi2(counts, probs.double()) < 23.5
    # the test has power: the same draws are far from the unfiltered distribution
    assert _chi2(counts, (LOGITS / 1.1).softmax(-1).double()) > 1000


def test_inverse_cdf_edges():
    probs = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0]])  # unnormalised, zeros inside and at both ends
    u = torch.tensor([0.0, 0.5, 0.666, 0.667, 1.0 - 2**-53])
    assert inverse_cdf(probs.expand(5, -1), u).tolist() == [1, 1, 1, 3, 3]


def test_a_rows_draws_do_not_depend_on_its_batch(tiny_tokenizer):
    model = build_model(len(tiny_tokenizer))
    texts = ["a long prompt, longer", "hi", "(3+4)*2?", "x"]
    prompts = [tiny_tokenizer(t)["input_ids"] for t in texts]
    seeds = problem_seeds(0, 3, range(4))
    kw = dict(
        num_samples=2,
        max_new_tokens=10,
        eos_ids={tiny_tokenizer.eos_token_id},
        pad_id=tiny_tokenizer.pad_token_id,
        temperature=1.1,
    )
    together = sample(model, prompts, seeds=seeds, **kw)
    halves = sample(model, prompts[:2], seeds=seeds[:2], **kw) + sample(model, prompts[2:], seeds=seeds[2:], **kw)
    alone = [sample(model, [p], seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert together == halves == alone
    assert len({tuple(r) for g in together for r in g}) > 4  # real draws, different per row
    longer = sample(model, prompts, seeds=seeds, **{**kw, "max_new_tokens": 16})
    assert all(
        long[: len(short)] == short for gs, gl in zip(together, longer) for short, long in zip(gs, gl)
    )  # a longer cap extends the same draws
