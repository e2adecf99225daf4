"""The reference rollout loop (``--rollout hf``): Hugging Face's model, one eager forward per token.

Prompts are left-padded into one batch with explicit position ids and prefilled once; the cache is repeated G
times (``batch_repeat_interleave``), so a prompt's KV serves its G samples, and every further token is one eager
HF forward over a DynamicCache, finished rows kept in the batch to the end. Tokens are drawn as every loop draws
them (``engine/sampling.py``); ``engine/decode.py`` is the fast loop that gives the same rollouts.
"""

from __future__ import annotations

import torch

from atesd.engine.sampling import RolloutLoop, cut_at_eos, filter_logits, inverse_cdf, left_pad, row_uniforms


class HFRollout(RolloutLoop):
    """The reference loop behind the rollout contract (``sampling.RolloutLoop.sample``)."""

    name = "hf"

    def __init__(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def _sample(self, prompts, G, max_new, eos_ids, pad_id, temperature, top_p, top_k, seeds):
        model = self.model
        device = next(model.parameters()).device
        B = len(prompts)
        ids, attn = left_pad(prompts, pad_id)
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
            uniforms = row_uniforms(seeds, G, max_new, device)
        tokens = []
        for t in range(max_new):
            scores = filter_logits(logits / temperature, top_k, top_p) if temperature > 0 else logits
            if temperature > 0:
                probs = scores.softmax(-1)
                tok = inverse_cdf(probs, uniforms[:, t])
            else:
                tok = scores.argmax(-1)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            tokens.append(tok)
            done = done | torch.isin(tok, eos)
            if bool(done.all()) or t == max_new - 1:
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
        return cut_at_eos(torch.stack(tokens, 1).cpu().tolist(), G, eos_ids)


def sample(model, prompts: list[list[int]], **kw) -> list[list[list[int]]]:
    """Rollouts of ``model`` through the reference loop: ``HFRollout(model).sample(prompts, **kw)``, the keywords
    of ``sampling.RolloutLoop.sample`` (num_samples, max_new_tokens, eos_ids, pad_id, temperature, top_p, top_k,
    generator, seeds)."""
    return HFRollout(model).sample(prompts, **kw)
