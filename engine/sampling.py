"""Sharding-invariant token draws: which tokens a rollout gets depends only on (seed, step, global problem index,
sample index, token position), never on which other rows share its batch, process or micro-batch.

Each rollout row (problem j, sample g) owns a stream of uniforms ``u[t]``, one per token position, drawn up front
from its own generator seeded by those ids; token t is the inverse CDF of the row's (filtered) next-token
distribution at ``u[t]``:

    token = min { v : cdf[v] > u[t] * cdf[V-1] },    cdf = cumsum(probs) in float64

so a row samples the same tokens alone, in any batch, on any rank, when finished rows leave the batch, and with a
longer ``max_new_tokens`` (a prefix of the longer draw). ``torch.multinomial`` over a batch has none of these
properties: its draws for one row depend on the rows drawn before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_U64 = 2**64


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
