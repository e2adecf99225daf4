"""The static-cache rollout loop (engine/decode.py) against the reference HF loop (engine/hf_rollout.py: sample).

Greedy: token-identical on random Qwen3s (GQA, MQA, attention bias) and the shipped tiny model, with LoRA merged
or not, rows finishing early (compaction) and any host-check cadence. Sampling: the same seeds give the same
rollouts token for token (both loops take the inverse CDF at each row's own uniforms, engine/sampling.py), a row
samples the same alone as in a batch, and the sampler and the whole loop draw from the exact reference
distribution (chi-square tests with a fixed budget, each shown to reject a deliberately wrong sampler). Also: the
model's weights are never written, adapter updates are seen, a failing compile falls back (logged) to the same
rollouts, and the compiled path's bucketing keeps results unchanged.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import pytest
import torch
from engine_tiny import build_model
from transformers import Qwen3Config, Qwen3ForCausalLM

from atesd.engine import decode, sampling
from atesd.engine.decode import StaticRollout
from atesd.engine.hf_rollout import HFRollout, sample
from atesd.engine.models import add_lora
from atesd.engine.rollout import build_rollout
from atesd.engine.sampling import filter_logits, inverse_cdf, next_token, problem_seeds
from atesd.engine.trainer import TIMING_METRICS


def lora_model(base, r: int = 8, seed: int = 0, scale: float = 0.3):
    """peft LoRA on every projection with a random (non-zero) B, so the adapter changes the outputs."""
    model = add_lora(base, r, 2 * r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def random_qwen3(vocab: int, *, hidden=64, layers=2, heads=4, kv_heads=2, bias=False, seed=0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        attention_bias=bias,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.3,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(cfg).float().eval()


def prompts_of(tok) -> list[list[int]]:
    return [tok(s)["input_ids"] for s in ("a longer prompt here", "hi", "(3+4)*5=?", "x")]


def early_eos(model, prompts, max_new: int) -> set[int]:
    """An EOS id that ends greedy rows at different steps, some early and at least one never (so rows leave the
    batch one by one and the loop still runs to ``max_new``)."""
    ref = sample(model, prompts, num_samples=1, max_new_tokens=max_new, eos_ids=set(), pad_id=0, temperature=0.0)
    rows = [g[0] for g in ref]

    def ends(t: int) -> list[int]:
        return [r.index(t) if t in r else max_new for r in rows]

    best = max({t for r in rows for t in r}, key=lambda t: (max_new in ends(t), len(set(ends(t)))))
    return {best}


def greedy(engine_or_model, prompts, eos, max_new, G=2):
    kw = dict(num_samples=G, max_new_tokens=max_new, eos_ids=eos, pad_id=0, temperature=0.0)
    if isinstance(engine_or_model, (StaticRollout, HFRollout)):
        return engine_or_model.sample(prompts, **kw)
    return sample(engine_or_model, prompts, **kw)


# --------------------------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize(
    "shape",
    [dict(), dict(kv_heads=1, bias=True, layers=3), dict(heads=8, kv_heads=2, hidden=64)],
    ids=["gqa", "mqa-bias", "gqa4"],
)
def test_greedy_token_identical_random_qwen3(tiny_tokenizer, shape):
    model = lora_model(random_qwen3(len(tiny_tokenizer), **shape))
    prompts = prompts_of(tiny_tokenizer)
    eos = early_eos(model, prompts, 24)
    ref = greedy(model, prompts, eos, 24)
    assert len({len(r) for g in ref for r in g}) > 1  # rows really end at different steps
    for merge in (True, False):
        for every in (1, 5):
            got = greedy(StaticRollout(model, merge=merge, check_every=every), prompts, eos, 24)
            assert got == ref, (merge, every)


def test_greedy_token_identical_tiny_model():
    from atesd.engine.models import load_model

    pytest.importorskip("atesd.engine.lab")
    base, tok = load_model("tiny")
    model = lora_model(base, r=16, scale=0.02)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False, enable_thinking=False
        )
        for q in ("Compute 12+7*3.", "What is (4+5)*6?", "Compute 81-9.")
    ]
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = {tok.eos_token_id}
    ref = sample(model, prompts, num_samples=2, max_new_tokens=64, eos_ids=eos, pad_id=tok.pad_token_id, temperature=0)
    for merge in (True, False):
        got = StaticRollout(model, merge=merge).sample(
            prompts, num_samples=2, max_new_tokens=64, eos_ids=eos, pad_id=tok.pad_token_id, temperature=0
        )
        assert got == ref
    # sampled as in training (T=1.1, top-k 20, top-p 0.95, the step's problem seeds): the same rollouts
    seeds = problem_seeds(0, 3, range(3))
    kw = dict(num_samples=4, max_new_tokens=64, eos_ids=eos, pad_id=tok.pad_token_id, seeds=seeds)
    ref = sample(model, prompts, **kw)
    assert len({tuple(r) for g in ref for r in g}) > 6  # really sampled
    assert StaticRollout(model).sample(prompts, **kw) == ref


def test_sampled_rollouts_token_identical_with_the_same_seed(tiny_tokenizer):
    """Sampling: the same seeds give the reference loop's rollouts token for token (inverse CDF at the same
    per-row uniforms, on logits equal to ~1e-5), also while rows leave the batch; without seeds, the same
    generator seed (one seed per prompt drawn from it on both paths)."""
    model = lora_model(random_qwen3(len(tiny_tokenizer)), scale=0.1)
    prompts = prompts_of(tiny_tokenizer)
    eos = early_eos(model, prompts, 24)
    kw = dict(num_samples=3, max_new_tokens=24, eos_ids=eos, pad_id=0, temperature=1.3, top_k=12, top_p=0.9)
    ref = sample(model, prompts, generator=torch.Generator().manual_seed(7), **kw)
    assert len({len(r) for g in ref for r in g}) > 1 and len({tuple(r) for r in ref[0]}) > 1
    for merge in (True, False):
        for every in (1, 5):
            engine = StaticRollout(model, merge=merge, check_every=every)
            assert engine.sample(prompts, generator=torch.Generator().manual_seed(7), **kw) == ref, (merge, every)
    seeds = problem_seeds(5, 2, range(len(prompts)))
    ref = sample(model, prompts, seeds=seeds, **kw)
    assert ref != sample(model, prompts, seeds=problem_seeds(5, 3, range(len(prompts))), **kw)
    assert StaticRollout(model).sample(prompts, seeds=seeds, **kw) == ref


@pytest.mark.parametrize("temperature", [1.2, 0.0], ids=["sampled", "greedy"])
def test_rollouts_invariant_to_batch_composition(tiny_tokenizer, temperature):
    """A prompt's rollouts with its seed are the same alone, in a batch, and in a batch in another order: rows
    leave the batch at different steps (compaction) and each keeps its own uniform stream."""
    model = lora_model(random_qwen3(len(tiny_tokenizer), heads=8, kv_heads=2), scale=0.1)
    prompts = prompts_of(tiny_tokenizer)
    eos = early_eos(model, prompts, 20)
    seeds = problem_seeds(1, 4, range(len(prompts)))
    kw = dict(num_samples=2, max_new_tokens=20, eos_ids=eos, pad_id=0, temperature=temperature, top_k=15, top_p=0.95)
    engine = StaticRollout(model, check_every=1)
    batch = engine.sample(prompts, seeds=seeds, **kw)
    assert len({len(r) for g in batch for r in g}) > 1
    for i, p in enumerate(prompts):
        assert engine.sample([p], seeds=[seeds[i]], **kw)[0] == batch[i], i
    order = [2, 0, 3, 1]
    shuffled = engine.sample([prompts[i] for i in order], seeds=[seeds[i] for i in order], **kw)
    assert shuffled == [batch[i] for i in order]
    assert sample(model, prompts, seeds=seeds, **kw) == batch  # and the HF loop's


def test_max_new_tokens_one_and_generate(tiny_tokenizer):
    model = lora_model(build_model(len(tiny_tokenizer)))
    prompts = prompts_of(tiny_tokenizer)
    engine = StaticRollout(model)
    assert greedy(engine, prompts, {1}, 1) == greedy(model, prompts, {1}, 1)
    flat = engine.generate(prompts, max_new_tokens=12, eos_ids={1}, pad_id=0)
    assert flat == [g[0] for g in greedy(model, prompts, {1}, 12, G=1)]
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.sample(prompts, num_samples=1, max_new_tokens=0, eos_ids={1}, pad_id=0)


def test_cache_size_and_fits():
    engine = StaticRollout(random_qwen3(96, layers=3, kv_heads=2))
    engine.decoder.reserve(3, 128)
    held = sum(t.nbytes for layer in engine.decoder.layers for t in (layer.k_cache, layer.v_cache))
    assert engine.decoder.cache_bytes(*engine.decoder.cache_shape()) == held == 3 * 128 * 3 * 2 * 2 * 16 * 4
    assert decode.kv_bytes_per_token(engine.model) * 3 * 128 == held  # from the config alone (FSDP: no decoder yet)
    assert engine.fits(4, 256) and not engine.fits(10**6, 10**6)  # evaluation falls back to HF beyond memory


# ----------------------------------------------------------------------------------------- weights and adapters
@pytest.mark.parametrize("merge", [True, False])
def test_model_weights_untouched_and_adapter_updates_seen(tiny_tokenizer, merge):
    model = lora_model(build_model(len(tiny_tokenizer)))
    prompts = prompts_of(tiny_tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = StaticRollout(model, merge=merge)
    greedy(engine, prompts, {1}, 16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bitwise: nothing to restore
    # an optimizer step moves the adapter in place: the next rollout follows it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.5)
    assert greedy(engine, prompts, {1}, 16) == greedy(model, prompts, {1}, 16)
    # the adapter switched off (the base-teacher view): the rollout is the base model's
    with model.disable_adapter():
        assert greedy(engine, prompts, {1}, 16) == greedy(model, prompts, {1}, 16)
    # weights replaced by new tensors (not in place): detected, the decoder is rebuilt
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.data = p.data.clone() * 0.5
    assert greedy(engine, prompts, {1}, 16) == greedy(model, prompts, {1}, 16)


def test_unsupported_models_and_build_rollout(tiny_tokenizer, caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    assert decode.unsupported(llama) is not None
    with caplog.at_level(logging.INFO, logger="engine"):
        assert isinstance(build_rollout("auto", llama), HFRollout)
    assert "HF loop" in caplog.text
    with pytest.raises(ValueError, match="does not support"):
        build_rollout("static", llama)
    with pytest.raises(ValueError, match="--rollout"):
        build_rollout("vllm", llama)
    qwen = lora_model(build_model(len(tiny_tokenizer)))
    assert isinstance(build_rollout("auto", qwen, "cpu"), StaticRollout)  # CPU: eager static cache
    assert build_rollout("auto", qwen, "cpu").compiled is None
    assert isinstance(build_rollout("hf", qwen), HFRollout)


# -------------------------------------------------------------------------------------------- compiled path
class EagerStandIn:
    """Stands in for the torch.compile'd step: runs it eagerly, records the shapes a compiled graph would see."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, dec, tok, col, start, done, eos, u, cols, *rest):
        self.shapes.append((tok.shape[0], cols.shape[0]))
        return decode.decode_one(dec, tok, col, start, done, eos, u, cols, *rest)


