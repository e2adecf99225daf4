"""Every option of a training run: :class:`Config`, one field per option (``engine/options.py`` says how an option
is declared, typed and checked), with the recipe defaults it takes from the model preset and the checks that need
the machine or several options (:func:`validate`).

Precedence: built-in defaults < model recipe (:meth:`Config.resolve`) < YAML ``--config`` < command-line flags
(``engine/invocation.py`` reads those, and the run's own ``config.yaml`` on ``--resume``).

A task's own options (the lab's size and levels, a user task's) are not fields here: the task declares them
(``Task.options``) and the run carries the values in ``task_options`` (``--task-option KEY=VALUE``, or a
``task_options`` mapping in YAML), typed and checked by the declaring task's declarations, each applied to every
task of the run that declares it (:func:`run_tasks`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from atesd.controller.presets import DEFAULTS as CONTROLLER
from atesd.controller.presets import ESTIMATORS as CONTROLLER_ESTIMATORS
from atesd.controller.presets import EXPLOITS as CONTROLLER_EXPLOITS
from atesd.controller.presets import PRESETS as CONTROLLER_PRESETS
from atesd.controller.presets import SIGNALS as CONTROLLER_SIGNALS
from atesd.controller.presets import UPDATES as CONTROLLER_UPDATES
from atesd.engine.benchmarks import BENCHMARKS
from atesd.engine.errors import UsageError
from atesd.engine.exposure import chat_template_problem
from atesd.engine.models import RECIPES, recipe_for
from atesd.engine.options import (
    Declared,
    at_least,
    declared,
    device_problem,
    flag,
    greater_than,
    in_range,
    option,
    show,
)
from atesd.engine.task import Task, get_task, is_task, resolve_templates

RECIPE_FIELDS = (
    "data",
    "clip",
    "lr",
    "lora_r",
    "lora_alpha",
    "batch_size",
    "micro_batch",
    "max_new_tokens",
    "max_prompt_tokens",
    "max_reference_tokens",
    "steps",
    "eval_problems",
    "lr_schedule",
    "save_every",
    "eval_every",
)
RESUME_MODES = ("run", "change", "invocation")


@dataclass
class Config:
    # model and data
    model: str = option(
        "tiny",
        f"preset ({', '.join(RECIPES)}), hub id or local directory; 'tiny' is the embedded default model",
        path=True,
    )
    data: str | None = option(
        None,
        "a task that generates its problems (by name; the tasks are listed at the end of --help), hub dataset id "
        "or local .json/.jsonl/.parquet (default: the model recipe's; siyanzhao/Openthoughts_math_30k_opsd but for "
        "tiny)",
        path=True,
    )
    split: str = option("train", "dataset split")
    problem_column: str = option("problem", "column holding the problem text")
    solution_column: str = option("solution", "column holding the reference solution (ends in \\boxed{})")
    answer_column: str = option(
        "answer", "column holding the final answer (taken from the last \\boxed{} if absent)"
    )
    # exposure
    exposure: str = option(
        "adaptive",
        "exposure policy: adaptive | full | fixed:<alpha> | random | linear:<a>:<b> | adaptive-onestep",
    )
    exposure_mode: str = option(
        "tokens", "truncate the reference reasoning by 'tokens' or by 'lines'", choices=("tokens", "lines")
    )
    task: str | None = option(
        None,
        "task supplying prompt templates, verifier and evaluation protocol: a registered name (math, built in: "
        "OPSD's prompts, the paper's evaluation; the others: listed at the end of --help) or package.module:ATTRIBUTE "
        "(default: the --data task if it names one, else math)",
    )
    prompts: str | None = option(
        None,
        "YAML/JSON file overriding the task's prompt templates (keys student, teacher, instruction, "
        "student_thinking, teacher_thinking; in a --config YAML also a mapping) (default: the task's)",
        path=True,
        mapping=True,
    )
    chat_template: str | None = option(
        None,
        "Jinja chat template file rendering every prompt of the run, training and evaluation (default: the "
        "tokenizer's; a tokenizer without one gets the engine's plain template, logged)",
        path=True,
        check=chat_template_problem,
    )
    task_options: dict | None = option(
        None,
        "options the run's tasks declare (listed at the end of --help): --task-option KEY=VALUE, repeatable, or a "
        "task_options mapping in the YAML file; each applies to every task of the run that declares it (default: "
        "the tasks')",
    )
    instruction: str | None = option(
        None, "transition instruction after the exposed reference (default: the task template's)"
    )
    teacher: str = option(
        "base",
        "teacher weights: base (adapter off), current (student weights, no grad), ema",
        choices=("base", "current", "ema"),
    )
    ema_decay: float = option(0.99, "EMA decay for --teacher ema", check=in_range(0, 1))
    teacher_thinking: bool | None = option(
        None,
        "Qwen3 thinking mode in the teacher prompt (default: the task's; on for math as in OPSD)",
    )
    # exposure controller (adaptive; --controller-hold and --controller-preset also set random's hold);
    # docs/controller.md. Unset (None): the preset's value, sized from --steps where the preset says so.
    controller_preset: str | None = option(
        None, "controller settings: default (ours, sized from --steps) or paper (the paper's batch-normalised "
        "REINFORCE, fixed K=4, L=12) (default: default)", choices=tuple(CONTROLLER_PRESETS),
    )
    controller_decisions: int | None = option(
        None, f"decisions per run the budget rule aims at (default: {CONTROLLER['decisions']})", check=at_least(1)
    )
    controller_hold: int | None = option(
        None, "K: student steps one sampled alpha is held (default: max(4, steps / decisions))", check=at_least(1)
    )
    controller_lookahead: int | None = option(
        None, "L > K: steps after a decision's first step that its reward looks at (default: K + max(4, K / 2))",
        check=at_least(1),
    )
    controller_gamma: float | None = option(
        None, "per-step discount of the progress reward (default: 0.5 at the lookahead's end)",
        check=in_range(0, 1, lo_open=True),
    )
    controller_lambda_gt: float | None = option(
        None, f"weight of the teacher-grounded credit in the reward, 0: credit not computed (default: "
        f"{CONTROLLER['lambda_gt']})", check=at_least(0),
    )
    controller_clip: float | None = option(
        None, f"clip of the standardised progress term, standard deviations (default: {CONTROLLER['clip']})",
        check=greater_than(0),
    )
    controller_update: str | None = option(
        None, f"policy update: window (gated natural-gradient step) or reinforce (default: {CONTROLLER['update']})",
        choices=CONTROLLER_UPDATES,
    )
    controller_lr: float | None = option(
        None, "step size of the policy (default: 0.3, smaller when --controller-hold makes more than "
        "--controller-decisions decisions)", check=greater_than(0),
    )
    controller_optimizer: str | None = option(
        None, "optimizer of --controller-update reinforce", choices=("sgd", "adam")
    )
    controller_baseline: str | None = option(
        None, "advantage of --controller-update reinforce: running (standardised by earlier decisions) or batch "
        "(normalised in the batch)", choices=("running", "batch"),
    )
    controller_update_batch: int | None = option(
        None, f"scored decisions per policy step (default: {CONTROLLER['update_batch']})", check=at_least(1)
    )
    controller_snr_gate: bool | None = option(
        None, "scale each window step by the evidence that rewards depend on alpha (default: on)"
    )
    controller_window_ema: float | None = option(
        None, f"decay of the window update's weights (default: {CONTROLLER['window_ema']})",
        check=in_range(0, 1, hi_open=True),
    )
    controller_max_kl: float | None = option(
        None, f"nats one window step may move the Beta at most, 0 = no cap (default: {CONTROLLER['max_kl']})",
        check=at_least(0),
    )
    controller_min_sd: float | None = option(
        None, f"smallest sd a window step leaves the Beta, 0 = none (default: {CONTROLLER['min_sd']})",
        check=in_range(0, 0.5, hi_open=True),
    )
    controller_entropy_coef: float | None = option(
        None, f"weight of the capped entropy bonus (default: {CONTROLLER['entropy_coef']})", check=at_least(0)
    )
    controller_entropy_cap: float | None = option(
        None, f"entropy (nats) above which there is no bonus (default: {CONTROLLER['entropy_cap']})"
    )
    controller_hidden: int | None = option(
        None, f"width of the policy MLP (default: {CONTROLLER['hidden']})", check=at_least(1)
    )
    controller_ema: float | None = option(
        None, f"decay of the loss / mismatch / probe-NLL EMAs of the state (default: {CONTROLLER['ema']})",
        check=in_range(0, 1, hi_open=True),
    )
    controller_reward_ema: float | None = option(
        None, f"decay of the running mean / sd standardising progress and credit (default: {CONTROLLER['reward_ema']})",
        check=in_range(0, 1, hi_open=True),
    )
    controller_grad_clip: float | None = option(
        None, f"max grad norm of a reinforce step (default: {CONTROLLER['grad_clip']})", check=greater_than(0)
    )
    controller_signal: str | None = option(
        None,
        "what the reward's progress measures: loss (the paper: KD-loss decrease), accuracy (rise of the greedy "
        "verified accuracy on --probe-accuracy-size fixed training problems, decoded at each decision's start "
        "and up to --controller-probe-points times per decision on long holds) or "
        "probe_nll (decrease of the student's NLL of --probe-size fixed reference solutions, ~4 times per hold "
        f"window) (default: {CONTROLLER['signal']})",
        choices=CONTROLLER_SIGNALS,
    )
    controller_estimator: str | None = option(
        None, "how the progress is estimated over the lookahead: slope (least squares), delta (the paper's "
        "discounted mean decrease) or level (accuracy / probe NLL only: the mean measured after the held steps) "
        f"(default: {CONTROLLER['estimator']})", choices=CONTROLLER_ESTIMATORS,
    )
    controller_probe_points: int | None = option(
        None, "signal accuracy: probe decodes per decision, at most one per 4 steps, so holds under 8 steps decode "
        f"once (default: {CONTROLLER['probe_points']})", check=at_least(1),
    )
    controller_exploit_end: str | None = option(
        None, "what the decisions no later decision of the run can learn from (its last few) take: off (a draw, "
        "like every other), mean (the policy's mean) or fit (the best alpha of the run's fitted reward curve where "
        f"that fit passes the noise gate, else a draw) (default: {CONTROLLER['exploit_end']})",
        choices=CONTROLLER_EXPLOITS,
    )
    # rollouts
    num_samples: int = option(1, "rollouts per problem (G)", check=at_least(1))
    max_new_tokens: int | None = option(None, "rollout length cap (recipe)", check=at_least(1))
    rollout_temperature: float = option(1.1, "sampling temperature of the rollouts (0 = greedy)", check=at_least(0))
    top_p: float = option(0.95, "nucleus sampling threshold", check=in_range(0, 1, lo_open=True))
    top_k: int = option(20, "top-k sampling (0 = off)", check=at_least(0))
    rollout: str = option(
        "auto",
        "rollout decoder: auto (compiled static-cache loop on CUDA, eager static-cache loop on CPU) | hf (the eager "
        "HF loop) | static (static KV cache, LoRA merged) | compiled (static + torch.compile, CUDA graphs on GPU "
        "except under --fsdp lora|full); the same under every --fsdp mode; all draw the same tokens for a seed",
        choices=("auto", "hf", "static", "compiled"),
        on_resume="change",
    )
    max_prompt_tokens: int | None = option(
        None, "skip problems whose student prompt is longer (recipe)", check=at_least(1)
    )
    max_reference_tokens: int | None = option(
        None, "skip problems whose reference is longer (recipe)", check=at_least(1)
    )
    # loss and optimisation
    kl_temperature: float = option(1.1, "temperature of the distillation softmax", check=greater_than(0))
    clip: float | None = option(
        None,
        "pointwise KL clip tau; inf = off (recipe: 0.05, 0.06 for qwen3-8b, off for tiny)",
        check=greater_than(0),
        infinite=True,
    )
    beta: float = option(
        0.0, "0 = forward KL(teacher||student), 1 = reverse KL, between = generalized JSD", check=in_range(0, 1)
    )
    steps: int | None = option(None, "optimizer steps (recipe)", check=at_least(1), on_resume="change")
    batch_size: int | None = option(None, "problems per optimizer step (recipe)", check=at_least(1))
    micro_batch: int | None = option(
        None, "problems per packed scoring pass; gradients accumulate over the batch", check=at_least(1)
    )
    lr: float | None = option(
        None, "AdamW learning rate (recipe: 5e-6 for Qwen3, 1e-3 for tiny)", check=greater_than(0)
    )
    weight_decay: float = option(0.0, "AdamW weight decay", check=at_least(0))
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", check=at_least(0))
    lr_schedule: str | None = option(
        None,
        "after warm-up: constant, linear (to 0 at the last step; the HF Trainer's default, OPSD's) or cosine "
        "(recipe: linear for Qwen3, constant for tiny)",
        choices=("constant", "linear", "cosine"),
    )
    max_grad_norm: float = option(0.1, "gradient-norm clip", check=greater_than(0))
    lora_r: int | None = option(None, "LoRA rank (recipe: 64)", check=at_least(1))
    lora_alpha: int | None = option(None, "LoRA alpha (recipe: 128)", check=at_least(1))
    lora_dropout: float = option(0.0, "LoRA dropout", check=in_range(0, 1, hi_open=True))
    # system
    device: str = option("auto", "auto | cpu | cuda[:i]", on_resume="change")
    dtype: str = option(
        "auto",
        "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    attention: str = option(
        "auto",
        "tree-mask attention: auto (flex on CUDA, dense elsewhere) | dense | flex",
        choices=("auto", "dense", "flex"),
    )
    gradient_checkpointing: str = option("auto", "auto (on for GPU) | on | off", choices=("auto", "on", "off"))
    seed: int = option(0, "seed of data order, sampling and initialisation", check=at_least(0))
    fsdp: str = option(
        "lora",
        "under torchrun: FSDP2 over the adapter with the base replicated (lora), the base sharded too (full), "
        "or no FSDP with all-reduced adapter gradients (off)",
        choices=("lora", "full", "off"),
    )
    dist_timeout: float = option(
        1800.0, "under torchrun: seconds a collective waits for the other ranks before failing", check=greater_than(0)
    )
    # outputs
    output_dir: str | None = option(
        None, "run directory (default runs/<model>-<time>)", path=True, on_resume="invocation"
    )
    save_every: int | None = option(
        None, "checkpoint every N steps and at the end (recipe: 25 for Qwen3, the paper's rule; 10 for tiny)",
        check=at_least(1), on_resume="change",
    )
    report_to: str = option(
        "tensorboard",
        "where metrics go besides metrics.jsonl: tensorboard, wandb (needs the wandb package), a comma list of "
        "both, or none",
        sep=",",
        on_resume="change",
    )
    probe_every: int = option(5, "compute the probe NLL every N steps (0 = never)", check=at_least(0))
    probe_size: int = option(8, "number of fixed reference solutions in the probe set", check=at_least(0))
    probe_accuracy_size: int = option(
        64, "fixed training problems whose greedy accuracy --controller-signal accuracy measures", check=at_least(1)
    )
    eval_problems: int | None = option(
        None, "problems drawn from a task's own held-out split when it is evaluated (0 = none)",
        check=at_least(0),
    )
    eval_every: int | None = option(
        None,
        "also evaluate every N steps, checkpointing each evaluated step (0 = only before and after training; "
        "recipe: 25 for Qwen3, the paper's rule, whose best checkpoint never counts step 0, the base model; 0 for "
        "tiny)",
        check=at_least(0),
    )
    eval_benchmarks: str | None = option(
        None,
        "comma list evaluated before training, every --eval-every steps and at the end: a task with its own "
        "problems (its held-out split, --eval-problems problems), aime24, aime25, hmmt25 or a local .jsonl with "
        "problem/answer; "
        "'' = none (recipe: aime24,aime25,hmmt25 for the Qwen3 presets, their hub ids and directories named like "
        "them; otherwise the --data task when it generates its problems and --eval-problems > 0, else none)",
        sep=",",
    )
    eval_max_new_tokens: int | None = option(
        None, "generation cap of the evaluations (default: the task's: 38912 for math)",
        check=at_least(1),
    )
    eval_samples: int | None = option(
        None, "samples per problem, accuracy = Average@n (default: the task's: 12 for math)",
        check=at_least(1),
    )
    eval_temperature: float | None = option(
        None, "evaluation sampling temperature, 0 = greedy (default: the task's: 1.0 for math)",
        check=at_least(0),
    )
    eval_top_p: float | None = option(
        None, "evaluation top-p (default: the task's: 0.95 for math)", check=in_range(0, 1, lo_open=True)
    )
    eval_top_k: int | None = option(
        None, "evaluation top-k, 0 = off (default: the task's: off for math)", check=at_least(0)
    )
    eval_thinking: bool | None = option(
        None, "thinking mode of the evaluated student (default: the task's: on for math)"
    )
    eval_limit: int | None = option(
        None, "evaluate only the first N problems of each math benchmark (default: all)", check=at_least(1)
    )
    progress: bool = option(True, "show a progress bar", on_resume="invocation")
    threads: int | None = option(
        None,
        "torch threads on CPU (default: OMP_NUM_THREADS, else the free cores, max(1, round(cores - busy cores)); "
        "engine/threads.py)",
        check=at_least(1),
        on_resume="invocation",
    )
    force: bool = option(
        False,
        "with --resume of a checkpoint older than the run's newest: move the newer checkpoints and metrics aside "
        "(into <run>/superseded-<time>/) and continue from it",
        on_resume="invocation",
    )
    stop_after: int | None = option(
        None,
        "stop after this step as if killed (tests resume); the schedule still spans --steps",
        check=at_least(0),
        on_resume="invocation",
    )

    def controller_settings(self) -> dict[str, Any]:
        """The ``controller_*`` fields without the prefix: the exposure policy's constructor arguments."""
        return {f.name[len("controller_"):]: getattr(self, f.name)
                for f in dataclasses.fields(self) if f.name.startswith("controller_")}

    def resolve(self) -> Config:
        """Fill recipe-driven fields left unset, the task, the evaluation default and the tasks' options."""
        recipe = recipe_for(self.model)
        for name in RECIPE_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(recipe, name))
        if self.task is None:
            self.task = self.data if is_task(self.data) else "math"
        if self.eval_benchmarks is None:
            self.eval_benchmarks = recipe.eval_benchmarks
        if self.eval_benchmarks is None:  # the data's own held-out split, when the data is a task's problems
            generates = is_task(self.data) and _loads(self.data) and get_task(self.data).dataset is not None
            self.eval_benchmarks = self.data if generates and self.eval_problems else ""
        self.task_options = resolve_task_options(self)
        return self

    def validate(self, labels: dict[str, str] | None = None) -> Config:
        """Raise a one-line :class:`UsageError` for the first bad value (see :func:`validate`)."""
        validate(self, labels)
        return self

    def run_dict(self) -> dict[str, Any]:
        """The run's configuration as written to config.yaml: every field but the per-invocation ones."""
        return {k: v for k, v in dataclasses.asdict(self).items() if OPTIONS.meta(k).get("on_resume") != "invocation"}


