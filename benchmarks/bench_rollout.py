"""Rollout throughput: the reference HF loop vs the static-cache loop, eager and compiled (DESIGN 4.2b, issue 16).

    pytest benchmarks/bench_rollout.py --benchmark -s          # CPU shapes; BENCH_ROLLOUT_SHAPES=tiny,h512 overrides
    python -m benchmarks.bench_rollout --gpu [--out FILE]      # Qwen3-1.7B shape on a GPU (gpu_measurement)

Implementations (``--rollout`` names where they are one):

    hf               engine.hf_rollout.sample: one eager HF forward per token over a DynamicCache (the old loop)
    hf-static        the HF model over transformers' StaticCache, eager: the alternative to our own decoder
    static           engine.decode.StaticRollout, eager, LoRA merged into fused copies (the CPU default)
    static-unmerged  the same with LoRA applied on the fly (no weight copies)
    compiled         static + torch.compile of the decode step (CUDA graphs on GPU; the GPU default)
    generate         transformers' model.generate (GPU measurement only)

Figure of merit: generated tokens per second. Fixed budget: no EOS, so every row of every implementation produces
exactly ``new`` tokens; sampling as in training (T=1.1, top-k 20, top-p 0.95, per-row uniforms from the step's
problem seeds: ``engine/sampling.py``; ``generate`` samples with its own torch.multinomial). ``tiny-lab`` is the
training workload instead: the shipped tiny model on lab prompts with its EOS, rows finishing early. A compiled
implementation's first call (compile + warm-up) is timed and reported apart from its throughput.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from atesd.engine.decode import StaticRollout
from atesd.engine.hf_rollout import HFRollout
from atesd.engine.models import add_lora
from atesd.engine.sampling import filter_logits, inverse_cdf, problem_seeds, rollout_seeds, row_uniforms
from benchmarks.shapes import QWEN3_1P7B

SHAPES = {
    # name: (model: "tiny" or Qwen3Config kwargs, LoRA rank, prompts B, samples G, prompt tokens, new tokens)
    "tiny": ("tiny", 16, 8, 1, 24, 96),
    "tiny-lab": ("tiny", 16, 8, 1, None, 96),
    "h512": (
        dict(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=32768,
        ),
        16,
        8,
        1,
        64,
        96,
    ),
    "1.7b": (QWEN3_1P7B, 64, 32, 1, 256, 1024),
    # a 1.7b stand-in small enough for a CPU test of gpu_measurement (tests/engine/test_rollout_static.py)
    "smoke": (
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=256,
            tie_word_embeddings=True,
        ),
        4,
        2,
        1,
        8,
        6,
    ),
}
SAMPLING = dict(temperature=1.1, top_k=20, top_p=0.95)


def build(shape: str, device: str, dtype: torch.dtype):
    """(peft LoRA model in eval mode, prompts, eos ids, pad id) for a shape; LoRA B random so the adapter acts."""
    spec, r, B, _, P, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    if spec == "tiny":
        from atesd.engine.models import load_model

        base, tok = load_model("tiny", dtype=dtype, device=device)
        vocab, eos, pad = base.config.vocab_size, {tok.eos_token_id}, tok.pad_token_id
        if P is None:  # lab prompts, as the training loop builds them
            from atesd.engine.data import load_rows
            from atesd.engine.exposure import make_example
            from atesd.engine.task import get_task

            rows = load_rows("lab", split="train", size=4 * B, task_options={"levels": "1,2"}, seed=0)
            lab = get_task("lab").templates  # the lab task's prompts, as `python -m engine.train` builds them
            prompts = [
                make_example(tok, x["problem"], x["solution"], x["answer"], templates=lab).student_prompt
                for x in rows[:B]
            ]
        else:
            prompts = [torch.randint(10, vocab, (P,), generator=g).tolist() for _ in range(B)]
    else:
        torch.manual_seed(0)
        cfg = Qwen3Config(max_position_embeddings=4096, attn_implementation="sdpa", **spec)
        base = Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype)
        vocab, eos, pad = spec["vocab_size"], set(), 0
        prompts = [torch.randint(10, vocab, (P,), generator=g).tolist() for _ in range(B)]
    model = add_lora(base, r, 2 * r).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)
    if P is not None:
        eos = set()  # fixed budget: every row runs to the end
    return model, prompts, eos, pad


def _until_eos(seq: list[int], eos_ids) -> list[int]:
    """A row up to and including its first EOS (what engine.hf_rollout.sample returns; the padding is not counted)."""
    return seq[: next((i + 1 for i, x in enumerate(seq) if x in eos_ids), len(seq))]


class HFStaticCache:
    """The HF model driven over transformers' ``StaticCache`` (eager), sampling as the reference loop.

    transformers' static cache has no batch repeat of a prefilled cache and one length for all rows, so prompts
    are prefilled G times and finished rows stay in the batch; the mask covers the whole preallocated length.
    """

    name = "hf-static"

    def __init__(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def sample(
        self, prompts, *, num_samples, max_new_tokens, eos_ids, pad_id, temperature, top_p, top_k, seeds=None,
        generator=None,
    ):
        from transformers import StaticCache

        model, G = self.model, num_samples
        device = next(model.parameters()).device
        width = max(map(len, prompts))
        rows = [p for p in prompts for _ in range(G)]
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width + max_new_tokens), dtype=torch.long)
        for i, p in enumerate(rows):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) : width] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn[:, :width].cumsum(-1) - 1).clamp_min(0)
        cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
        out = model(input_ids=ids, attention_mask=attn[:, :width], position_ids=pos, cache=cache, logits_to_keep=1)
        logits, nxt, tokens = out.logits[:, -1].float(), pos[:, -1:] + 1, []
        eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        uniforms = row_uniforms(rollout_seeds(len(prompts), seeds, generator), G, max_new_tokens, device)
        for t in range(max_new_tokens):
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            tok = inverse_cdf(probs, uniforms[:, t]).masked_fill(done, pad_id)
            tokens.append(tok)
            done = done | torch.isin(tok, eos)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            attn[:, width + t] = 1
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=nxt, cache=cache)
            logits, nxt = out.logits[:, -1].float(), nxt + 1
        seqs = [_until_eos(s, eos_ids) for s in torch.stack(tokens, 1).tolist()]
        return [[seqs[b * G + g] for g in range(G)] for b in range(len(prompts))]


class Generate:
    """transformers' ``model.generate`` (dynamic cache, sampling), EOS off: a fixed budget."""

    name = "generate"

    def __init__(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def sample(self, prompts, *, num_samples, max_new_tokens, eos_ids, pad_id, temperature, top_p, top_k, **_):
        device = next(self.model.parameters()).device
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :], attn[i, width - len(p) :] = torch.tensor(p), 1
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if not eos_ids else 0,
            num_return_sequences=num_samples,
            eos_token_id=sorted(eos_ids) or None,
            pad_token_id=pad_id,
        )
        seqs = [_until_eos(s, eos_ids) for s in out[:, width:].tolist()]
        return [[seqs[b * num_samples + g] for g in range(num_samples)] for b in range(len(prompts))]