def test_compiled_path_buckets_shapes_without_changing_rollouts(tiny_tokenizer):
    model = lora_model(random_qwen3(len(tiny_tokenizer)))
    prompts = prompts_of(tiny_tokenizer)
    eos = early_eos(model, prompts, 30)
    ref = greedy(model, prompts, eos, 30, G=3)
    engine = StaticRollout(model, check_every=4, window_multiple=16)
    engine.compiled = EagerStandIn()
    assert greedy(engine, prompts, eos, 30, G=3) == ref
    rows = {r for r, _ in engine.compiled.shapes}
    windows = {w for _, w in engine.compiled.shapes}
    # the full batch (12 rows), then powers of two as rows leave
    assert engine.compiled.shapes[0][0] == 12 and all(r & (r - 1) == 0 for r in rows - {12}) and len(rows) > 1
    # windows: multiples of 16 (8-aligned masks), always shorter than the cache (no size a graph specialises on)
    assert all(w % 16 == 0 and w < engine.decoder.cache_shape()[1] for w in windows) and len(windows) > 1
    # sampled rollouts do not depend on bucketing or the check cadence: each row reads its own uniform stream
    kw = dict(num_samples=3, max_new_tokens=30, eos_ids=eos, pad_id=0, temperature=1.3, top_k=10, top_p=0.9)
    a = engine.sample(prompts, generator=torch.Generator().manual_seed(5), **kw)
    b = StaticRollout(model, check_every=1).sample(prompts, generator=torch.Generator().manual_seed(5), **kw)
    assert a == b
    assert a != StaticRollout(model).sample(prompts, generator=torch.Generator().manual_seed(6), **kw)


