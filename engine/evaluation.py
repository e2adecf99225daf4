"""Evaluation as a library: sample completions in batches (static-cache decoder or HF ``generate``), grade them,
report Average@n and pass@k.

:func:`evaluate_problems` (any grader; the paper's protocol by default) and :func:`evaluate_task` (a task's
prompts, verifier and protocol) are what the trainer's periodic evaluation (``engine/evaluator.py``) and the
command line (``python -m engine.evaluate``, ``engine/evaluate.py``) call. Defaults come from the task
(``engine.task``): math uses OPSD's evaluation prompt and the paper's protocol (thinking on, T=1.0, top-p 0.95, no
top-k, 38912 new tokens, n=12, Average@12); a task that generates its own problems brings its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from atesd.engine import benchmarks, distributed, models
from atesd.engine.exposure import render
from atesd.engine.grading import average_at_n, mean_pass_at_k
from atesd.engine.sampling import problem_seeds
from atesd.engine.task import PAPER_EVAL, PromptTemplates, Task, get_task, is_task
from atesd.engine.task import task_options as resolve_task_options

log = logging.getLogger("engine.evaluate")
PROGRESS_DELAY_S = 3.0  # an evaluation's progress bar appears once it has run this long (short ones stay quiet)
_NOTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> messages already logged about it


def _once(model, level: int, message: str) -> None:
    """Log ``message`` once per model (a run's periodic evaluations say it at the first one only)."""
    noted = _NOTED.setdefault(model, set())
    if message not in noted:
        noted.add(message)
        log.log(level, "%s", message)


def _k_values(n: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    return ks + ([n] if n not in ks else [])


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    seed: int = 0,
    decoder=None,
    progress: str | None = None,
) -> list[str]:
    """One completion per prompt string (already chat-formatted), left-padded batches of ``batch_size``.

    ``decoder``: a static-cache decoder (``engine.decode.StaticRollout``, what ``--rollout`` built) decodes
    instead of HF ``generate`` when its cache fits in memory (else HF, logged): greedy completions are the same
    tokens, faster; sampled rows draw from their own streams, seeded by (``seed``, position in ``prompts``).
    Global torch RNG state is saved and restored, so evaluating inside training does not perturb it.
    ``progress``: a label for a progress bar over the completions on stderr (with its time estimate), shown once
    the generation has run :data:`PROGRESS_DELAY_S` seconds; None: no bar.
    """
    if batch_size < 1 or max_new_tokens < 1 or temperature < 0:
        raise ValueError(
            f"bad sampling args: batch_size={batch_size} max_new_tokens={max_new_tokens} "
            f"temperature={temperature}"
        )
    was_training = model.training
    model.eval()
    rng_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    gen_kw: dict = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": pad_id}
    if temperature > 0:
        gen_kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        gen_kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    # Length-sorted batches waste less padding; results are put back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    if decoder is not None and prompts:
        longest = len(tokenizer(prompts[order[-1]], add_special_tokens=False)["input_ids"])
        if not decoder.fits(min(batch_size, len(prompts)), longest + max_new_tokens):
            log.info("evaluation: a static KV cache of %d rows x %d tokens would not fit in memory; decoding "
                     "with HF generate", min(batch_size, len(prompts)), longest + max_new_tokens)
            decoder = None
    bar = tqdm(total=len(prompts), desc=progress, unit="completion", file=sys.stderr, leave=False,
               delay=PROGRESS_DELAY_S, disable=progress is None or not prompts, dynamic_ncols=True)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            if decoder is not None:
                ids = [tokenizer(prompts[i], add_special_tokens=False)["input_ids"] for i in idx]
                seqs = decoder.generate(
                    ids, max_new_tokens=max_new_tokens, eos_ids=set(eos), pad_id=pad_id, temperature=temperature,
                    top_p=top_p, top_k=top_k, seeds=problem_seeds(seed, 0, idx) if temperature > 0 else None,
                )  # fmt: skip
                texts = tokenizer.batch_decode(seqs, skip_special_tokens=True)
            else:
                enc = tokenizer(
                    [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                gen = model.generate(**enc, **gen_kw)
                texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = t
            bar.update(len(idx))
    finally:
        bar.close()
        tokenizer.padding_side = pad_side
        torch.set_rng_state(rng_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        model.train(was_training)
    return out


def evaluate_problems(
    model,
    tokenizer,
    problems: Sequence[dict],
    grader: Callable[[str, str], bool],
    *,
    n_samples: int = PAPER_EVAL.n_samples,
    max_new_tokens: int = PAPER_EVAL.max_new_tokens,
    temperature: float = PAPER_EVAL.temperature,
    top_p: float = PAPER_EVAL.top_p,
    top_k: int = PAPER_EVAL.top_k,
    thinking: bool | None = PAPER_EVAL.thinking,
    batch_size: int = 32,
    seed: int = 0,
    prompt_suffix: str = "",
    chat_kwargs: dict | None = None,
    messages_fn: Callable[[dict], list[dict]] | None = None,
    templates: PromptTemplates | None = None,
    decoder=None,
    context_length: int | None = None,
    progress: str | None = None,
) -> dict:
    """Sample ``n_samples`` completions per problem (dicts with ``problem``, ``answer``, optional ``level``)
    from the evaluation prompt, grade them with ``grader(completion, answer)`` (or ``grader.grade_many``).
    Defaults: the paper's protocol and OPSD's evaluation prompt (``templates.evaluation``, else the student's;
    default: the math task's).
    ``thinking`` is the chat template's ``enable_thinking`` (None: not passed); ``chat_kwargs`` adds more.

    Returns ``{"accuracy": Average@n, "pass@k": {k: ..}, "per_level": {level: Average@n}, "n": #problems,
    "n_samples", "results": [per-problem dicts]}``. Greedy (``temperature == 0``) uses one sample.
    ``messages_fn(problem_dict) -> chat messages`` replaces the evaluation prompt (e.g. to score a teacher).
    ``decoder``: the static-cache decoder to generate with (:func:`generate_completions`; None: HF ``generate``).
    Prompts are rendered by ``engine.exposure.render`` (the chat template training uses).

    ``context_length``: positions the model attends over (None: ``engine.models.context_length`` of the model and
    tokenizer). A generation cap beyond it is capped to what fits after the longest prompt (logged once, with
    both numbers) and the cap used is returned as ``max_new_tokens``; a prompt that fills the context is a
    ValueError. ``progress``: label of a progress bar over the completions (None: none).

    Under torchrun every rank must call it with the same problems: rank r generates and grades problems
    r, r+N, r+2N, ... and every rank returns the gathered whole. Greedy results do not depend on N; sampled ones
    draw from a stream per rank.
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    for j, p in enumerate(problems):
        if "problem" not in p or "answer" not in p:
            raise ValueError(f"problem {j} lacks a 'problem' or 'answer' field: keys {sorted(p)}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    n = 1 if temperature == 0 else n_samples
    chat_kwargs = {**({} if thinking is None else {"enable_thinking": thinking}), **(chat_kwargs or {})}
    templates = templates or get_task("math").templates
    rank, world = distributed.rank(), distributed.world_size()
    messages = [messages_fn(p) if messages_fn else templates.evaluation_messages(p["problem"] + prompt_suffix)
                for p in problems]
    every = [render(tokenizer, m, **chat_kwargs) for m in messages]  # all: the generation cap fits the longest
    max_new_tokens = fit_generation(model, tokenizer, every, max_new_tokens, context_length)
    prompts = every[rank::world]  # this rank's problems r, r+N, ... (all of them with one process)
    mine = problems[rank::world]
    flat = [pr for pr in prompts for _ in range(n)]
    t0 = time.time()
    comps = generate_completions(
        model,
        tokenizer,
        flat,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        batch_size=batch_size,
        seed=seed if world == 1 else seed + 1_000_003 * rank,
        decoder=decoder,
        progress=progress,
    )
    gen_s = time.time() - t0
    golds = [str(p["answer"]) for p in mine for _ in range(n)]
    flags = grade_all(grader, comps, golds)
    if world > 1:
        comps, flags, gen_s = _gather_strided(comps, flags, gen_s, len(problems), n)
    correct = [flags[i * n : (i + 1) * n] for i in range(len(problems))]
    results, by_level = [], defaultdict(list)
    for p, c, row in zip(problems, [comps[i * n : (i + 1) * n] for i in range(len(problems))], correct):
        results.append(
            {
                "problem": p["problem"],
                "answer": str(p["answer"]),
                "level": p.get("level"),
                "completions": c,
                "correct": row,
                "frac_correct": sum(row) / n,
            }
        )
        if p.get("level") is not None:
            by_level[p["level"]].append(row)
    return {
        "accuracy": average_at_n(correct),
        "pass@k": {k: mean_pass_at_k(correct, k) for k in _k_values(n)},
        "per_level": {lv: average_at_n(rows) for lv, rows in sorted(by_level.items())},
        "n": len(problems),
        "n_samples": n,
        "max_new_tokens": max_new_tokens,
        "generate_seconds": round(gen_s, 2),
        "results": results,
    }


def fit_generation(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, context: int | None = None) -> int:
    """The generation cap that fits the model's context (``context``, default ``models.context_length``) after
    the longest of ``prompts``: ``max_new_tokens`` when it fits, else the room left (logged once per model, with
    both numbers). A prompt that leaves no room is a one-line ValueError."""
    context = context if context is not None else models.context_length(model, tokenizer)
    if context is None or not prompts:
        return max_new_tokens
    longest = max(len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"])
    room = context - longest
    if room < 1:
        raise ValueError(f"the longest evaluation prompt has {longest} tokens, which fills the model's context of "
                         f"{context} positions: nothing can be generated (shorten the prompt template)")
    if max_new_tokens > room:
        _once(model, logging.WARNING, f"evaluation: the generation cap of {max_new_tokens} new tokens does not fit the "
              f"model's context of {context} positions after the longest prompt ({longest} tokens): capped to "
              f"{room} new tokens")
        return room
    return max_new_tokens


def evaluation_set(
    name: str,
    run_task: Task,
    *,
    n_problems: int,
    seed: int = 0,
    task_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
) -> tuple[str, Task, list[dict]]:
    """``(key, task, problems)`` of one evaluation set, read the same way by training's periodic evaluation and by
    ``engine.evaluate`` (so both evaluate the same problems):

    - a task with its own problems (``lab``): ``n_problems`` of its held-out split (``dataset("test", ...)``)
      drawn with ``seed`` and the options it declares from ``task_options`` (the lab's levels), graded by it;
    - a local ``.jsonl`` (``problem``, ``answer``; key: the file's name without extension) or a hub benchmark
      (:data:`engine.benchmarks.BENCHMARKS`): its first ``limit`` rows (None: all), through ``run_task``.

    A name that is neither, or a task without problems of its own, is a one-line ValueError."""
    if is_task(name):
        task = get_task(name)
        if task.dataset is None:
            raise ValueError(f"task {name!r} has no problems of its own")
        if n_problems < 1:
            raise ValueError(f"{name} needs a number of problems > 0, got {n_problems}")
        return name, task, task.dataset("test", n_problems, seed, **resolve_task_options(task, task_options))
    if name.endswith(".jsonl"):
        return os.path.splitext(os.path.basename(name))[0], run_task, benchmarks.load_jsonl(name)[:limit]
    if name in benchmarks.BENCHMARKS:
        return name, run_task, benchmarks.load_benchmark(name)[:limit]
    raise ValueError(f"unknown benchmark {name!r}; choose from a task with its own problems, "
                     f"{', '.join(sorted(benchmarks.BENCHMARKS))} or a local .jsonl")


@contextlib.contextmanager
def task_grader(task: Task, workers: int = 2):
    """The task's verifier ``(completion, answer) -> bool``, or, when it has none, math-verify in ``workers``
    processes (``grading.MathGrader``, shut down on exit)."""
    if task.verify is not None:
        yield task.verify
        return
    from atesd.engine.grading import MathGrader

    with MathGrader(workers=workers) as grader:
        yield grader


def grade_all(grader, completions: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """``grader`` over pairs: its ``grade_many`` when it has one (worker pools), else one call per pair."""
    if hasattr(grader, "grade_many"):
        return grader.grade_many(completions, answers)
    return [bool(grader(c, a)) for c, a in zip(completions, answers)]


def evaluate_task(
    model,
    tokenizer,
    problems: Sequence[dict],
    task: Task | str,
    *,
    templates: PromptTemplates | None = None,
    batch_size: int = 32,
    seed: int = 0,
    keep_results: bool = False,
    messages_fn: Callable[[dict], list[dict]] | None = None,
    workers: int = 2,
    decoder=None,
    context_length: int | None = None,
    progress: str | None = None,
    **protocol: float | int | bool | None,
) -> dict:
    """Accuracy on ``problems`` with a task's evaluation prompt (or ``templates``), verifier (math-verify in
    ``workers`` processes when it has none) and evaluation protocol; ``protocol`` keys of
    :class:`engine.task.EvalProtocol` (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``,
    ``n_samples``, ``thinking``) override it (None: keep). Returns :func:`evaluate_problems`' dict
    (without ``results`` unless ``keep_results``) plus ``protocol``, whose ``max_new_tokens`` is the cap used
    (with ``max_new_tokens_asked`` when the model's context capped it)."""
    task = get_task(task) if isinstance(task, str) else task
    proto = task.eval.replace(**protocol)
    kw = dict(n_samples=proto.n_samples, max_new_tokens=proto.max_new_tokens, temperature=proto.temperature,
              top_p=proto.top_p, top_k=proto.top_k, thinking=proto.thinking, batch_size=batch_size, seed=seed,
              messages_fn=messages_fn, templates=templates or task.templates, decoder=decoder,
              context_length=context_length, progress=progress)
    with task_grader(task, workers) as grader:
        res = evaluate_problems(model, tokenizer, problems, grader, **kw)
    if not keep_results:
        res.pop("results")
    res["protocol"] = dict(vars(proto))
    if res.get("max_new_tokens", proto.max_new_tokens) != proto.max_new_tokens:
        res["protocol"].update(max_new_tokens=res["max_new_tokens"], max_new_tokens_asked=proto.max_new_tokens)
    return res


def _gather_strided(
    comps: list[str], flags: list[bool], gen_s: float, n_problems: int, n: int
) -> tuple[list[str], list[bool], float]:
    """Every rank's completions and grades (rank r holds problems r, r+N, ..., n samples each), back in problem
    order on every rank; the generation time is the slowest rank's."""
    parts = distributed.all_gather((comps, flags, gen_s))
    world = len(parts)
    all_comps: list[str] = [""] * (n_problems * n)
    all_flags: list[bool] = [False] * (n_problems * n)
    for r, (c, f, _) in enumerate(parts):
        for k, i in enumerate(range(r, n_problems, world)):
            all_comps[i * n : (i + 1) * n] = c[k * n : (k + 1) * n]
            all_flags[i * n : (i + 1) * n] = f[k * n : (k + 1) * n]
    return all_comps, all_flags, max(p[2] for p in parts)
