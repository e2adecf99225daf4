"""Evaluate a model or a training checkpoint: ``python -m engine.evaluate``.

    python -m engine.evaluate --model Qwen/Qwen3-1.7B [--adapter run/checkpoints/step-000100] \\
        --benchmarks aime24,aime25,hmmt25                # the paper's protocol, Average@12
    python -m engine.evaluate --adapter runs/x/checkpoints/step-000100 \\
        --benchmarks aime24,aime25,hmmt25                # base model from the checkpoint; --model overrides
    python -m engine.evaluate --model tiny --benchmarks lab  # a task's own problems, with its protocol
    python -m engine.evaluate --model <dir> --data local.jsonl        # rows with problem + answer

Defaults come from the task (``engine.task``): math benchmarks use the ``math`` task, i.e. OPSD's evaluation
prompt and the paper's protocol (OPSD's): thinking on, T=1.0, top-p 0.95, no top-k, 38912 new tokens,
n=12, Average@12; a task that generates its own problems (``--benchmarks <task>``) uses its own. Every flag
overrides its part of the protocol; ``--greedy`` is T=0 with one sample. The library is ``engine/evaluation.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from atesd.engine import checkpoint, distributed, models
from atesd.engine.benchmarks import BENCHMARKS, load_benchmark, load_jsonl
from atesd.engine.errors import DataError, UsageError
from atesd.engine.evaluation import evaluate_task
from atesd.engine.options import OneLineParser, device_problem, fail, one_line
from atesd.engine.rollout import build_rollout
from atesd.engine.task import Task, get_task, is_task, resolve_templates


def load_model(
    model: str | None, adapter: str | None = None, device: str | None = None, dtype: str = "auto"
):
    """``(model, tokenizer)`` from a local dir, a hub id or ``tiny`` (the shipped lab model).

    ``adapter``: optional peft adapter directory (a training checkpoint) loaded on top; with ``model=None`` its
    recorded base model is used, and a tokenizer saved in it is preferred. Failures are one-line UsageErrors."""
    from transformers import AutoTokenizer

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
    if args.model is not None and models.model_problem(args.model):
        raise UsageError(f"--model {args.model!r}: {models.model_problem(args.model)}")
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
        fail(f"error: {one_line(e)}", 2)
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        fail("interrupted", 130)
    except Exception as e:
        if "--debug" in argv:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        fail(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)", 1)


def _main(argv: list[str]) -> dict:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default=None,
        help="local dir, hub id, or a preset ('tiny': the embedded default); default: the --adapter's base model, "
        "else tiny",
    )
    ap.add_argument("--adapter", default=None, help="peft adapter dir, e.g. <run>/checkpoints/step-000080")
    ap.add_argument("--benchmarks", default="", help="comma list of aime24,aime25,hmmt25 and/or a task with "
                    "its own problems (its held-out split)")
    ap.add_argument("--data", default=None, help="local jsonl with problem + answer columns")
    ap.add_argument("--task", default="math", help="task whose prompts, verifier and protocol the math "
                    "benchmarks and --data use: math (OPSD's prompt, the paper's protocol), or module:ATTR")
    ap.add_argument("--prompts", default=None, help="YAML/JSON file overriding the task's prompt templates")
    ap.add_argument("--n", type=int, default=None, help="samples per problem, Average@n (default: the task's: "
                    "12 for math)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the task's (1.0 math)")
    ap.add_argument("--top-p", type=float, default=None, help="default: the task's (0.95 math)")
    ap.add_argument("--top-k", type=int, default=None, help="0 = off; default: the task's (off for math)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (38912 math)")
    ap.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                    help="enable_thinking of the chat template (default: the task's: on for math)")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding, one sample (T=0)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--decoder", default="auto", choices=("auto", "hf", "static", "compiled"),
                    help="auto: the static-cache decoder (compiled on CUDA) where the model allows and its cache "
                         "fits, else HF generate; hf: always HF generate (as --rollout of engine.train)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--lab-n", type=int, default=200, help="problems drawn from a task's own held-out split")
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

    model, tok = load_model(args.model, args.adapter, args.device, args.dtype)
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
        "model": args.model or (checkpoint.base_model(args.adapter) if args.adapter else "tiny"),
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