def test_compile_failure_falls_back_loudly(tiny_tokenizer, caplog, monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor exploded")

        return run

    model = lora_model(build_model(len(tiny_tokenizer)))
    prompts = prompts_of(tiny_tokenizer)
    kw = dict(num_samples=2, max_new_tokens=12, eos_ids={1}, pad_id=0, temperature=1.1)
    want = StaticRollout(model).sample(prompts, generator=torch.Generator().manual_seed(3), **kw)
    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = StaticRollout(model, compile=True)
    with caplog.at_level(logging.WARNING, logger="engine"):
        got = engine.sample(prompts, generator=torch.Generator().manual_seed(3), **kw)
    assert got == want and engine.compiled is None and engine.name.startswith("static")
    assert "torch.compile failed" in caplog.text and "inductor exploded" in caplog.text

    def unavailable(fn, **kw):
        raise RuntimeError("Dynamo is not supported here")

    monkeypatch.setattr(torch, "compile", unavailable)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine"):
        engine = StaticRollout(model, compile=True)
    assert engine.compiled is None and engine.name.startswith("static")
    assert "torch.compile unavailable" in caplog.text and "Dynamo is not supported here" in caplog.text
    assert engine.sample(prompts, generator=torch.Generator().manual_seed(3), **kw) == want


def test_torch_compile_cpu_identical(tiny_tokenizer):
    """The real torch.compile (inductor, C++ on CPU) on a one-layer model: the same greedy tokens while rows leave
    the batch and the window grows, from one compiled graph (rows and window are dynamic sizes), no fallback; then
    the same sampled tokens as the HF loop for the same seeds, from one more graph (the sampler) whatever rows
    leave (each row's uniforms are contiguous either way); then longer rollouts grow the KV cache twice without a
    recompile (the cache's sizes are dynamic too: issue 23 measured 56 s per grown bucket on CPU, and dynamo runs
    eagerly after 8 recompiles). Costs ~30-60 s on 2 cores: the two compiles; the grown runs take ~1 s."""
    from torch._dynamo.utils import counters

    model = lora_model(build_model(len(tiny_tokenizer), layers=1, hidden=32))
    prompts = prompts_of(tiny_tokenizer)
    eos = early_eos(model, prompts, 40)
    engine = StaticRollout(model, compile=True, check_every=4, window_multiple=16)
    counters.clear()
    got = greedy(engine, prompts, eos, 40, G=3)
    assert engine.compiled is not None, "compile fell back to eager"
    assert got == greedy(model, prompts, eos, 40, G=3)
    assert counters["stats"]["unique_graphs"] == 1
    # sampled (temperature, top-k, top-p, inverse CDF compiled): the HF loop's tokens
    kw = dict(num_samples=3, max_new_tokens=40, eos_ids=eos, pad_id=0, temperature=1.2, top_k=15, top_p=0.9)
    seeds = problem_seeds(2, 1, range(len(prompts)))
    got = engine.sample(prompts, seeds=seeds, **kw)
    assert engine.compiled is not None and got == sample(model, prompts, seeds=seeds, **kw)
    assert counters["stats"]["unique_graphs"] == 2
    columns = [engine.decoder.cache_shape()[1]]
    for max_new in (100, 170):  # each a larger KV cache: new buffers of new sizes, the same graph
        kw["max_new_tokens"] = max_new
        got = engine.sample(prompts, seeds=seeds, **kw)
        columns.append(engine.decoder.cache_shape()[1])
        assert engine.compiled is not None and got == sample(model, prompts, seeds=seeds, **kw)
    assert columns[0] < columns[1] < columns[2]
    assert counters["stats"]["unique_graphs"] == 2, "a grown KV cache recompiled the step"


# ---------------------------------------------------------------------------------------------------- sampling
def chi_square_pvalue(counts: dict, probs: dict, n: int, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit (cells with expected count < min_expected pooled into one)."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for cell in set(probs) | set(counts):
        expected, observed = n * probs.get(cell, 0.0), counts.get(cell, 0)
        if expected < min_expected:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
            continue
        stat, df = stat + (observed - expected) ** 2 / expected, df + 1
    if pooled_exp > 0:
        stat, df = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, df + 1
    elif pooled_obs:
        return 0.0  # a token the reference never draws
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)


SETTINGS = [(1.1, 6, 0.9), (0.7, 0, 0.8), (1.5, 3, 1.0), (1.0, 0, 1.0)]


def draw_sampler(sampler, logits, temperature, top_k, top_p, n=100_000, seed=0) -> Counter:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Counter(sampler(logits.expand(n, -1), u, temperature, top_k, top_p).tolist())


def wrong_temperature(logits, u, temperature, top_k, top_p):
    return next_token(logits, u, 1.0, top_k, top_p)


def wrong_top_p(logits, u, temperature, top_k, top_p):  # also drops the token that crosses top_p
    probs = filter_logits(logits / temperature, top_k, 1.0).softmax(-1)
    ordered, order = probs.sort(descending=True)
    drop = ordered.cumsum(-1) >= top_p
    drop[:, 0] = False
    return inverse_cdf(probs.masked_fill(drop.scatter(-1, order, drop), 0.0), u)


@pytest.mark.parametrize("vocab,scale", [(50, 1.0), (320, 3.0), (4096, 0.3)])
def test_top_k_draw_is_the_reference_filter(vocab, scale):
    """The top-k fast path draws filter_logits + softmax + inverse_cdf's token on every row: random logits at
    several temperatures / k / top-p, then ties at the k-th logit (filter_logits keeps every tied token) and a
    top-p boundary falling inside a tie."""
    g = torch.Generator().manual_seed(vocab)
    for k, top_p in ((20, 0.95), (5, 0.8), (40, 1.0), (1, 0.9), (3, 0.3)):
        logits = torch.randn(1024, vocab, generator=g) * scale
        u = torch.rand(1024, generator=g, dtype=torch.float64)
        want = inverse_cdf(filter_logits(logits / 1.1, k, top_p).softmax(-1), u)
        assert torch.equal(sampling.top_k_draw(logits / 1.1, u, k, top_p), want), (k, top_p)
    tied = torch.full((512, vocab), -5.0)
    tied[:, [7, 3, 30, 11, 2]] = torch.tensor([4.0, 2.0, 2.0, 2.0, 1.0])  # k=2: tokens 3, 30, 11 tie for second
    u = torch.linspace(0, 1, 513, dtype=torch.float64)[:-1]
    for k, top_p in ((2, 1.0), (2, 0.95), (4, 0.5), (3, 0.9)):
        want = inverse_cdf(filter_logits(tied, k, top_p).softmax(-1), u)
        got = sampling.top_k_draw(tied, u, k, top_p)
        assert torch.equal(got, want), (k, top_p)
    assert set(sampling.top_k_draw(tied, u, 2, 1.0).tolist()) == {7, 3, 30, 11}


def test_sampler_is_the_reference_loops_draw():
    """next_token is the HF loop's draw (filter, softmax, inverse CDF at u) bit for bit, greedy is the argmax, and
    a zero-probability token is never drawn, even at u just below 1."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    u = torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0 - 2**-53
    want = inverse_cdf(filter_logits(logits / 1.1, 20, 0.95).softmax(-1), u)
    got = next_token(logits, u, 1.1, 20, 0.95)
    assert torch.equal(got, want)
    kept = filter_logits(logits / 1.1, 20, 0.95).isfinite()
    assert kept.gather(1, got[:, None]).all()
    assert torch.equal(next_token(logits, None, 1.1, 20, 0.95), logits.argmax(-1))
    assert torch.equal(next_token(logits, u, 0.0, 20, 0.95), logits.argmax(-1))


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sampler_matches_reference_distribution(temperature, top_k, top_p):
    logits = torch.log(torch.tensor([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.04, 0.01]))[None]
    probs = reference_probs(logits, temperature, top_k, top_p)[0]
    expected = {i: p for i, p in enumerate(probs.tolist()) if p > 0}
    counts = draw_sampler(next_token, logits, temperature, top_k, top_p)
    assert chi_square_pvalue(counts, expected, 100_000) > 1e-4
    tv = 0.5 * sum(abs(counts.get(i, 0) / 100_000 - expected.get(i, 0.0)) for i in range(8))
    assert tv < 0.01
    # the same test rejects samplers that are wrong in the ways a real bug would be
    wrong = [wrong_temperature] if temperature != 1.0 else []
    wrong += [wrong_top_p] if top_p < 1.0 else []
    for bad in wrong:
        assert chi_square_pvalue(draw_sampler(bad, logits, temperature, top_k, top_p), expected, 100_000) < 1e-6


def exact_two_token_distribution(model, prompt, temperature, top_k, top_p) -> dict:
    """P(t1, t2) of the reference sampler, from exact next-token distributions."""
    with torch.no_grad():
        p1 = reference_probs(model(torch.tensor([prompt])).logits[:, -1].float(), temperature, top_k, top_p)[0]
        firsts = [t for t in range(p1.numel()) if p1[t] > 0]
        rows = torch.tensor([prompt + [t] for t in firsts])
        p2 = reference_probs(model(rows).logits[:, -1].float(), temperature, top_k, top_p)
    return {
        (t1, t2): float(p1[t1] * p2[i, t2]) for i, t1 in enumerate(firsts) for t2 in range(p2.shape[1]) if p2[i, t2] > 0
    }


def test_rollout_loop_samples_the_reference_distribution(tiny_tokenizer, monkeypatch):
    """Whole loop (prefill, cache copy, one static decode step, sampling), G rollouts of one prompt: the pair of
    tokens drawn matches P(t1, t2) exactly computed; the HF loop passes the same test; a wrong sampler fails."""
    model = lora_model(build_model(len(tiny_tokenizer), hidden=32), scale=0.1)
    prompt = tiny_tokenizer("(3+4)*5=")["input_ids"]
    T, k, p, G = 2.0, 12, 0.9, 20_000
    exact = exact_two_token_distribution(model, prompt, T, k, p)
    assert len(exact) > 30  # a distribution with real spread
    kw = dict(num_samples=G, max_new_tokens=2, eos_ids=set(), pad_id=0, temperature=T, top_k=k, top_p=p)

    def pairs(engine) -> Counter:
        return Counter(tuple(r) for r in engine.sample([prompt], generator=torch.Generator().manual_seed(0), **kw)[0])

    assert chi_square_pvalue(pairs(StaticRollout(model)), exact, G) > 1e-4
    assert chi_square_pvalue(pairs(HFRollout(model)), exact, G) > 1e-4
    monkeypatch.setattr(decode, "next_token", wrong_temperature)
    assert chi_square_pvalue(pairs(StaticRollout(model)), exact, G) < 1e-6


def test_chi_square_pvalue_calibration():
    """The p-value helper: uniform data fits, a 2% shift in a 10k-sample does not; pooling keeps rare cells."""
    probs = {i: 0.25 for i in range(4)}
    assert chi_square_pvalue({0: 2500, 1: 2510, 2: 2490, 3: 2500}, probs, 10_000) > 0.5
    assert chi_square_pvalue({0: 2700, 1: 2300, 2: 2500, 3: 2500}, probs, 10_000) < 1e-6
    assert chi_square_pvalue({0: 10, 9: 1}, {0: 1.0}, 11) == 0.0
    assert math.isclose(chi_square_pvalue({0: 50, 1: 50}, {0: 0.5, 1: 0.5}, 100), 1.0)


def test_gpu_measurement_runs_at_a_tiny_shape_on_cpu(tmp_path):
    """benchmarks/bench_rollout.py: gpu_measurement (old loop vs compiled vs model.generate, issue 16's GPU figure)
    and its command line run end to end at a tiny shape, so a GPU session only has to call them."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_rollout.py"
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.gpu_measurement("smoke", device="cpu", dtype=torch.float32)
    assert set(result) == {"hf", "compiled", "generate"}
    for r in result.values():
        assert r["tokens"] == 2 * 6 and r["tokens_per_s"] > 0  # 2 prompts x 6 new tokens, no EOS
    assert result["compiled"]["name"].startswith("compiled")  # compiled, not fallen back
    assert result["compiled"]["same_as_hf"]  # fp32: the compiled loop samples the old loop's tokens
    out = tmp_path / "rollout.md"
    bench.main(["--gpu", "--shape", "smoke", "--device", "cpu", "--dtype", "float32", "--out", str(out)])
    assert "| smoke | compiled" in out.read_text()


# ------------------------------------------------------------------------------------------- --rollout, end to end
def test_rollout_flag_validated_recorded_and_changeable_on_resume(tiny_model_dir, tmp_path):
    """--rollout is a typed config field: a bad value is a one-line error before anything loads, the choice is in
    config.yaml and run.log, and training with hf or static gives the same run (the same rollouts); --resume
    restores it and may switch it (a speed setting, not the run's semantics)."""
    import json

    import yaml
    from engine_tiny import write_dataset

    from atesd.engine.errors import UsageError
    from atesd.engine.invocation import parse, parse_invocation
    from atesd.engine.train import train

    with pytest.raises(UsageError, match=r"^--rollout: 'vllm' is not one of auto, hf, static, compiled$"):
        parse(["--rollout", "vllm"])
    (tmp_path / "bad.yaml").write_text("rollout: fast\n")
    with pytest.raises(UsageError, match=r"rollout: 'fast' is not one of"):
        parse(["--config", str(tmp_path / "bad.yaml")])
    data = write_dataset(tmp_path / "train.jsonl", n=12)

    def args(out, *extra):
        return [
            "--model", tiny_model_dir, "--data", data, "--output-dir", str(out), "--steps", "3", "--batch-size",
            "2", "--num-samples", "2", "--max-new-tokens", "10", "--seed", "5", "--save-every", "2",
            "--probe-every", "0", "--no-progress", *extra,
        ]  # fmt: skip

    def metrics(run):
        with open(run / "metrics.jsonl") as fh:
            return [{k: v for k, v in json.loads(x).items() if k not in TIMING_METRICS} for x in fh]

    train(*parse(args(tmp_path / "hf", "--rollout", "hf")))
    static = train(*parse(args(tmp_path / "static", "--stop-after", "2", "--rollout", "static")))
    assert yaml.safe_load((tmp_path / "static" / "config.yaml").read_text())["rollout"] == "static"
    assert "rollout: static (merged LoRA)" in (tmp_path / "static" / "run.log").read_text()
    assert parse_invocation(["--resume", str(static)]).config.rollout == "static"
    inv = parse_invocation(["--resume", str(static), "--rollout", "hf"])
    assert inv.config.rollout == "hf" and inv.changed == {"rollout": ("static", "hf")}
    train(inv.config, inv.resume)
    assert "rollout: hf (the eager HF loop)" in (tmp_path / "hf" / "run.log").read_text()
    assert "--rollout changed on --resume: static -> hf" in (tmp_path / "static" / "run.log").read_text()
    assert metrics(tmp_path / "static") == metrics(tmp_path / "hf")  # same rollouts, losses, alphas, step by step
    assert sum(m["rollout_tokens"] for m in metrics(tmp_path / "hf")) > 3 * 4
