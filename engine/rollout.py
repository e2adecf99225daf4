"""On-policy rollouts: each prompt is prefilled once and its KV cache is shared by its G samples.

Two implementations behind one ``sample(prompts, ...)`` contract, chosen by ``--rollout`` (:func:`build_rollout`):

- ``hf``: :func:`sample`, the reference loop. Prompts are left-padded into one batch with explicit position ids,
  prefilled, the cache is repeated G times (``batch_repeat_interleave``) and every token is one eager HF forward
  over a DynamicCache, finished rows kept to the end.
- ``static`` / ``compiled``: ``engine/decode.py``, a static KV cache, finished rows leaving the batch, LoRA merged
  into fused copies, sampling on device; ``compiled`` puts each decode step through ``torch.compile`` (CUDA graphs
  on GPU).

Both draw tokens with temperature / top-k / top-p by inverse-CDF sampling at per-row uniforms
(``engine/sampling.py``): row (prompt b, sample g) depends only on the weights and ``seeds[b]``, whatever else is
in the batch, so the ranks of a data-parallel run sample what one process would, and the implementations give
the same rollouts for the same seeds (up to float ties; ``tests/engine/test_rollout_static.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from atesd.engine.sampling import inverse_cdf, row_uniforms

log = logging.getLogger("engine")
ROLLOUTS = ("auto", "hf", "static", "compiled")


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


def rollout_seeds(
    num_prompts: int, seeds: Sequence[int] | None, generator: torch.Generator | None
) -> Sequence[int]:
    """One seed per prompt: ``seeds`` as given (``sampling.problem_seeds``), else drawn from ``generator``."""
    if seeds is None:
        device = getattr(generator, "device", "cpu")
        return torch.randint(2**62, (num_prompts,), generator=generator, device=device).tolist()
    if len(seeds) != num_prompts:
        raise ValueError(f"one seed per prompt: {num_prompts} prompts, {len(seeds)} seeds")
    return seeds


@torch.no_grad()
def sample(
    model,
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

    ``seeds``: one per prompt (``sampling.problem_seeds``); without them, they are drawn from ``generator``."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    B, G = len(prompts), num_samples
    width = max(map(len, prompts))
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(G)
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)
    attn = attn.repeat_interleave(G, 0)
    next_pos = pos[:, -1:].repeat_interleave(G, 0) + 1
    eos = torch.tensor(sorted(eos_ids), device=device)
    done = torch.zeros(B * G, dtype=torch.bool, device=device)
    if temperature > 0:
        uniforms = row_uniforms(rollout_seeds(B, seeds, generator), G, max_new_tokens, device)
    tokens = []
    for t in range(max_new_tokens):
        scores = filter_logits(logits / temperature, top_k, top_p) if temperature > 0 else logits
        if temperature > 0:
            probs = scores.softmax(-1)
            tok = inverse_cdf(probs, uniforms[:, t])
        else:
            tok = scores.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done = done | torch.isin(tok, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(
            input_ids=tok[:, None],
            attention_mask=attn,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1].float(), next_pos + 1
    seqs = torch.stack(tokens, 1).cpu().tolist()
    result: list[list[list[int]]] = []
    for b in range(B):
        group = []
        for g in range(G):
            seq = seqs[b * G + g]
            cut = next((i + 1 for i, x in enumerate(seq) if x in eos_ids), len(seq))
            group.append(seq[:cut])
        result.append(group)
    return result


class HFRollout:
    """The reference loop (:func:`sample`) behind the rollout-engine interface."""

    name = "hf"

    def __init__(self, model) -> None:
        self.model = model

    def sample(self, prompts: list[list[int]], **kw) -> list[list[list[int]]]:
        return sample(self.model, prompts, **kw)


def build_rollout(kind: str, model, device: torch.device | str | None = None):
    """The rollout engine for ``--rollout kind``, built once per run; ``.sample(prompts, ...)`` as :func:`sample`.

    ``auto`` picks per device (measured, benchmarks/RESULTS.md): on CUDA the compiled static-cache loop
    (launch-bound decoding is what CUDA graphs remove); on CPU the eager static-cache loop, because inductor's
    compile time (tens of seconds) outweighs what it saves on a short CPU run. A model the static decoder does not
    implement (or sharded weights) gets ``hf`` under ``auto`` (logged) and an error under ``static``/``compiled``.
    """
    from atesd.engine.decode import StaticRollout, unsupported
    from atesd.engine.errors import UsageError

    if kind not in ROLLOUTS:
        raise UsageError(f"--rollout: {kind!r} is not one of {', '.join(ROLLOUTS)}")
    if kind == "hf":
        log.info("rollout: hf (the eager HF loop)")
        return HFRollout(model)
    reason = unsupported(model)
    if reason:
        if kind != "auto":
            raise UsageError(f"--rollout {kind}: the static decoder does not support this model: {reason}")
        log.info("rollout: %s; using the HF loop (--rollout hf)", reason)
        return HFRollout(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    compiled = kind == "compiled" or (kind == "auto" and device.type == "cuda")
    engine = StaticRollout(model, compile=compiled)
    log.info("rollout: %s", engine.name)
    return engine
