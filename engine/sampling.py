"""Sharding-invariant token draws: which tokens a rollout gets depends only on (seed, step, global problem index,
sample index, token position), never on which other rows share its batch, process or micro-batch.

Each rollout row (problem j, sample g) owns a stream of uniforms ``u[t]``, one per token position, drawn up front
from its own generator seeded by those ids; token t is the inverse CDF of the row's (filtered) next-token
distribution at ``u[t]``:

    token = min { v : cdf[v] > u[t] * cdf[V-1] },    cdf = cumsum(probs) in float64

so a row samples the same tokens alone, in any batch, on any rank, when finished rows leave the batch, and with a
longer ``max_new_tokens`` (a prefix of the longer draw). ``torch.multinomial`` over a batch has none of these
properties: its draws for one row depend on the rows drawn before it.

Both rollout loops draw through this module (the HF reference loop, ``engine/hf_rollout.py``, and the static-cache
loop, ``engine/decode.py``): the reference filter (:func:`filter_logits`: temperature, top-k, top-p), its
top-k-only equivalent (:func:`top_k_draw`), one token per row without a host sync (:func:`next_token`), and the
prompt padding and EOS cut both loops share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_U64 = 2**64
TIE_MARGIN = 64  # top-k candidates taken beyond k, so tokens tied with the k-th logit are kept as filter_logits does


def _mix(*ids: int) -> int:
    """A 64-bit seed from integer ids, well mixed (numpy's SeedSequence hash), the same on every platform."""
    words = np.random.SeedSequence([int(i) % _U64 for i in ids]).generate_state(2, np.uint32)
    return (int(words[0]) << 32) | int(words[1])


def problem_seeds(seed: int, step: int, problem_indices: Sequence[int]) -> list[int]:
    """One seed per problem of a step, from (run seed, step, the problem's index in the step's global batch)."""
    return [_mix(seed, step, j) for j in problem_indices]


def row_uniforms(
    seeds: Sequence[int], num_samples: int, length: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniforms in [0, 1) for rows (problem b, sample g) in the order b-major: [len(seeds) * num_samples, length]
    float64 on ``device``. Row (b, g) is drawn on the CPU from its own generator seeded by (seeds[b], g), so it is
    the same whichever device samples and whichever other rows are present."""
    out = torch.empty(len(seeds) * num_samples, length, dtype=torch.float64)
    gen = torch.Generator()
    for b, s in enumerate(seeds):
        for g in range(num_samples):
            gen.manual_seed(_mix(s, g))
            torch.rand(length, generator=gen, dtype=torch.float64, out=out[b * num_samples + g])
    return out.to(device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [R] long drawn from ``probs`` [R, V] (rows need not be normalised; zeros are never drawn) at the
    uniforms ``u`` [R] in [0, 1). Pure tensor ops: no host synchronisation, compile-friendly."""
    cdf = probs.to(torch.float64).cumsum(-1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total: keep x strictly below it, so a zero-probability tail is never hit
    x = torch.minimum(u.to(torch.float64)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def rollout_seeds(
    num_prompts: int, seeds: Sequence[int] | None, generator: torch.Generator | None
) -> Sequence[int]:
    """One seed per prompt: ``seeds`` as given (:func:`problem_seeds`), else drawn from ``generator``."""
    if seeds is None:
        device = getattr(generator, "device", "cpu")
        return torch.randint(2**62, (num_prompts,), generator=generator, device=device).tolist()
    if len(seeds) != num_prompts:
        raise ValueError(f"one seed per prompt: {num_prompts} prompts, {len(seeds)} seeds")
    return seeds


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k, then the smallest set of tokens with probability mass >= top_p: [B, V] -> [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """One token per row from fp32 logits [n, V] -> [n] int64, without a host sync.

    ``u is None`` or ``temperature <= 0``: greedy argmax. Otherwise the reference loop's draw: the reference filter
    (divide by the temperature, keep the top-k, then the smallest prefix whose mass reaches top-p), softmax, and
    the inverse CDF at the rows' uniforms ``u`` [n] float64 in [0, 1) (:func:`inverse_cdf`): token i is drawn
    with its filtered probability. With a top-k, only the k (+ ties) candidates are sorted and summed
    (:func:`top_k_draw`); without one, the whole vocabulary goes through :func:`filter_logits`.
    """
    if u is None or temperature <= 0:
        return logits.argmax(-1)
    if 0 < top_k < logits.shape[-1]:
        return top_k_draw(logits / temperature, u, top_k, top_p)
    return inverse_cdf(filter_logits(logits / temperature, top_k, top_p).softmax(-1), u)


def top_k_draw(scores: torch.Tensor, u: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``inverse_cdf(filter_logits(scores, top_k, top_p).softmax(-1), u)`` over the top-k candidates only.

    The same tokens: filter_logits keeps the tokens >= the k-th score (ties included: ``TIE_MARGIN`` more
    candidates are taken), then drops those whose preceding mass in descending order reaches top_p; the
    filtered softmax is zero elsewhere, so its CDF in vocabulary order only steps at the kept candidates, which
    are put in vocabulary order here. Sums over K values instead of V can round differently in the last bit, so
    a draw can differ only where ``u`` falls within float rounding of a CDF step. Cost: a top-(k+margin)
    selection instead of a sort of the vocabulary (which is what makes sampling a third of a step at V=32k).
    """
    vals, ids = torch.topk(scores, min(top_k + TIE_MARGIN, scores.shape[-1]), dim=-1)  # descending
    vals = vals.masked_fill(vals < vals[:, top_k - 1 : top_k], float("-inf"))
    if top_p < 1.0:
        probs = vals.softmax(-1)
        vals = vals.masked_fill((probs.cumsum(-1) - probs) >= top_p, float("-inf"))
    order = ids.argsort(-1)  # candidates in vocabulary order: the reference CDF's order
    probs = vals.gather(-1, order).softmax(-1)
    return ids.gather(-1, order).gather(-1, inverse_cdf(probs, u)[:, None]).squeeze(-1)


# ------------------------------------------------------------------------------------ what both loops share
class RolloutLoop:
    """The contract of both rollout loops (``hf_rollout.HFRollout``, ``decode.StaticRollout``): :meth:`sample`
    checks the request and draws the prompts' seeds once; each loop implements ``_sample`` over them."""

    def sample(
        self,
        prompts: list[list[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        eos_ids: set[int],
        pad_id: int,
        temperature: float = 1.1,
        top_p: float = 0.95,
        top_k: int = 20,
        generator: torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[list[int]]]:
        """Rollouts [B][G] as token lists, each non-empty, ending at (and including) the first EOS drawn.

        ``seeds``: one per prompt (:func:`problem_seeds`); without them, one per prompt is drawn from
        ``generator``. Row (prompt b, sample g) depends only on the weights and ``seeds[b]``; ``temperature`` 0 is
        greedy."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not prompts or num_samples < 1 or any(len(p) == 0 for p in prompts):
            raise ValueError("rollouts need at least one prompt, none of them empty, and num_samples >= 1")
        if temperature > 0:
            seeds = rollout_seeds(len(prompts), seeds, generator)
        return self._sample(prompts, num_samples, max_new_tokens, eos_ids, pad_id, temperature, top_p, top_k, seeds)

    def _sample(self, prompts, G, max_new, eos_ids, pad_id, temperature, top_p, top_k, seeds):
        raise NotImplementedError


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: (ids [B, W] long, attention mask [B, W] long), on the CPU."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    return ids, attn


def cut_at_eos(seqs: list[list[int]], num_samples: int, eos_ids: set[int]) -> list[list[list[int]]]:
    """Rows (prompt b, sample g) b-major, each ending at (and including) its first EOS, as [B][G] token lists."""
    out: list[list[list[int]]] = []
    for b in range(len(seqs) // num_samples):
        group = []
        for seq in seqs[b * num_samples : (b + 1) * num_samples]:
            cut = next((i + 1 for i, x in enumerate(seq) if x in eos_ids), len(seq))
            group.append(seq[:cut])
        out.append(group)
    return out
