"""Evaluation: sample completions in batches (static-cache decoder or HF ``generate``), grade, report Average@n
and pass@k.

    python -m engine.evaluate --model Qwen/Qwen3-1.7B [--adapter run/checkpoints/step-000100] \\
        --benchmarks aime24,aime25,hmmt25                # the paper's protocol, Average@12
    python -m engine.evaluate --adapter runs/x/checkpoints/step-000100 \\
        --benchmarks aime24,aime25,hmmt25                # base model from the checkpoint; --model overrides
    python -m engine.evaluate --model tiny --benchmarks lab  # the lab's protocol: greedy
    python -m engine.evaluate --model <dir> --data local.jsonl        # rows with problem + answer

Defaults come from the task (``engine.task``): math benchmarks use the ``math`` task, i.e. OPSD's evaluation
prompt and the paper's protocol (OPSD's): thinking on, T=1.0, top-p 0.95, no top-k, 38912 new tokens,
n=12, Average@12; a task that generates its own problems (``--benchmarks lab``) uses its own (the lab:
greedy, 128 tokens). Every flag overrides its part of the protocol; ``--greedy`` is T=0 with one sample.

Python API: :func:`evaluate_problems` (any grader; the paper's protocol by default), :func:`evaluate_task`
(a task's prompts, verifier and protocol) and :func:`evaluate_lab` (the lab task), the latter two used by the
trainer's periodic evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from atesd.engine import distributed
from atesd.engine.config import OneLineParser
from atesd.engine.errors import DataError, UsageError
from atesd.engine.grading import average_at_n, mean_pass_at_k
from atesd.engine.sampling import problem_seeds
from atesd.engine.task import PAPER_EVAL, PromptTemplates, Task, get_task, is_task, resolve_templates

# name -> (hub dataset ids tried in order, split, problem column, answer column)
BENCHMARKS: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "aime24": (("HuggingFaceH4/aime_2024",), "train", "problem", "answer"),
    "aime25": (("yentinglin/aime_2025", "math-ai/aime25"), "train", "problem", "answer"),
    "hmmt25": (("MathArena/hmmt_feb_2025",), "train", "problem", "answer"),
}
log = logging.getLogger("engine.evaluate")


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
) -> list[str]:
    """One completion per prompt string (already chat-formatted), left-padded batches of ``batch_size``.

    ``decoder``: a static-cache decoder (``engine.decode.StaticRollout``, what ``--rollout`` built) decodes
    instead of HF ``generate`` when its cache fits in memory (else HF, logged): greedy completions are the same
    tokens, faster; sampled rows draw from their own streams, seeded by (``seed``, position in ``prompts``).
    Global torch RNG state is saved and restored, so evaluating inside training does not perturb it.
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
    finally:
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
    mine = [problems[i] for i in range(rank, len(problems), world)]  # all of them with one process
    prompts = [
        tokenizer.apply_chat_template(
            messages_fn(p) if messages_fn else templates.evaluation_messages(p["problem"] + prompt_suffix),
            tokenize=False,
            add_generation_prompt=True,
            **chat_kwargs,
        )
        for p in mine
    ]
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
        "generate_seconds": round(gen_s, 2),
        "results": results,
    }


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
    **protocol: float | int | bool | None,
) -> dict:
    """Accuracy on ``problems`` with a task's evaluation prompt (or ``templates``), verifier (math-verify in
    ``workers`` processes when it has none) and evaluation protocol; ``protocol`` keys of
    :class:`engine.task.EvalProtocol` (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``,
    ``n_samples``, ``thinking``) override it (None: keep). Returns :func:`evaluate_problems`' dict
    (without ``results`` unless ``keep_results``) plus ``protocol``."""
    task = get_task(task) if isinstance(task, str) else task
    proto = task.eval.replace(**protocol)
    kw = dict(n_samples=proto.n_samples, max_new_tokens=proto.max_new_tokens, temperature=proto.temperature,
              top_p=proto.top_p, top_k=proto.top_k, thinking=proto.thinking, batch_size=batch_size, seed=seed,
              messages_fn=messages_fn, templates=templates or task.templates, decoder=decoder)
    with task_grader(task, workers) as grader:
        res = evaluate_problems(model, tokenizer, problems, grader, **kw)
    if not keep_results:
        res.pop("results")
    res["protocol"] = dict(vars(proto))
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


