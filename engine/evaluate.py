"""Evaluate a model or a training checkpoint: ``python -m engine.evaluate``.

    python -m engine.evaluate --adapter runs/x/checkpoints/step-000060   # as the run evaluated it (its settings)
    python -m engine.evaluate --model Qwen/Qwen3-1.7B [--adapter run/checkpoints/step-000100] \\
        --benchmarks aime24,aime25,hmmt25                # the paper's protocol, Average@12
    python -m engine.evaluate --model tiny --benchmarks lab  # a task's own problems, with its protocol
    python -m engine.evaluate --model <dir> --data local.jsonl        # rows with problem + answer

Defaults come from the task (``engine.task``): math benchmarks use the ``math`` task, i.e. OPSD's evaluation
prompt and the paper's protocol (OPSD's): thinking on, T=1.0, top-p 0.95, no top-k, 38912 new tokens,
n=12, Average@12; a task that generates its own problems (``--benchmarks <task>``) uses its own, on problems drawn
with ``--seed`` and its options (``--task-option levels=1,3``). A run's checkpoint (``RUN/checkpoints/step-N``
beside ``RUN/config.yaml``) is evaluated with the run's own settings (its task, task options, number of held-out
problems, seed, prompts, ``--eval-*`` protocol, benchmarks, decoder and dtype; printed), so the accuracy is the one
training reported for that step in ``RUN/eval_summary.json``. Every flag overrides its part; ``--greedy`` is T=0
with one sample. Prompts are rendered with the chat template training used (``engine.exposure.render``); a
generation cap beyond the model's context is capped to what fits (logged). The library is ``engine/evaluation.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from atesd.engine import checkpoint, distributed, models, threads
from atesd.engine.benchmarks import BENCHMARKS, load_jsonl
from atesd.engine.config import Config, typed_task_options
from atesd.engine.errors import DataError, UsageError
from atesd.engine.evaluation import evaluate_task, evaluation_set
from atesd.engine.exposure import PLAIN_CHAT_TEMPLATE, use_chat_template
from atesd.engine.invocation import read_run_config
from atesd.engine.options import OneLineParser, device_problem, fail, one_line
from atesd.engine.rollout import build_rollout
from atesd.engine.task import Task, get_task, is_task, resolve_templates

log = logging.getLogger("engine.evaluate")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODERS = ("auto", "hf", "static", "compiled")
PROBLEMS_FALLBACK = 200  # problems of a task's held-out split when neither a run nor the model's recipe says


# ------------------------------------------------------------------------------------------ model, tokenizer
def _no_template(tokenizer) -> bool:
    """True when the tokenizer has no chat template of its own (none, or the engine's plain one)."""
    return getattr(tokenizer, "chat_template", None) in (None, "", PLAIN_CHAT_TEMPLATE)


def load_tokenizer(
    model: str, adapter: str | None = None, *, choice: str = "auto", model_given: bool = False,
    chat_template: str | None = None,
):
    """The tokenizer prompts are rendered and decoded with, its chat template decided (and logged) before any
    weights load (``engine.exposure.use_chat_template``: ``chat_template`` when given, else the tokenizer's, else
    the engine's plain one).

    ``choice``: ``adapter``, the checkpoint's own tokenizer (what training saved with it); ``model``, the tokenizer
    of ``model``; ``auto``, the checkpoint's when it holds one, except that when it has no chat template of its own
    and ``model`` was given (``model_given``) with one, ``model``'s (logged)."""
    held = adapter is not None and (Path(adapter) / "tokenizer_config.json").exists()
    if choice == "adapter" and not held:
        raise UsageError(f"--tokenizer adapter: {'--adapter ' + repr(adapter) if adapter else 'no --adapter'} "
                         "holds no tokenizer; use --tokenizer model")
    if held and choice != "model":
        from transformers import AutoTokenizer

        tok, owner = AutoTokenizer.from_pretrained(adapter), f"the tokenizer of checkpoint {adapter}"
        if choice == "auto" and model_given and not chat_template and _no_template(tok):
            base = models.load_tokenizer(model)
            if not _no_template(base):
                log.info("the checkpoint's tokenizer has no chat template of its own: using that of --model %s "
                         "(--tokenizer adapter keeps the checkpoint's)", model)
                if len(base) != len(tok):
                    log.warning("--model %s's tokenizer has %d tokens, the checkpoint's %d", model, len(base), len(tok))
                tok, owner = base, f"the tokenizer of model {model!r}"
    else:
        tok, owner = models.load_tokenizer(model), f"the tokenizer of model {model!r}"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    use_chat_template(tok, chat_template, owner=owner)
    return tok


def load_model(
    model: str | None, adapter: str | None = None, device: str | None = None, dtype: str = "auto", *,
    tokenizer: str = "auto", chat_template: str | None = None,
):
    """``(model, tokenizer)`` from a local dir, a hub id or ``tiny`` (the shipped lab model).

    ``adapter``: optional peft adapter directory (a training checkpoint) loaded on top; with ``model=None`` its
    recorded base model is used. ``tokenizer`` and ``chat_template``: as :func:`load_tokenizer`, decided before
    the weights load. Failures are one-line UsageErrors."""
    given = model is not None
    model = model if given else base_model_of(adapter)
    if adapter:  # read as data before any model loads: safetensors weights, plain files inside it
        check_adapter(adapter)
    tok = load_tokenizer(model, adapter, choice=tokenizer, model_given=given, chat_template=chat_template)
    return load_weights(model, adapter, tok, device, dtype), tok


def load_weights(model: str, adapter: str | None, tokenizer, device: str | None = None, dtype: str = "auto"):
    """The model's weights (with the checked ``adapter`` on top), in eval mode, on ``device`` (default: cuda when
    available) in ``dtype`` (auto: bf16 on GPU, fp32 on CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = (torch.bfloat16 if device.startswith("cuda") else torch.float32) if dtype == "auto" else getattr(
        torch, dtype)
    m, _ = models.load_model(model, dtype=torch_dtype, device=device, tokenizer=tokenizer)
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter).to(device)
    return m.eval()


def base_model_of(adapter: str | None) -> str:
    """The base model a checkpoint records (``tiny`` without an adapter); a one-line UsageError when it records
    none or it is not on this machine."""
    if not adapter:
        return "tiny"
    model = checkpoint.base_model(adapter)
    if model is None:
        raise UsageError(f"--adapter {adapter!r} records no base model; give --model")
    if models.model_problem(model):
        raise UsageError(f"--adapter {adapter!r} was trained on {model!r}, which is not here "
                         f"({models.model_problem(model)}); give --model")
    if models.offline_problem(model):
        raise UsageError(f"--adapter {adapter!r}: its base {models.offline_problem(model)}")
    return model


def check_adapter(adapter: str) -> None:
    """An adapter directory read as data only (``checkpoint.verify_adapter``), else a one-line UsageError."""
    if not Path(adapter).is_dir():
        raise UsageError(f"--adapter {adapter!r}: no such directory")
    try:
        checkpoint.verify_adapter(adapter)
    except checkpoint.BrokenCheckpoint as e:
        raise UsageError(f"--adapter {adapter!r} is refused: {e}") from None


# ------------------------------------------------------------------------------------------------- the run
def run_of(adapter: str | None) -> str | None:
    """The run directory of a run's checkpoint (``RUN/checkpoints/step-N`` beside ``RUN/config.yaml``), else None."""
    if not adapter:
        return None
    ckpt = os.path.normpath(adapter)
    parent = os.path.dirname(ckpt)
    run = os.path.dirname(parent)
    if os.path.basename(parent) == "checkpoints" and os.path.isfile(os.path.join(run or ".", "config.yaml")):
        return run or "."
    return None


def _refuse_run_directory(adapter: str) -> None:
    """A run directory given as --adapter: one line pointing at its checkpoints."""
    if (Path(adapter) / checkpoint.ADAPTER_CONFIG).exists():
        return
    if not ((Path(adapter) / "config.yaml").is_file() or (Path(adapter) / "checkpoints").is_dir()):
        return
    found = [os.path.basename(c) for c in checkpoint.checkpoints(adapter)]
    where = os.path.join(adapter, "checkpoints", "step-N")
    raise UsageError(
        f"--adapter {adapter!r} is a run directory, not a checkpoint: point at one of its checkpoints, {where} ("
        + (f"it has {', '.join(found)}; the newest: --adapter {os.path.join(adapter, 'checkpoints', found[-1])})"
           if found else "it has none yet)")
    )


def _default_out(model: str | None, adapter: str | None) -> Path:
    """<run>/eval/<step-N> for a training checkpoint, else runs/eval-<model>-<time> (never the working dir)."""
    run = run_of(adapter)
    if run is not None:
        return Path(run) / "eval" / Path(os.path.normpath(adapter)).name
    name = Path((model or (Path(adapter).resolve().name if adapter else "tiny")).rstrip("/")).name
    return Path("runs") / f"eval-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------------- arguments
class _KeyValue(argparse.Action):
    """``--task-option KEY=VALUE``, repeatable, into one mapping."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, eq, value = values.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"{option_string} {values!r}: expected KEY=VALUE (e.g. levels=1,3)")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key.strip(): value})


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m engine.evaluate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    run = " (default: the run's, for a run's checkpoint; else "  # the defaults a run's checkpoint brings
    ap.add_argument("--model", default=None, help="local dir, hub id, or a preset ('tiny': the embedded default) "
                    "(default: the --adapter's base model, else tiny)")
    ap.add_argument("--adapter", default=None, help="peft adapter dir, e.g. a run's checkpoint "
                    "<run>/checkpoints/step-000060, whose run's evaluation settings become the defaults")
    ap.add_argument("--tokenizer", default="auto", choices=("auto", "adapter", "model"),
                    help="whose tokenizer (and chat template): the --adapter's (what training saved with it), the "
                    "--model's, or auto: the adapter's unless it has no chat template of its own and --model, given, "
                    "has one (logged) (default: auto)")
    ap.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template file rendering every "
                    "prompt instead of the tokenizer's (default: the tokenizer's; a tokenizer without one gets the "
                    "engine's plain template, logged)")
    ap.add_argument("--benchmarks", default=None, help="comma list of aime24,aime25,hmmt25, local .jsonl files "
                    "and/or a task with its own problems (its held-out split)" + run + "none)")
    ap.add_argument("--data", default=None, help="local jsonl with problem + answer columns (reported as 'data')")
    ap.add_argument("--task", default=None, help="task whose prompts, verifier and protocol the math benchmarks and "
                    "--data use: math (OPSD's prompt, the paper's protocol), or module:ATTR" + run + "math)")
    ap.add_argument("--task-option", action=_KeyValue, default=None, metavar="KEY=VALUE", dest="task_options",
                    help="an option of the evaluated tasks, repeatable, e.g. levels=1,3 for the lab (their options: "
                    "python -m engine.train --help)" + run + "the task's)")
    ap.add_argument("--prompts", default=None, help="YAML/JSON file overriding the prompt templates of --task"
                    + run + "the task's)")
    ap.add_argument("--n", type=int, default=None, help="samples per problem, Average@n" + run + "the task's: "
                    "12 for math)")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature, 0 = greedy" + run
                    + "the task's: 1.0 for math)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold" + run + "the task's: "
                    "0.95 for math)")
    ap.add_argument("--top-k", type=int, default=None, help="top-k sampling, 0 = off" + run + "the task's: off for "
                    "math)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="generation cap, capped to the model's context "
                    "(logged)" + run + "the task's: 38912 for math)")
    ap.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                    help="enable_thinking of the chat template" + run + "the task's: on for math)")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding, one sample (T=0)")
    ap.add_argument("--batch-size", type=int, default=32, help="completions generated together (default: 32, as "
                    "training's evaluations)")
    ap.add_argument("--decoder", default=None, choices=DECODERS,
                    help="auto: the static-cache decoder (compiled on CUDA) where the model allows and its cache "
                         "fits, else HF generate; hf: always HF generate (as --rollout of engine.train)" + run
                         + "auto)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of every set only (default: the "
                    "run's --eval-limit for its math benchmarks; else all)")
    ap.add_argument("--lab-n", type=int, default=None, help="problems drawn from a task's own held-out split"
                    + run.replace("else ", "else the model recipe's --eval-problems (400 for tiny), else ")
                    + f"{PROBLEMS_FALLBACK})")
    ap.add_argument("--seed", type=int, default=None, help="seed of a task's held-out problems and of sampling"
                    + run + "0)")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda[:i] (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"
                    + run + "auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: OMP_NUM_THREADS, else "
                    "the free cores, max(1, round(cores - busy cores)); engine/threads.py)")
    ap.add_argument("--workers", type=int, default=2, help="math-verify grading worker processes (default: 2)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="a progress bar with a time estimate on stderr for evaluations longer than a few seconds "
                    "(default: on)")
    ap.add_argument("--out", default=None, help="directory for <bench>.jsonl and summary.json, created when the "
                    "first results are written (default: <run>/eval/<step-N> for a run's checkpoint, else "
                    "runs/eval-<model>-<time>)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return ap


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
    need(args.lab_n is None or args.lab_n >= 1, "--lab-n", args.lab_n, "must be >= 1")
    need(args.seed is None or args.seed >= 0, "--seed", args.seed, "must be >= 0")
    need(args.workers >= 1, "--workers", args.workers, "must be >= 1")
    need(args.threads is None or args.threads >= 1, "--threads", args.threads, "must be >= 1")
    need(args.dtype is None or args.dtype in DTYPES, "--dtype", args.dtype, f"must be one of {', '.join(DTYPES)}")
    if args.device and device_problem(args.device):
        raise UsageError(f"--device {args.device!r}: {device_problem(args.device)}")
    if args.model is not None and models.model_problem(args.model):
        raise UsageError(f"--model {args.model!r}: {models.model_problem(args.model)}")
    if args.model is not None and models.offline_problem(args.model):  # with what to do instead
        raise UsageError(f"--model: {models.offline_problem(args.model)}")
    if args.adapter is not None:
        if not Path(args.adapter).is_dir():
            raise UsageError(f"--adapter {args.adapter!r}: no such directory")
        _refuse_run_directory(args.adapter)
    if args.tokenizer == "adapter" and args.adapter is None:
        raise UsageError("--tokenizer adapter needs --adapter")
    if args.chat_template is not None:
        from atesd.engine.exposure import chat_template_problem

        problem = chat_template_problem(args.chat_template)
        if problem:
            raise UsageError(f"--chat-template {args.chat_template!r}: {problem}")
    if args.data is not None and not Path(args.data).is_file():
        raise UsageError(f"--data {args.data!r}: no such file")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a file, not a directory")


# ------------------------------------------------------------------------------------------------ settings
PROTOCOL_FLAGS = {  # evaluate_task's protocol key: (this command's flag, the run's Config field)
    "n_samples": ("n", "eval_samples"),
    "temperature": ("temperature", "eval_temperature"),
    "top_p": ("top_p", "eval_top_p"),
    "top_k": ("top_k", "eval_top_k"),
    "max_new_tokens": ("max_new_tokens", "eval_max_new_tokens"),
    "thinking": ("thinking", "eval_thinking"),
}


def _settings(args, run: Config | None, model: str) -> list[str]:
    """Fill every setting left unset on the command line from the run (``run``: its config.yaml), else the defaults;
    returns what the run supplied, as ``--flag value`` texts (printed)."""
    taken: list[str] = []

    def from_run(name: str, value, source: str | None = None) -> None:
        if getattr(args, name) is None and value is not None:
            setattr(args, name, value)
            taken.append(f"--{name.replace('_', '-')} {value}" + (f" (the run's {source})" if source else ""))

    if run is not None:
        if run.task and ":" in run.task and args.task != run.task:  # a run directory is data, not code
            raise UsageError(f"--adapter {args.adapter!r}: its run's config.yaml names the task {run.task!r}, a module "
                             f"that would be imported (code); if you trust it, give --task {run.task}")
        if args.benchmarks is None and args.data is None:
            from_run("benchmarks", run.eval_benchmarks or None)
        from_run("task", run.task)
        from_run("prompts", run.prompts if isinstance(run.prompts, str) else None)
        if args.prompts is None and isinstance(run.prompts, dict):  # a mapping in the run's YAML
            args.prompts = run.prompts
            taken.append("prompts (the run's mapping)")
        args.run_task_options = {k: v for k, v in (run.task_options or {}).items()
                                 if k not in (args.task_options or {})}
        taken += [f"--task-option {k}={v}" for k, v in args.run_task_options.items()]
        from_run("lab_n", run.eval_problems or None, "--eval-problems")
        from_run("seed", run.seed)
        from_run("dtype", run.dtype)
        from_run("decoder", run.rollout, "--rollout")
        for flag, field in PROTOCOL_FLAGS.values():
            from_run(flag, getattr(run, field), "--" + field.replace("_", "-"))
        if args.limit is None and run.eval_limit is not None:
            args.bench_limit = run.eval_limit
            taken.append(f"--eval-limit {run.eval_limit} (the run's, for its math benchmarks)")
    args.run_task_options = getattr(args, "run_task_options", {})
    args.task = args.task or "math"
    args.benchmarks = args.benchmarks or ""
    args.lab_n = args.lab_n or models.recipe_for(model).eval_problems or PROBLEMS_FALLBACK
    args.seed = 0 if args.seed is None else args.seed
    args.dtype = args.dtype or "auto"
    args.decoder = args.decoder or "auto"
    if not hasattr(args, "bench_limit"):
        args.bench_limit = args.limit
    return taken


def _sets(args, names: list[str], run_task: Task) -> dict[str, tuple[Task, list[dict]]]:
    """Every evaluation set, read before the model (a missing dataset fails in seconds, not after a model load)."""
    try:  # the flags typed and checked by the declarations of the evaluated tasks; the run's are typed already
        given = typed_task_options(Config(task=args.task, eval_benchmarks=",".join(names)),
                                   args.task_options or {}, "--task-option")
    except UsageError as e:
        raise UsageError(str(e).replace("no task of this run", "no evaluated task")) from None
    options = {**args.run_task_options, **given}
    sets: dict[str, tuple[Task, list[dict]]] = {}
    for name in names:
        if name == "data":
            task, problems = run_task, load_jsonl(args.data)
        else:
            if name.endswith(".jsonl") and not os.path.isfile(name):
                raise DataError(f"evaluation file {name!r}: no such file")
            try:
                name, task, problems = evaluation_set(name, run_task, n_problems=args.lab_n, seed=args.seed,
                                                      task_options=options, limit=args.bench_limit)
            except RuntimeError as e:  # a hub benchmark that cannot be fetched
                raise DataError(str(e)) from None
        sets[name] = (task, problems[: args.limit] if args.limit else problems)
    return sets


# -------------------------------------------------------------------------------------------- entry points
class _Terminal(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno <= logging.INFO else f"{record.levelname} {text}"


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the summary. Bad input is one line on stderr and exit code 2 (traceback with
    --debug); any other failure one line and exit code 1. Under ``torchrun --nproc_per_node N -m engine.evaluate``
    the problems are sharded over N processes (one GPU each) and rank 0 writes the outputs. What the evaluation
    decides (the run's settings, the chat template, a capped generation) is logged on stderr (rank 0)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    engine_log = logging.getLogger("engine")
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(_Terminal("%(message)s"))
    terminal.setLevel(logging.INFO if distributed.launched_rank() == 0 else logging.WARNING)
    level = engine_log.level
    engine_log.addHandler(terminal)
    engine_log.setLevel(logging.INFO)
    try:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--device", default=None)
        device = pre.parse_known_args(argv)[0].device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            kind = "cpu"  # _main's checks name the bad --device
        with distributed.process_group(kind), threads.kept():  # _main's thread choice ends with the command
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
    finally:
        engine_log.removeHandler(terminal)
        engine_log.setLevel(level)


def _main(argv: list[str]) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    _check_args(args)
    model_name = args.model or base_model_of(args.adapter)
    if args.adapter:  # read as data before anything else: safetensors weights, plain files inside it
        check_adapter(args.adapter)
    run_dir = run_of(args.adapter)
    try:
        run = read_run_config(run_dir) if run_dir else None
    except UsageError as e:
        raise UsageError(f"{e} (the settings of the checkpoint's run; to evaluate it without them, copy the "
                         "checkpoint out of the run)") from None
    taken = _settings(args, run, model_name)

    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if args.data:
        names.append("data")
    if not names:
        ap.error("give --benchmarks and/or --data" + (f" (run {run_dir} evaluated none)" if run_dir else ""))
    for b in names:
        if b not in BENCHMARKS and b != "data" and not b.endswith(".jsonl") and not is_task(b):
            ap.error(f"unknown benchmark {b!r}; choose from {sorted(BENCHMARKS)}, a local .jsonl or a task with its "
                     "own problems")
    try:
        run_task = get_task(args.task)
        resolve_templates(run_task, args.prompts)  # a bad --prompts file fails here, before anything loads
    except ValueError as e:
        ap.error(str(e))
    sets = _sets(args, names, run_task)
    # the evaluation prompt of a set: --prompts applies to --task's sets (as in training), a task's own set keeps its
    uses = {b: task.name == run_task.name for b, (task, _) in sets.items()}
    if args.prompts and not any(uses.values()) and not any("prompts" in t for t in taken):
        raise UsageError(f"--prompts applies to the sets of --task {args.task} (the math benchmarks and --data), and "
                         f"none is evaluated; for a task's own problems give --task {next(iter(sets))}")
    if taken:
        log.info("settings of run %s (its config.yaml; flags override): %s", run_dir, "; ".join(taken))
    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu"):
        threads.configure(args.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        log.info("%s", threads.describe())

    hf_bars = _hf_progress(args.progress and distributed.is_main())
    try:  # the tokenizer and its chat template first (decided and logged), then the weights
        tok = load_tokenizer(model_name, args.adapter, choice=args.tokenizer, model_given=args.model is not None,
                             chat_template=args.chat_template)
        model = load_weights(model_name, args.adapter, tok, args.device, args.dtype)
    finally:
        _hf_progress(hf_bars)
    decoder = build_rollout(args.decoder, model)
    decoder = decoder if hasattr(decoder, "generate") else None  # the HF loop: model.generate itself
    main_rank = distributed.is_main()
    out = Path(args.out) if args.out else _default_out(args.model, args.adapter)
    out = Path(distributed.broadcast(str(out)))  # one directory: the ranks' clocks may straddle a second
    overrides = {key: getattr(args, flag) for key, (flag, _) in PROTOCOL_FLAGS.items()}
    if args.greedy:
        overrides.update(temperature=0.0, n_samples=1)
    summary: dict = {
        "model": model_name,
        "adapter": args.adapter,
        "run": run_dir,
        "settings_from_run": taken,
        "seed": args.seed,
        "chat_template": args.chat_template,
        "benchmarks": {},
    }
    created = not out.exists()
    try:
        for b, (task, probs) in sets.items():
            res = evaluate_task(
                model, tok, probs, task, templates=resolve_templates(task, args.prompts) if uses[b] else None,
                batch_size=args.batch_size, seed=args.seed, keep_results=True, workers=args.workers, decoder=decoder,
                progress=b if args.progress and main_rank else None, **overrides,
            )
            results = res.pop("results")
            summary["benchmarks"][b] = res
            if not main_rank:
                continue
            out.mkdir(parents=True, exist_ok=True)  # only now: a failed evaluation leaves no empty directory
            with open(out / f"{b}.jsonl", "w") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            print(_result_line(b, res), flush=True)
    except BaseException:
        if main_rank and created and out.is_dir() and not any(out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise
    if main_rank:
        print(f"results: {out}")
    return summary


def _result_line(name: str, res: dict) -> str:
    pk = "  ".join(f"pass@{k} {v:.4f}" for k, v in res["pass@k"].items())
    lv = "  ".join(f"L{k} {v:.3f}" for k, v in res["per_level"].items())
    p = res["protocol"]
    how = "greedy" if p["temperature"] == 0 else f"T={p['temperature']:g} top-p {p['top_p']:g} top-k {p['top_k']}"
    cap = f"{p['max_new_tokens']} tokens" + (f" (capped from {p['max_new_tokens_asked']})"
                                             if "max_new_tokens_asked" in p else "")
    return (f"{name:8s} n={res['n']:4d}  Average@{res['n_samples']} {res['accuracy']:.4f}  {pk}  {lv}  "
            f"({how}, {cap}, thinking {'on' if p['thinking'] else 'off'})")


def _hf_progress(enabled: bool) -> bool:
    """Turn transformers' own progress bars (weights loading) on or off; returns whether they were on."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    return was


def cli() -> None:
    """Console-script entry point (``atesd-evaluate``): :func:`main` without its return value."""
    main()


if __name__ == "__main__":
    main()