OPTIONS = Declared(Config)
FIELDS = OPTIONS.fields
for _name in FIELDS:
    if OPTIONS.meta(_name).get("on_resume", "run") not in RESUME_MODES:
        raise TypeError(f"Config.{_name}: on_resume must be one of {RESUME_MODES}")


# --------------------------------------------------------------------------------------------- task options
def _loads(name: str) -> bool:
    try:
        get_task(name)
    except ValueError:
        return False
    return True


def run_tasks(cfg: Config) -> list[Task]:
    """The tasks a run uses (those that load): its ``--task``, its ``--data`` and its evaluated tasks."""
    names = [cfg.task, cfg.data, *(b.strip() for b in (cfg.eval_benchmarks or "").split(","))]
    return [get_task(n) for n in dict.fromkeys(names) if is_task(n) and _loads(n)]


def resolve_task_options(cfg: Config) -> dict[str, Any]:
    """``cfg.task_options`` with every option the run's tasks declare, typed by its declaration where given, at its
    default where not; a value that does not type, or an option no task declares, is kept for :func:`validate`."""
    given = dict(cfg.task_options or {})
    out: dict[str, Any] = {}
    for task in run_tasks(cfg):
        options = declared(task.options) if task.options else None
        for name in options.fields if options else ():
            if name in out:
                continue
            try:
                out[name] = options.coerce(name, given[name], name) if name in given else options.default(name)
            except UsageError:
                out[name] = given[name]
    return {**given, **out}