def evaluate_lab(
    model,
    tokenizer,
    problems: Sequence[dict],
    *,
    n_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    seed: int = 0,
    keep_results: bool = False,
    messages_fn: Callable[[dict], list[dict]] | None = None,
) -> dict:
    """Lab-task accuracy (:func:`evaluate_task` with the ``lab`` task): ``{"accuracy", "per_level", "n",
    "n_samples", "pass@k"}``. ``temperature=0`` is greedy; accuracy is Average@n over ``n_samples`` samples
    otherwise. ``messages_fn`` as in :func:`evaluate_problems` (default: the lab's student prompt)."""
    return evaluate_task(
        model, tokenizer, problems, "lab", n_samples=n_samples, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
        keep_results=keep_results, messages_fn=messages_fn,
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_benchmark(name: str) -> list[dict]:
    """Rows ``{"problem", "answer"}`` of a hub benchmark in :data:`BENCHMARKS`; fails naming the dataset."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)} or 'lab'")
    ids, _, pcol, acol = BENCHMARKS[name]
    import datasets
    from datasets import load_dataset

    if not _hub_reachable():
        # Cache only: otherwise datasets retries the hub for ~30 s per dataset id before failing.
        import huggingface_hub.constants as hub_constants

        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    errors = []
    for ds_id in ids:
        try:
            dd = load_dataset(ds_id)
        except Exception as e:  # noqa: BLE001 - offline, missing, renamed: try the next id, then report all
            errors.append(f"{ds_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        split = next((s for s in ("test", "train") if s in dd), next(iter(dd)))
        ds = dd[split]
        cols = {c.lower(): c for c in ds.column_names}
        if pcol not in cols or acol not in cols:
            errors.append(f"{ds_id}: columns {ds.column_names} lack {pcol!r}/{acol!r}")
            continue
        return [{"problem": r[cols[pcol]], "answer": str(r[cols[acol]]), "source": ds_id} for r in ds]
    raise RuntimeError(
        f"could not load benchmark {name!r} (tried {', '.join(ids)}; no network or cache?):\n  "
        + "\n  ".join(errors)
    )


def load_jsonl(path: str) -> list[dict]:
    """Local jsonl with ``problem`` and ``answer`` fields per line. Unreadable lines and rows lacking a field are
    skipped and counted (logged); a file with no usable row is a DataError naming it and the counts."""
    from atesd.engine.data import read_records

    records, skipped = read_records(path)
    rows = [
        {"problem": str(r["problem"]), "answer": str(r["answer"]), "level": r.get("level")}
        for r in records
        if r.get("problem") is not None and r.get("answer") is not None
    ]
    missing = len(records) - len(rows)
    if not rows:
        keys = sorted({k for r in records for k in r})[:8]
        raise DataError(
            f"{path}: no usable row: {missing} row(s) lack 'problem'/'answer' (keys seen: {', '.join(keys)})"
            + (f"; skipped lines: {skipped.describe()}" if skipped.lines else "")
        )
    if missing:
        log.warning("%s: skipped %d row(s) lacking 'problem'/'answer'", path, missing)
    return rows


def load_model(
    model: str | None, adapter: str | None = None, device: str | None = None, dtype: str = "auto"
):
    """``(model, tokenizer)`` from a local dir, a hub id or ``tiny`` (the shipped lab model).

    ``adapter``: optional peft adapter directory (a training checkpoint) loaded on top; with ``model=None`` its
    recorded base model is used, and a tokenizer saved in it is preferred. Failures are one-line UsageErrors."""
    from transformers import AutoTokenizer

    from atesd.engine import checkpoint, models

    if model is None:
        model = checkpoint.base_model(adapter) if adapter else "tiny"
        if model is None:
            raise UsageError(f"--adapter {adapter!r} records no base model; give --model")
        if models.model_problem(model):
            raise UsageError(
                f"--adapter {adapter!r} was trained on {model!r}, which is not here "
                f"({models.model_problem(model)}); give --model"
            )
    if adapter:  # read as data before any model loads: safetensors weights, plain files inside it
        if not Path(adapter).is_dir():
            raise UsageError(f"--adapter {adapter!r}: no such directory")
        try:
            checkpoint.verify_adapter(adapter)
        except checkpoint.BrokenCheckpoint as e:
            raise UsageError(f"--adapter {adapter!r} is refused: {e}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    m, tok = models.load_model(model, dtype=torch_dtype, device=device)
    if adapter:
        from peft import PeftModel

        if (Path(adapter) / "tokenizer_config.json").exists():  # the checkpoint's own tokenizer
            tok = AutoTokenizer.from_pretrained(adapter)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        m = PeftModel.from_pretrained(m, adapter).to(device)
    m.eval()
    return m, tok


def _default_out(model: str | None, adapter: str | None) -> Path:
    """<run>/eval/<step-N> for a training checkpoint, else runs/eval-<model>-<time> (never the working dir)."""
    if adapter:
        ckpt = Path(adapter).resolve()
        if ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / "config.yaml").exists():
            return ckpt.parent.parent / "eval" / ckpt.name
    name = Path((model or (Path(adapter).resolve().name if adapter else "tiny")).rstrip("/")).name
    return Path("runs") / f"eval-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_args(args) -> None:
    """Every argument checked before any data or model loads; the first problem is a one-line UsageError."""
    from atesd.engine.config import device_problem
    from atesd.engine.models import model_problem

    def need(ok: bool, flag: str, value, problem: str) -> None:
        if not ok:
            raise UsageError(f"{flag}: {problem}, got {value!r}")

    t = args.temperature
    need(args.n is None or args.n >= 1, "--n", args.n, "must be >= 1")
    need(t is None or (math.isfinite(t) and t >= 0), "--temperature", t, "must be >= 0")
    need(args.top_p is None or 0 < args.top_p <= 1, "--top-p", args.top_p, "must be in (0, 1]")
    need(args.top_k is None or args.top_k >= 0, "--top-k", args.top_k, "must be >= 0")
    cap = args.max_new_tokens
    need(cap is None or cap >= 1, "--max-new-tokens", cap, "must be >= 1")
    need(args.batch_size >= 1, "--batch-size", args.batch_size, "must be >= 1")
    need(args.limit is None or args.limit >= 1, "--limit", args.limit, "must be >= 1")
    need(args.lab_n >= 1, "--lab-n", args.lab_n, "must be >= 1")
    need(args.workers >= 1, "--workers", args.workers, "must be >= 1")
    dtypes = ("auto", "float32", "bfloat16", "float16")
    need(args.dtype in dtypes, "--dtype", args.dtype, f"must be one of {', '.join(dtypes)}")
    if args.device and device_problem(args.device):
        raise UsageError(f"--device {args.device!r}: {device_problem(args.device)}")
    if args.model is not None and model_problem(args.model):
        raise UsageError(f"--model {args.model!r}: {model_problem(args.model)}")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise UsageError(f"--adapter {args.adapter!r}: no such directory")
    if args.data is not None and not Path(args.data).is_file():
        raise UsageError(f"--data {args.data!r}: no such file")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a file, not a directory")


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the summary. Bad input is one line on stderr and exit code 2 (traceback with
    --debug); any other failure one line and exit code 1. Under ``torchrun --nproc_per_node N -m engine.evaluate``
    the problems are sharded over N processes (one GPU each) and rank 0 writes the outputs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--device", default=None)
        device = pre.parse_known_args(argv)[0].device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            kind = "cpu"  # _main's checks name the bad --device
        with distributed.process_group(kind):
            return _main(argv)
    except UsageError as e:
        if "--debug" in argv:
            raise
        _exit(f"error: {'; '.join(ln.strip() for ln in str(e).splitlines() if ln.strip())}", 2)
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        _exit("interrupted", 130)
    except Exception as e:
        if "--debug" in argv:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        _exit(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)", 1)


def _exit(message: str, code: int):
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)


def _main(argv: list[str]) -> dict:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default=None,
        help="local dir, hub id, or 'tiny' (the lab's shipped model); default: the --adapter's base model, else tiny",
    )
    ap.add_argument("--adapter", default=None, help="peft adapter dir, e.g. <run>/checkpoints/step-000080")
    ap.add_argument("--benchmarks", default="", help="comma list of aime24,aime25,hmmt25 and/or a task with "
                    "its own problems (lab: its held-out split)")
    ap.add_argument("--data", default=None, help="local jsonl with problem + answer columns")
    ap.add_argument("--task", default="math", help="task whose prompts, verifier and protocol the math "
                    "benchmarks and --data use: math (OPSD's prompt, the paper's protocol), or module:ATTR")
    ap.add_argument("--prompts", default=None, help="YAML/JSON file overriding the task's prompt templates")
    ap.add_argument("--n", type=int, default=None, help="samples per problem, Average@n (default: the task's: "
                    "12 for math, 1 for lab)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the task's (1.0 math, 0 lab)")
    ap.add_argument("--top-p", type=float, default=None, help="default: the task's (0.95 math)")
    ap.add_argument("--top-k", type=int, default=None, help="0 = off; default: the task's (off for math)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (38912 math, 128 lab)")
    ap.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                    help="enable_thinking of the chat template (default: the task's: on for math)")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding, one sample (T=0)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--decoder", default="auto", choices=("auto", "hf", "static", "compiled"),
                    help="auto: the static-cache decoder (compiled on CUDA) where the model allows and its cache "
                         "fits, else HF generate; hf: always HF generate (as --rollout of engine.train)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--lab-n", type=int, default=200, help="problems of a task's held-out split (lab)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--workers", type=int, default=2, help="grading worker processes")
    ap.add_argument(
        "--out",
        default=None,
        help="directory for <bench>.jsonl and summary.json (default: <run>/eval/<step-N> for a training checkpoint "
        "given as --adapter, else runs/eval-<model>-<time>)",
    )
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    _check_args(args)

    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if args.data:
        names.append("data")
    if not names:
        ap.error("give --benchmarks and/or --data")
    for b in names:
        if b not in BENCHMARKS and b != "data" and not is_task(b):
            ap.error(f"unknown benchmark {b!r}; choose from {sorted(BENCHMARKS)} or a task with its own problems")
    try:
        default_task = get_task(args.task)
        resolve_templates(default_task, args.prompts)  # a bad --prompts file fails here, before anything loads
    except ValueError as e:
        ap.error(str(e))
    # Load every dataset before the model: a missing dataset fails in seconds, not after a model load.
    sets: dict[str, tuple[Task, list[dict]]] = {}
    for b in names:
        if b == "data":
            sets[b] = (default_task, load_jsonl(args.data))
        elif b in BENCHMARKS:
            try:
                sets[b] = (default_task, load_benchmark(b))
            except RuntimeError as e:
                raise DataError(str(e)) from None
        else:
            task = get_task(b)
            if task.dataset is None:
                ap.error(f"task {b!r} has no problems of its own; give a benchmark or --data")
            sets[b] = (task, task.dataset("test", args.lab_n, 0))
        if args.limit:
            sets[b] = (sets[b][0], sets[b][1][: args.limit])

    from atesd.engine import checkpoint as _checkpoint

    model, tok = load_model(args.model, args.adapter, args.device, args.dtype)
    from atesd.engine.rollout import build_rollout

    decoder = build_rollout(args.decoder, model)
    decoder = decoder if hasattr(decoder, "generate") else None  # the HF loop: model.generate itself
    main_rank = distributed.is_main()
    out = Path(args.out) if args.out else _default_out(args.model, args.adapter)
    out = Path(distributed.broadcast(str(out)))  # one directory: the ranks' clocks may straddle a second
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    overrides = dict(n_samples=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     max_new_tokens=args.max_new_tokens, thinking=args.thinking)
    if args.greedy:
        overrides.update(temperature=0.0, n_samples=1)
    summary: dict = {
        "model": args.model or (_checkpoint.base_model(args.adapter) if args.adapter else "tiny"),
        "adapter": args.adapter,
        "seed": args.seed,
        "benchmarks": {},
    }
    for b, (task, probs) in sets.items():
        res = evaluate_task(
            model, tok, probs, task, templates=resolve_templates(task, args.prompts), batch_size=args.batch_size,
            seed=args.seed, keep_results=True, workers=args.workers, decoder=decoder, **overrides,
        )
        results = res.pop("results")
        summary["benchmarks"][b] = res
        if not main_rank:
            continue
        with open(out / f"{b}.jsonl", "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        pk = "  ".join(f"pass@{k} {v:.4f}" for k, v in res["pass@k"].items())
        lv = "  ".join(f"L{k} {v:.3f}" for k, v in res["per_level"].items())
        p = res["protocol"]
        how = "greedy" if p["temperature"] == 0 else f"T={p['temperature']:g} top-p {p['top_p']:g} top-k {p['top_k']}"
        print(f"{b:8s} n={res['n']:4d}  Average@{res['n_samples']} {res['accuracy']:.4f}  {pk}  {lv}  "
              f"({how}, {p['max_new_tokens']} tokens, thinking {'on' if p['thinking'] else 'off'})")
    if main_rank:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"results: {out}")
    return summary


def cli() -> None:
    """Console-script entry point (``atesd-evaluate``): :func:`main` without its return value."""
    main()


if __name__ == "__main__":
    main()