def engine(impl: str, model):
    return {
        "hf": lambda: HFRollout(model),
        "hf-static": lambda: HFStaticCache(model),
        "static": lambda: StaticRollout(model, merge=True),
        "static-unmerged": lambda: StaticRollout(model, merge=False),
        "compiled": lambda: StaticRollout(model, compile=True),
        "generate": lambda: Generate(model),
    }[impl]()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rollout(rollout, prompts, shape: str, eos, pad, device: str, seed: int) -> tuple[float, int, list]:
    """(seconds, generated tokens, the rollouts) of one rollout call."""
    _, _, _, G, _, new = SHAPES[shape]
    kw = dict(num_samples=G, max_new_tokens=new, eos_ids=eos, pad_id=pad, **SAMPLING)
    seeds = problem_seeds(0, seed, range(len(prompts)))  # as a training step's (run seed 0, step `seed`)
    _sync(device)
    t0 = time.perf_counter()
    out = rollout.sample(prompts, seeds=seeds, **kw)
    _sync(device)
    return time.perf_counter() - t0, sum(len(r) for group in out for r in group), out


def measure(shape: str, impls, *, device: str, dtype: torch.dtype, rounds: int = 3) -> dict:
    """Tokens/s of each implementation on one model, rounds interleaved across implementations (so load drift
    hits all alike); per implementation: median seconds, tokens/s, first-call seconds (compile + warm-up)."""
    model, prompts, eos, pad = build(shape, device, dtype)
    engines = {impl: engine(impl, model) for impl in impls}
    first = {impl: timed_rollout(e, prompts, shape, eos, pad, device, 0) for impl, e in engines.items()}
    runs: dict[str, list[tuple[float, int]]] = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl, e in engines.items():
            runs[impl].append(timed_rollout(e, prompts, shape, eos, pad, device, r + 1)[:2])
    result = {}
    for impl in impls:
        seconds = sorted(s for s, _ in runs[impl])[len(runs[impl]) // 2]
        tokens = sum(n for _, n in runs[impl]) / len(runs[impl])
        result[impl] = dict(
            seconds=seconds,
            tokens=tokens,
            tokens_per_s=tokens / seconds,
            first_call_s=first[impl][0],
            name=getattr(engines[impl], "name", impl),
            # the first call's rollouts equal hf's for the same seeds (fp32: expected; bf16: rounding differs)
            same_as_hf=first[impl][2] == first["hf"][2] if "hf" in first else None,
        )
    return result


def table(shape: str, result: dict, baseline: str = "hf") -> str:
    base = result[baseline]["tokens_per_s"] if baseline in result else None
    lines = [
        f"| {shape} | implementation | tokens/s | vs {baseline} | median s | first call s | same tokens as hf |",
        "|---" * 7 + "|",
    ]
    for impl, r in result.items():
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        same = {True: "yes", False: "no", None: "-"}[r["same_as_hf"]]
        lines.append(
            f"| {shape} | {impl} ({r['name']}) | {r['tokens_per_s']:.0f} | {ratio} | {r['seconds']:.3f} | "
            f"{r['first_call_s']:.1f} | {same} |"
        )
    return "\n".join(lines)


def gpu_measurement(
    shape: str = "1.7b",
    impls=("hf", "compiled", "generate"),
    *,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    rounds: int = 1,
) -> dict:
    """Issue 16's GPU figure: Qwen3-1.7B's shape (random weights, LoRA r=64, bf16), 32 prompts of 256 tokens,
    1024 new tokens, old loop vs compiled static loop vs ``model.generate``, in one process. Prints a table."""
    result = measure(shape, impls, device=device, dtype=dtype, rounds=rounds)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(f"\n[rollout] {shape} on {name}, {dtype}, {time.strftime('%Y-%m-%d')}\n{table(shape, result)}", flush=True)
    return result


# ------------------------------------------------------------------------------------------- pytest benchmarks
def _shapes() -> list[str]:
    env = os.environ.get("BENCH_ROLLOUT_SHAPES")
    if env:
        return env.split(",")
    return ["tiny", "tiny-lab", "h512"] + (["1.7b"] if torch.cuda.is_available() else [])


IMPLS = ["hf", "hf-static", "static", "static-unmerged", "compiled"]
RESULTS: dict[str, dict] = {}


@pytest.mark.parametrize("shape", _shapes())
def test_rollout_throughput(benchmark, shape):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls = IMPLS + (["generate"] if device == "cuda" else [])
    # the interleaved measurement of every implementation; pytest-benchmark times the default one on top
    result = measure(shape, impls, device=device, dtype=dtype)
    RESULTS[shape] = result
    print(f"\n[rollout] {shape} {device} {dtype}\n{table(shape, result)}")
    model, prompts, eos, pad = build(shape, device, dtype)
    default = engine("compiled" if device == "cuda" else "static", model)
    timed_rollout(default, prompts, shape, eos, pad, device, 0)
    benchmark.pedantic(lambda: timed_rollout(default, prompts, shape, eos, pad, device, 1), rounds=3, iterations=1)
    benchmark.extra_info.update({f"{impl}_tokens_per_s": r["tokens_per_s"] for impl, r in result.items()})
    benchmark.extra_info.update({f"{impl}_first_call_s": r["first_call_s"] for impl, r in result.items()})


def merge_precision(scales=(1e-4, 3e-4, 1e-3, 3e-3), dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """What merging LoRA into ``dtype`` weights costs: per LoRA-B scale s (B ~ N(0, s)), the share of dW that
    rounding the merged weight loses, and the next-token KL of the merged and the unmerged (peft) model from the
    exact fp32 student, next to the student-vs-base KL. Random Qwen3 hidden 512, 4 layers, LoRA r=64 / alpha 128."""
    import copy

    from atesd.engine.decode import merged_weight

    torch.manual_seed(0)
    cfg = Qwen3Config(**{**SHAPES["h512"][0], "vocab_size": 4096}, attn_implementation="sdpa")
    model = add_lora(Qwen3ForCausalLM(cfg).to(dtype), 64, 128).eval()
    ids = torch.randint(10, 4096, (4, 64))

    def logprobs(m) -> torch.Tensor:
        with torch.no_grad():
            return m(ids).logits.float().log_softmax(-1)

    def kl(p: torch.Tensor, q: torch.Tensor) -> float:
        return (p.exp() * (p - q)).sum(-1).mean().item()

    with model.disable_adapter():
        base = logprobs(model)
    g, rows = torch.Generator().manual_seed(1), []
    lora = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    for s in scales:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * s)
        unmerged, exact = logprobs(model), logprobs(copy.deepcopy(model).float())
        lost, saved = [], {}
        for name, m in lora.items():  # swap in the merged weights (as the static decoder's buffers hold them)
            w, merged = m.get_base_layer().weight, merged_weight(m)
            delta = (m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()) * m.scaling["default"]
            lost.append(((merged.float() - w.float() - delta).norm() / delta.norm()).item())
            saved[name] = w.detach().clone()
            w.data.copy_(merged)
        with model.disable_adapter():
            merged_lp = logprobs(model)
        for name, m in lora.items():
            m.get_base_layer().weight.data.copy_(saved[name])
        rows.append(
            dict(
                scale=s,
                dw_lost=sum(lost) / len(lost),
                kl_exact_merged=kl(exact, merged_lp),
                kl_exact_unmerged=kl(exact, unmerged),
                kl_student_base=kl(unmerged, base),
            )
        )
    return rows


def test_lora_merge_precision_bf16():
    rows = merge_precision()
    print("\n| LoRA B scale | dW lost by rounding | KL(fp32, merged) | KL(fp32, unmerged) | KL(student, base) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scale']:g} | {r['dw_lost']:.3f} | {r['kl_exact_merged']:.2e} | {r['kl_exact_unmerged']:.2e} | "
            f"{r['kl_student_base']:.2e} |"
        )


def main_job_steps(steps: int | None = None, seed: int = 0, kinds=("hf", "static"), out_dir: str | None = None) -> dict:
    """The main job's training steps (``python -m engine.train`` defaults: tiny model, lab) under each
    ``--rollout`` kind, in one process, steps interleaved (step i of every kind before step i+1 of any, the
    order alternating) so the machine's load hits all alike. Per kind: seconds in ``Trainer.step`` and in its
    rollout call, summed over the steps, and the final loss (the kinds sample the same rollouts, so the runs match).
    The held-out evaluations are skipped (``test_lab_evaluation_decoders`` times them)."""
    import tempfile

    from atesd.engine.invocation import parse
    from atesd.engine.train import Trainer

    root = out_dir or tempfile.mkdtemp(prefix="bench-main-job-")
    trainers, clock = {}, {k: {"step_s": 0.0, "rollout_s": 0.0} for k in kinds}
    for kind in kinds:
        cfg, _ = parse(["--rollout", kind, "--seed", str(seed), "--eval-problems", "0"]
                       + (["--steps", str(steps)] if steps else []))
        steps = cfg.steps  # None: the recipe's
        trainer = Trainer(cfg, os.path.join(root, kind))
        inner = trainer.rollout.sample

        def timed(*a, _inner=inner, _kind=kind, **kw):
            t0 = time.perf_counter()
            out = _inner(*a, **kw)
            clock[_kind]["rollout_s"] += time.perf_counter() - t0
            return out

        trainer.rollout.sample = timed
        trainers[kind] = trainer
    last = {}
    for i in range(steps):
        for kind in kinds if i % 2 == 0 else tuple(reversed(kinds)):
            t0 = time.perf_counter()
            last[kind] = trainers[kind].step()
            clock[kind]["step_s"] += time.perf_counter() - t0
    for kind in kinds:
        clock[kind]["final_loss"] = last[kind]["loss"]
        clock[kind]["rollout_tokens"] = last[kind]["rollout_tokens"]
    return {**clock, "steps": steps}


def test_main_job_steps_interleaved():
    """`python -m engine.train`'s steps (the tiny recipe's), old (hf) vs new (static) rollouts, interleaved in one
    process."""
    pytest.importorskip("atesd.engine.lab")
    result = main_job_steps()
    hf, st = result["hf"], result["static"]
    print(
        f"\n[main job, {result['steps']} steps interleaved] hf: steps {hf['step_s']:.1f} s "
        f"(rollouts {hf['rollout_s']:.1f} s); "
        f"static: steps {st['step_s']:.1f} s (rollouts {st['rollout_s']:.1f} s); step time ratio "
        f"{st['step_s'] / hf['step_s']:.2f}, rollout ratio {st['rollout_s'] / hf['rollout_s']:.2f}; final loss "
        f"{hf['final_loss']:.6f} / {st['final_loss']:.6f}"
    )


def evaluation_decoders(problems: int = 200, rounds: int = 3) -> dict:
    """The main job's held-out evaluation (the lab's greedy protocol, the shipped tiny model, ``problems`` test
    problems) through HF ``generate`` and through the static-cache decoder, rounds interleaved in one process:
    median seconds per implementation and whether their completions are identical."""
    from atesd.engine.evaluate import load_model
    from atesd.engine.evaluation import evaluate_task
    from atesd.engine.lab import lab_dataset

    model, tok = load_model("tiny")
    probs = lab_dataset("test", problems, 0, levels=(1, 2))
    decoders = {"hf": None, "static": StaticRollout(model)}
    seconds: dict[str, list[float]] = {k: [] for k in decoders}
    results = {}
    for r in range(rounds):
        for name in decoders if r % 2 == 0 else tuple(reversed(decoders)):
            t0 = time.perf_counter()
            results[name] = evaluate_task(model, tok, probs, "lab", keep_results=True, decoder=decoders[name])
            seconds[name].append(time.perf_counter() - t0)
    same = [a["completions"] for a in results["hf"]["results"]] == [b["completions"] for b in
                                                                      results["static"]["results"]]
    return {"median_s": {k: sorted(v)[len(v) // 2] for k, v in seconds.items()}, "same_completions": same,
            "accuracy": {k: v["accuracy"] for k, v in results.items()}, "problems": problems}


def test_lab_evaluation_decoders():
    """The main job's held-out evaluation: HF generate vs the static-cache decoder (same greedy completions)."""
    pytest.importorskip("atesd.engine.lab")
    res = evaluation_decoders()
    hf, st = res["median_s"]["hf"], res["median_s"]["static"]
    print(f"\n[lab evaluation, {res['problems']} problems, greedy] hf generate {hf:.2f} s, static {st:.2f} s: "
          f"{hf / st:.2f}x; same completions: {res['same_completions']}; accuracy {res['accuracy']}")
    assert res["same_completions"]


GPU_COMMAND = "PYTHONPATH=. python3 -m benchmarks.bench_rollout --gpu --out OUT_DIR/rollout-cuda.md"


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.bench_rollout --gpu [--shape 1.7b] [--out FILE]``: :func:`gpu_measurement` (issue 16's
    GPU figure); the table is printed and, with ``--out``, written to FILE. Without ``--gpu``: print the command."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rollout", description=main.__doc__)
    parser.add_argument("--gpu", action="store_true", help="run gpu_measurement on cuda")
    parser.add_argument("--shape", default="1.7b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--impls", default="hf,compiled,generate",
                        help="comma-separated, from hf, hf-static, static, static-unmerged, compiled, generate")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    if not args.gpu:
        print(f"issue 16's GPU measurement, from the repository root:\n  {GPU_COMMAND}")
        return
    impls = tuple(args.impls.split(","))
    result = gpu_measurement(args.shape, impls, device=args.device, dtype=getattr(torch, args.dtype),
                             rounds=args.rounds)
    if args.out:
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        head = f"{args.shape} on {name}, {args.dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"{head}\n\n{table(args.shape, result)}\n")


if __name__ == "__main__":
    main()