def typed_task_options(cfg: Config, given: dict[str, Any], where: str) -> dict[str, Any]:
    """``given`` typed and checked by the declarations of the run's tasks (the first that declares each); the
    first option no task declares, or whose value is bad, is a one-line UsageError naming ``where`` and the key."""
    tasks = run_tasks(cfg)
    declaring: dict[str, Task] = {}
    for task in tasks:
        for name in declared(task.options).fields if task.options else ():
            declaring.setdefault(name, task)
    out = {}
    for name, value in given.items():
        label = f"{where} {name}"
        if name not in declaring:
            offered = "; ".join(f"{t.name}: {', '.join(declared(t.options).fields)}" for t in tasks if t.options)
            raise UsageError(f"{label}: no task of this run ({', '.join(t.name for t in tasks)}) declares it ("
                             + (f"their options: {offered})" if offered else "they declare no options)"))
        options = declared(declaring[name].options)
        out[name] = options.coerce(name, value, label)
        options.check(name, out[name], label)
    return out


# ---------------------------------------------------------------------------------------------- validation
def validate(cfg: Config, labels: dict[str, str] | None = None) -> None:
    """Every field's type, choices and check, then the checks that need the machine or several fields; the
    first problem is raised as a one-line UsageError naming the flag (or ``labels[name]``, e.g. a YAML key)."""
    labels = labels or {}
    where = lambda name: labels.get(name, flag(name))  # noqa: E731
    for name in FIELDS:
        OPTIONS.check(name, OPTIONS.coerce(name, getattr(cfg, name), where(name)), where(name))
    for name, check in _CHECKS.items():
        problem = check(cfg)
        if problem:
            raise UsageError(f"{where(name)} {show(getattr(cfg, name))}: {problem}")
    typed_task_options(cfg, cfg.task_options or {}, labels.get("task_options", "--task-option"))


