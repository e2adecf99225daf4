"""The static-cache decoder under FSDP2 (``--fsdp lora|full``), on 2 gloo processes (torch.multiprocessing).

Inside ``DataParallel.gathered()`` every rank decodes its share of the global batch with the static decoder
(eager, unmerged, and the compiled step traced by dynamo) reading the gathered weights: greedy and sampled
rollouts are the HF loop's tokens on the same gathered model and one process's tokens on the unsharded model;
sharded greedy evaluation through the decoder equals one process's (and HF ``generate``'s) completions; the
accuracy probe, run on rank 0 alone as the trainer runs it, equals one process's. Every tensor the decoder
allocated or referenced is gone when a rollout returns (weak references), and decoding outside ``gathered()``
is one line. The compiled step is traced by dynamo with its ``eager`` backend (the graph, its guards and
recompiles are what FSDP could change; inductor's C++ code generation is tested in one process,
``test_rollout_static.py``, and costs ~30 s per compile here). About 15 s on the shared 2-core machine.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import socket
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from engine_tiny import build_tokenizer
from transformers import Qwen3Config, Qwen3ForCausalLM

from atesd.engine import decode, distributed
from atesd.engine.decode import StaticRollout
from atesd.engine.evaluation import evaluate_problems
from atesd.engine.hf_rollout import HFRollout
from atesd.engine.models import add_lora
from atesd.engine.probes import probe_accuracy
from atesd.engine.rollout import build_rollout
from atesd.engine.sampling import problem_seeds
from atesd.engine.task import get_task

PROMPTS = ["a longer prompt here", "hi", "(3+4)*5=?", "x"]  # the global batch: rank r decodes 2r, 2r+1
PROBLEMS = [{"problem": f"({a}+{a + 1})*2?", "answer": str(4 * a + 2)} for a in range(5)]
# (--fsdp mode, LoRA merged into fused copies, LM head tied to the embeddings: replicated under full)
CASES = [("lora", True, False), ("full", True, False), ("full", False, True)]


def _model(vocab: int, tied: bool):
    """A random GQA Qwen3 with peft LoRA on every projection, B random (the adapter changes the tokens)."""
    torch.manual_seed(2)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=256, tie_word_embeddings=tied,
        initializer_range=0.3, attn_implementation="sdpa",
    )  # fmt: skip
    model = add_lora(Qwen3ForCausalLM(cfg).float(), 4, 8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _grade(completion: str, gold: str) -> bool:
    return (int(gold) // 2 + sum(map(ord, completion))) % 2 == 0  # deterministic, mixes True and False


def _eval(model, tok, decoder) -> list:
    res = evaluate_problems(model, tok, PROBLEMS, _grade, temperature=0.0, max_new_tokens=8, decoder=decoder)
    return [r["completions"] for r in res["results"]] + [res["accuracy"]]


def _compile_with_the_eager_backend() -> None:
    real = torch.compile

    def traced(fn, **kw):  # dynamo traces the step (fullgraph: no graph break), its eager backend runs it
        return real(fn, backend="eager", fullgraph=True)

    torch.compile = traced


def _track_decoder_tensors(refs: list) -> None:
    """Record a weak reference to every decoder the engines build and to each of its tensors."""
    reserve = decode.Qwen3Decoder.reserve

    def spy(self, rows, columns, *a, **kw):
        out = reserve(self, rows, columns, *a, **kw)
        refs.extend(weakref.ref(t) for t in (self, *self.buffers()))
        return out

    decode.Qwen3Decoder.reserve = spy


def _probe(model, rollout, tok) -> float:
    """The trainer's accuracy probe (greedy, through the rollout engine) on the problems, graded by ``_grade``."""
    task = dataclasses.replace(get_task("math"), verify=_grade)
    examples = [SimpleNamespace(student_prompt=tok(p["problem"])["input_ids"], answer=p["answer"]) for p in PROBLEMS]
    return probe_accuracy(model, rollout, tok, task, examples, max_new_tokens=8, eos_ids={tok.eos_token_id})


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from torch._dynamo.utils import counters

    _compile_with_the_eager_backend()
    tok = build_tokenizer()
    prompts = [tok(s)["input_ids"] for s in PROMPTS]
    greedy = dict(num_samples=2, max_new_tokens=14, eos_ids={tok.eos_token_id, 7}, pad_id=0, temperature=0.0)
    sampled = {**greedy, "temperature": 1.1, "top_k": 20, "top_p": 0.95}
    # one process (no group yet): the unsharded models, every prompt, every problem
    alone = {}
    for tied in {tied for _, _, tied in CASES}:
        model = _model(len(tok), tied)
        engine = StaticRollout(model)
        greedy_rollouts = engine.sample(prompts, **greedy)
        assert greedy_rollouts == HFRollout(model).sample(prompts, **greedy)
        seeds = problem_seeds(0, 1, range(len(prompts)))
        alone[tied] = dict(
            greedy=greedy_rollouts, sampled=HFRollout(model).sample(prompts, seeds=seeds, **sampled),
            eval=_eval(model, tok, engine), probe=_probe(model, engine, tok),
        )  # fmt: skip
        assert len({c[0] for c in alone[tied]["eval"][:-1]}) > 1  # the problems' completions differ
    refs: list = []
    _track_decoder_tensors(refs)
    report = {}
    with distributed.process_group("cpu", timeout_s=120):
        mine = distributed.shard(len(prompts))
        local = [prompts[j] for j in mine]
        for mode, merge, tied in CASES:
            want = alone[tied]
            model = _model(len(tok), tied)
            parallel = distributed.DataParallel(model, mode)
            static = StaticRollout(model, merge=merge)
            compiled = build_rollout("compiled", model)
            assert static.transient and static.decoder is None and "gathered per rollout" in compiled.name
            hf = HFRollout(model)
            with parallel.gathered():
                for engine in (static, compiled):
                    assert engine.sample(local, **greedy) == hf.sample(local, **greedy)
                    assert engine.sample(local, **greedy) == [want["greedy"][j] for j in mine]
                    graphs = []
                    for step in (1, 2, 3):  # each rollout reads newly built decoder tensors: the same graphs
                        seeds = problem_seeds(0, step, mine)
                        got = engine.sample(local, seeds=seeds, **sampled)
                        assert got == hf.sample(local, seeds=seeds, **sampled)
                        assert step > 1 or got == [want["sampled"][j] for j in mine]
                        graphs.append(counters["stats"]["unique_graphs"])
                    assert len({tuple(r) for g in got for r in g}) > 1  # really sampled
                    assert graphs[0] == graphs[-1], graphs  # no recompile for a new rollout's decoder
                    assert engine.decoder is None
                assert compiled.compiled is not None, "the compiled step fell back to eager"
                got_eval = _eval(model, tok, static)  # sharded over the ranks, gathered in problem order
                assert got_eval == _eval(model, tok, None)  # HF generate on the gathered model: the same
                if distributed.is_main():  # the trainer probes on rank 0 alone: rank 1 runs no forward here
                    assert _probe(model, compiled, tok) == want["probe"]
            assert got_eval == want["eval"]
            # nothing the decoders allocated or referenced outlives a rollout: merged weights, caches, tables
            gc.collect()
            assert refs and all(r() is None for r in refs), sum(r() is not None for r in refs)
            refs.clear()
            # outside gathered() the weights are shards: one line, before any forward (no collective to hang on)
            with pytest.raises(RuntimeError, match=r"decode inside DataParallel\.gathered\(\)"):
                static.sample(local, **greedy)
            report[f"{mode}-{'merged' if merge else 'unmerged'}-{'tied' if tied else 'untied'}"] = dict(
                eval=got_eval[-1], probe=want["probe"]
            )
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(report, fh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_static_decoder_under_fsdp_matches_hf_and_one_process(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1] and len(reports[0]) == len(CASES)  # every case ran on both ranks