def _task_problem(cfg: Config) -> str | None:
    try:
        resolve_templates(get_task(cfg.task), cfg.prompts, instruction=cfg.instruction,
                          teacher_thinking=cfg.teacher_thinking)
    except ValueError as e:
        return str(e)
    return None


def _exposure_problem(cfg: Config) -> str | None:
    from atesd import controller

    try:
        controller.build(cfg.exposure, seed=cfg.seed, strict=False, **cfg.controller_settings())
    except ValueError as e:
        return str(e)
    return None


def _model_problem(cfg: Config) -> str | None:
    from atesd.engine.models import model_problem

    return model_problem(cfg.model)


def _data_problem(cfg: Config) -> str | None:
    from atesd.engine.data import source_problem

    return source_problem(cfg.data)


def _report_problem(cfg: Config) -> str | None:
    targets = [t.strip() for t in cfg.report_to.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ("tensorboard", "wandb", "none")]
    if unknown or not targets or ("none" in targets and len(targets) > 1):
        return "use tensorboard, wandb, a comma list of both, or none"
    if "wandb" in targets:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            return "the wandb package is not installed (pip install wandb), or use --report-to tensorboard"
    return None


def _eval_problem(cfg: Config) -> str | None:
    names = [b.strip() for b in (cfg.eval_benchmarks or "").split(",") if b.strip()]
    for name in names:
        if is_task(name):
            if not cfg.eval_problems:
                return f"{name} needs --eval-problems > 0"
        elif name.endswith(".jsonl"):
            if not os.path.isfile(name):
                return f"evaluation file {name!r} does not exist"
        elif name not in BENCHMARKS:
            return (f"unknown benchmark {name!r}; choose from a task with its own problems, "
                    f"{', '.join(sorted(BENCHMARKS))} or a local .jsonl")
    return None


def _output_problem(cfg: Config) -> str | None:
    """The run directory must be a directory, or creatable: its nearest existing ancestor a writable directory."""
    if not cfg.output_dir:
        return None
    path = os.path.abspath(os.path.expanduser(cfg.output_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a directory"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable"
    return None


_CHECKS: dict[str, Callable[[Config], str | None]] = {
    "task": _task_problem,
    "exposure": _exposure_problem,
    "device": lambda cfg: device_problem(cfg.device),
    "model": _model_problem,
    "data": _data_problem,
    "report_to": _report_problem,
    "eval_benchmarks": _eval_problem,
    "output_dir": _output_problem,
}
