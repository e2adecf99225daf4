"""Training configuration: built-in defaults < model recipe < YAML ``--config`` < command-line flags.

Every option is one field of :class:`Config`, declared in one line::

    my_knob: float = _f(0.5, "what it does", check=in_range(0, 1))

Its annotation is its type, and flags and YAML are both read by it: ``lr: 1e-3`` (a string to YAML 1.1) is the
float 0.001, ``steps: 2.5`` or ``lr: fast`` is a one-line error naming the key. Optional keywords of ``_f``:
``choices``, ``check`` (a validator from :func:`at_least`, :func:`greater_than`, :func:`in_range` or any
``value -> problem text or None``), ``sep`` (a comma list, also accepted as a YAML list) and ``on_resume``
(below). The field is then a flag ``--my-knob`` (also ``--my_knob``), a YAML key ``my_knob``, validated before any
file or model loads, written to the run's ``config.yaml`` and restored by ``--resume``. Checks that involve the
machine or several fields (device, model path, data file, exposure spec) live in :func:`validate`.

``--resume`` continues a run with the run's own ``config.yaml``. A flag (or YAML key) given with it must agree with
the run, except fields whose ``on_resume`` is ``"change"`` (may change; recorded in run.log: ``--steps`` to extend a
run, ``--save-every``, ``--device``, ``--rollout``, ``--report-to``) or ``"invocation"`` (belongs to this
invocation, not to the run, never written to config.yaml: ``--progress``, ``--stop-after``, ``--output-dir``).

TRL / Hugging Face users' spellings are accepted: every flag with its underscores (``--max_new_tokens``) and
the names in :data:`ALIASES` (``--learning_rate``, ``--max_steps``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from atesd.controller.presets import DEFAULTS as CONTROLLER
from atesd.controller.presets import PRESETS as CONTROLLER_PRESETS
from atesd.controller.presets import SIGNALS as CONTROLLER_SIGNALS
from atesd.controller.presets import UPDATES as CONTROLLER_UPDATES
from atesd.engine.errors import UsageError
from atesd.engine.models import RECIPES, recipe_for

RECIPE_FIELDS = (
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

# TRL / transformers.TrainingArguments names that mean exactly what an option here means
ALIASES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "save_steps": "save_every",
    "model_name_or_path": "model",
    "dataset_name": "data",
    "num_generations": "num_samples",
}
# TRL names with no one-to-one counterpart: an error that points to what to use instead
NOT_FLAGS = {
    "per_device_train_batch_size": "--micro-batch (problems per scoring pass) and --batch-size (problems per "
    "optimizer step)",
    "gradient_accumulation_steps": "--batch-size and --micro-batch (gradients accumulate over a step's "
    "micro-batches)",
    "num_train_epochs": "--steps (the data stream reshuffles at every epoch)",
    "temperature": "--rollout-temperature (sampling) or --kl-temperature (the distillation softmax)",
}
RESUME_MODES = ("run", "change", "invocation")


# ----------------------------------------------------------------------------------------------- validators
Check = Callable[[Any], "str | None"]


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


def greater_than(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo:g}"


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    text = f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(v: float) -> str | None:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else text

    return check


def _levels(v: str) -> str | None:
    try:
        levels = [int(x) for x in str(v).split(",") if x.strip()]
    except ValueError:
        return "must be a comma list of integers"
    return None if levels and all(lv in (1, 2, 3, 4) for lv in levels) else "must name levels among 1,2,3,4"


def _f(default: Any, help: str, **kw) -> Any:
    """A Config field: ``help`` and the optional ``choices``, ``check``, ``sep``, ``on_resume`` (see the module)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # model and data
    model: str = _f(
        "tiny",
        f"preset ({', '.join(RECIPES)}), hub id or local directory; 'tiny' is the embedded default model",
        path=True,
    )
    data: str | None = _f(
        None,
        "'lab' (embedded synthetic task), hub dataset id or local .json/.jsonl/.parquet; "
        "default: lab for tiny, else siyanzhao/Openthoughts_math_30k_opsd",
        path=True,
    )
    split: str = _f("train", "dataset split")
    problem_column: str = _f("problem", "column holding the problem text")
    solution_column: str = _f("solution", "column holding the reference solution (ends in \\boxed{})")
    answer_column: str = _f(
        "answer", "column holding the final answer (taken from the last \\boxed{} if absent)"
    )
    lab_size: int = _f(2000, "number of lab training problems (data=lab)", check=at_least(1))
    lab_levels: str = _f(
        "1,2", "comma list of lab difficulty levels used for training and held-out evaluation", sep=",", check=_levels
    )
    # exposure
    exposure: str = _f(
        "adaptive",
        "exposure policy: adaptive | full | fixed:<alpha> | random | linear:<a>:<b> | adaptive-onestep",
    )
    exposure_mode: str = _f(
        "tokens", "truncate the reference reasoning by 'tokens' or by 'lines'", choices=("tokens", "lines")
    )
    task: str | None = _f(
        None,
        "task supplying prompt templates, verifier and evaluation protocol: math (OPSD's prompts, the paper's "
        "evaluation), lab, or package.module:ATTRIBUTE (default: the --data task if it names one, else math)",
    )
    prompts: str | None = _f(
        None,
        "YAML/JSON file overriding the task's prompt templates (keys student, teacher, instruction, "
        "student_thinking, teacher_thinking; in a --config YAML also a mapping) (default: the task's)",
        path=True,
        mapping=True,
    )
    instruction: str | None = _f(
        None, "transition instruction after the exposed reference (default: the task template's)"
    )
    teacher: str = _f(
        "base",
        "teacher weights: base (adapter off), current (student weights, no grad), ema",
        choices=("base", "current", "ema"),
    )
    ema_decay: float = _f(0.99, "EMA decay for --teacher ema", check=in_range(0, 1))
    teacher_thinking: bool | None = _f(
        None,
        "Qwen3 thinking mode in the teacher prompt (default: the task's; on for math as in OPSD, off for lab)",
    )
    # exposure controller (adaptive; --controller-hold and --controller-preset also set random's hold);
    # docs/controller.md. Unset (None): the preset's value, sized from --steps where the preset says so.
    controller_preset: str | None = _f(
        None, "controller settings: default (ours, sized from --steps) or paper (the paper's batch-normalised "
        "REINFORCE, fixed K=4, L=12) (default: default)", choices=tuple(CONTROLLER_PRESETS),
    )
    controller_decisions: int | None = _f(
        None, f"decisions per run the budget rule aims at (default: {CONTROLLER['decisions']})", check=at_least(1)
    )
    controller_hold: int | None = _f(
        None, "K: student steps one sampled alpha is held (default: max(4, steps / decisions))", check=at_least(1)
    )
    controller_lookahead: int | None = _f(
        None, "L > K: steps after a decision's first step that its reward looks at (default: K + max(4, K / 2))",
        check=at_least(1),
    )
    controller_gamma: float | None = _f(
        None, "per-step discount of the progress reward (default: 0.5 at the lookahead's end)",
        check=in_range(0, 1, lo_open=True),
    )
    controller_lambda_gt: float | None = _f(
        None, f"weight of the teacher-grounded credit in the reward, 0: credit not computed (default: "
        f"{CONTROLLER['lambda_gt']})", check=at_least(0),
    )
    controller_clip: float | None = _f(
        None, f"clip of the standardised progress term, standard deviations (default: {CONTROLLER['clip']})",
        check=greater_than(0),
    )
    controller_update: str | None = _f(
        None, f"policy update: window (gated natural-gradient step) or reinforce (default: {CONTROLLER['update']})",
        choices=CONTROLLER_UPDATES,
    )
    controller_lr: float | None = _f(
        None, "step size of the policy (default: 0.3, smaller when --controller-hold makes more than "
        "--controller-decisions decisions)", check=greater_than(0),
    )
    controller_optimizer: str | None = _f(None, "optimizer of --controller-update reinforce", choices=("sgd", "adam"))
    controller_baseline: str | None = _f(
        None, "advantage of --controller-update reinforce: running (standardised by earlier decisions) or batch "
        "(normalised in the batch)", choices=("running", "batch"),
    )
    controller_update_batch: int | None = _f(
        None, f"scored decisions per policy step (default: {CONTROLLER['update_batch']})", check=at_least(1)
    )
    controller_snr_gate: bool | None = _f(
        None, "scale each window step by the evidence that rewards depend on alpha (default: on)"
    )
    controller_window_ema: float | None = _f(
        None, f"decay of the window update's weights (default: {CONTROLLER['window_ema']})",
        check=in_range(0, 1, hi_open=True),
    )
    controller_max_kl: float | None = _f(
        None, f"nats one window step may move the Beta at most, 0 = no cap (default: {CONTROLLER['max_kl']})",
        check=at_least(0),
    )
    controller_min_sd: float | None = _f(
        None, f"smallest sd a window step leaves the Beta, 0 = none (default: {CONTROLLER['min_sd']})",
        check=in_range(0, 0.5, hi_open=True),
    )
    controller_entropy_coef: float | None = _f(
        None, f"weight of the capped entropy bonus (default: {CONTROLLER['entropy_coef']})", check=at_least(0)
    )
    controller_entropy_cap: float | None = _f(
        None, f"entropy (nats) above which there is no bonus (default: {CONTROLLER['entropy_cap']})"
    )
    controller_hidden: int | None = _f(
        None, f"width of the policy MLP (default: {CONTROLLER['hidden']})", check=at_least(1)
    )
    controller_ema: float | None = _f(
        None, f"decay of the loss / mismatch / probe-NLL EMAs of the state (default: {CONTROLLER['ema']})",
        check=in_range(0, 1, hi_open=True),
    )
    controller_reward_ema: float | None = _f(
        None, f"decay of the running mean / sd standardising progress and credit (default: {CONTROLLER['reward_ema']})",
        check=in_range(0, 1, hi_open=True),
    )
    controller_grad_clip: float | None = _f(
        None, f"max grad norm of a reinforce step (default: {CONTROLLER['grad_clip']})", check=greater_than(0)
    )
    controller_signal: str | None = _f(
        None,
        "what the reward's progress measures: loss (the paper: KD-loss decrease), accuracy (rise of the greedy "
        "verified accuracy on --probe-accuracy-size fixed training problems, decoded at each decision's start) or "
        "probe_nll (decrease of the student's NLL of --probe-size fixed reference solutions, ~4 times per hold "
        f"window) (default: {CONTROLLER['signal']})",
        choices=CONTROLLER_SIGNALS,
    )
    controller_estimator: str | None = _f(
        None, "how the progress is estimated over the lookahead: slope (least squares) or delta (the paper's "
        f"discounted mean decrease) (default: {CONTROLLER['estimator']})", choices=("slope", "delta"),
    )
    # rollouts
    num_samples: int = _f(1, "rollouts per problem (G)", check=at_least(1))
    max_new_tokens: int | None = _f(None, "rollout length cap (recipe)", check=at_least(1))
    rollout_temperature: float = _f(1.1, "sampling temperature of the rollouts (0 = greedy)", check=at_least(0))
    top_p: float = _f(0.95, "nucleus sampling threshold", check=in_range(0, 1, lo_open=True))
    top_k: int = _f(20, "top-k sampling (0 = off)", check=at_least(0))
    rollout: str = _f(
        "auto",
        "rollout decoder: auto (compiled static-cache loop on CUDA, eager static-cache loop on CPU) | hf (the eager "
        "HF loop) | static (static KV cache, LoRA merged) | compiled (static + torch.compile, CUDA graphs on GPU); "
        "all draw the same tokens for a seed",
        choices=("auto", "hf", "static", "compiled"),
        on_resume="change",
    )
    max_prompt_tokens: int | None = _f(
        None, "skip problems whose student prompt is longer (recipe)", check=at_least(1)
    )
    max_reference_tokens: int | None = _f(
        None, "skip problems whose reference is longer (recipe)", check=at_least(1)
    )
    # loss and optimisation
    kl_temperature: float = _f(1.1, "temperature of the distillation softmax", check=greater_than(0))
    clip: float | None = _f(
        None,
        "pointwise KL clip tau; inf = off (recipe: 0.05, 0.06 for qwen3-8b, off for tiny)",
        check=greater_than(0),
    )
    beta: float = _f(
        0.0, "0 = forward KL(teacher||student), 1 = reverse KL, between = generalized JSD", check=in_range(0, 1)
    )
    steps: int | None = _f(None, "optimizer steps (recipe)", check=at_least(1), on_resume="change")
    batch_size: int | None = _f(None, "problems per optimizer step (recipe)", check=at_least(1))
    micro_batch: int | None = _f(
        None, "problems per packed scoring pass; gradients accumulate over the batch", check=at_least(1)
    )
    lr: float | None = _f(None, "AdamW learning rate (recipe: 5e-6 for Qwen3, 1e-3 for tiny)", check=greater_than(0))
    weight_decay: float = _f(0.0, "AdamW weight decay", check=at_least(0))
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps", check=at_least(0))
    lr_schedule: str | None = _f(
        None,
        "after warm-up: constant, linear (to 0 at the last step; the HF Trainer's default, OPSD's) or cosine "
        "(recipe: linear for Qwen3, constant for tiny)",
        choices=("constant", "linear", "cosine"),
    )
    max_grad_norm: float = _f(0.1, "gradient-norm clip", check=greater_than(0))
    lora_r: int | None = _f(None, "LoRA rank (recipe: 64)", check=at_least(1))
    lora_alpha: int | None = _f(None, "LoRA alpha (recipe: 128)", check=at_least(1))
    lora_dropout: float = _f(0.0, "LoRA dropout", check=in_range(0, 1, hi_open=True))
    # system
    device: str = _f("auto", "auto | cpu | cuda[:i]", on_resume="change")
    dtype: str = _f(
        "auto",
        "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    attention: str = _f(
        "auto",
        "tree-mask attention: auto (flex on CUDA, dense elsewhere) | dense | flex",
        choices=("auto", "dense", "flex"),
    )
    gradient_checkpointing: str = _f("auto", "auto (on for GPU) | on | off", choices=("auto", "on", "off"))
    seed: int = _f(0, "seed of data order, sampling and initialisation", check=at_least(0))
    fsdp: str = _f(
        "lora",
        "under torchrun: FSDP2 over the adapter with the base replicated (lora), the base sharded too (full), "
        "or no FSDP with all-reduced adapter gradients (off)",
        choices=("lora", "full", "off"),
    )
    dist_timeout: float = _f(
        1800.0, "under torchrun: seconds a collective waits for the other ranks before failing", check=greater_than(0)
    )
    # outputs
    output_dir: str | None = _f(
        None, "run directory (default runs/<model>-<time>)", path=True, on_resume="invocation"
    )
    save_every: int | None = _f(
        None, "checkpoint every N steps and at the end (recipe: 25 for Qwen3, the paper's rule; 10 for tiny)",
        check=at_least(1), on_resume="change",
    )
    report_to: str = _f(
        "tensorboard",
        "where metrics go besides metrics.jsonl: tensorboard, wandb (needs the wandb package), a comma list of "
        "both, or none",
        sep=",",
        on_resume="change",
    )
    probe_every: int = _f(5, "compute the probe NLL every N steps (0 = never)", check=at_least(0))
    probe_size: int = _f(8, "number of fixed reference solutions in the probe set", check=at_least(0))
    probe_accuracy_size: int = _f(
        64, "fixed training problems whose greedy accuracy --controller-signal accuracy measures", check=at_least(1)
    )
    eval_problems: int | None = _f(
        None, "held-out lab problems for greedy accuracy before/after (0 = skip)", check=at_least(0)
    )
    eval_every: int | None = _f(
        None,
        "also evaluate every N steps, checkpointing each evaluated step (0 = only before and after training; "
        "recipe: 25 for Qwen3, the paper's rule, whose best checkpoint never counts step 0, the base model; 0 for "
        "tiny)",
        check=at_least(0),
    )
    eval_benchmarks: str | None = _f(
        None,
        "comma list evaluated before training, every --eval-every steps and at the end: lab (held-out lab "
        "split, --eval-problems problems), aime24, aime25, hmmt25 or a local .jsonl with problem/answer; "
        "'' = none (recipe: aime24,aime25,hmmt25 for the Qwen3 presets, their hub ids and directories named like "
        "them; otherwise lab when --data lab and --eval-problems > 0, else none)",
        sep=",",
    )
    eval_max_new_tokens: int | None = _f(
        None, "generation cap of the evaluations (default: the task's: 38912 for math, 128 for lab)",
        check=at_least(1),
    )
    eval_samples: int | None = _f(
        None, "samples per problem, accuracy = Average@n (default: the task's: 12 for math, 1 for lab)",
        check=at_least(1),
    )
    eval_temperature: float | None = _f(
        None, "evaluation sampling temperature, 0 = greedy (default: the task's: 1.0 for math, 0 for lab)",
        check=at_least(0),
    )
    eval_top_p: float | None = _f(
        None, "evaluation top-p (default: the task's: 0.95 for math)", check=in_range(0, 1, lo_open=True)
    )
    eval_top_k: int | None = _f(
        None, "evaluation top-k, 0 = off (default: the task's: off for math)", check=at_least(0)
    )
    eval_thinking: bool | None = _f(
        None, "thinking mode of the evaluated student (default: the task's: on for math, off for lab)"
    )
    eval_limit: int | None = _f(
        None, "evaluate only the first N problems of each math benchmark (default: all)", check=at_least(1)
    )
    progress: bool = _f(True, "show a progress bar", on_resume="invocation")
    stop_after: int | None = _f(
        None,
        "stop after this step as if killed (tests resume); the schedule still spans --steps",
        check=at_least(0),
        on_resume="invocation",
    )

    def lab_level_tuple(self) -> tuple[int, ...]:
        """``lab_levels`` parsed: '1,2' -> (1, 2); bad entries raise a UsageError naming them."""
        problem = _levels(self.lab_levels)
        if problem:
            raise UsageError(f"--lab-levels: {problem}, got {self.lab_levels!r}")
        return tuple(int(x) for x in str(self.lab_levels).split(",") if x.strip())

    def controller_settings(self) -> dict[str, Any]:
        """The ``controller_*`` fields without the prefix: the exposure policy's constructor arguments."""
        return {f.name[len("controller_"):]: getattr(self, f.name)
                for f in dataclasses.fields(self) if f.name.startswith("controller_")}

    def resolve(self) -> Config:
        """Fill recipe-driven fields left unset and the model-dependent data default."""
        recipe = recipe_for(self.model)
        for name in RECIPE_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(recipe, name))
        if self.data is None:
            from atesd.engine.data import DEFAULT_DATASET

            self.data = "lab" if self.model == "tiny" else DEFAULT_DATASET
        if self.task is None:
            from atesd.engine.task import is_task

            self.task = self.data if is_task(self.data) else "math"
        if self.eval_benchmarks is None:
            self.eval_benchmarks = recipe.eval_benchmarks
        if self.eval_benchmarks is None:
            self.eval_benchmarks = "lab" if self.data == "lab" and self.eval_problems else ""
        return self

    def validate(self, labels: dict[str, str] | None = None) -> Config:
        """Raise a one-line :class:`UsageError` for the first bad value (see :func:`validate`)."""
        validate(self, labels)
        return self

    def run_dict(self) -> dict[str, Any]:
        """The run's configuration as written to config.yaml: every field but the per-invocation ones."""
        return {k: v for k, v in dataclasses.asdict(self).items() if _meta(k).get("on_resume") != "invocation"}


# --------------------------------------------------------------------------------------------- field types
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
_KIND_TEXT = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_declarations() -> None:
    for name, f in FIELDS.items():
        kind = _kind(name)[0]
        if kind not in _KIND_TEXT:
            raise TypeError(f"Config.{name}: options are bool, int, float or str (or X | None), not {kind}")
        if f.metadata.get("on_resume", "run") not in RESUME_MODES:
            raise TypeError(f"Config.{name}: on_resume must be one of {RESUME_MODES}")


def _meta(name: str) -> dict:
    return FIELDS[name].metadata


def _kind(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field from its annotation: ``int | None`` -> (int, True)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if args else (hint, False)


_check_declarations()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(v: Any) -> str:
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v)


def coerce(name: str, value: Any, where: str) -> Any:
    """``value`` (a flag's string or a YAML value) as field ``name``'s type; UsageError naming ``where``."""
    kind, optional = _kind(name)
    meta = _meta(name)

    def bad(problem: str) -> UsageError:
        return UsageError(f"{where}: {problem}, got {_show(value)}")

    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and optional):
        if optional:
            return None
        raise bad(f"expected {_KIND_TEXT[kind]}")
    if isinstance(value, dict) and meta.get("mapping"):
        return value  # e.g. prompts: a YAML mapping of templates, checked by validate()
    if isinstance(value, list) and meta.get("sep") and all(isinstance(x, (str, int, float)) for x in value):
        value = meta["sep"].join(str(x) for x in value)
    if isinstance(value, (list, dict)):
        raise bad(f"expected {_KIND_TEXT[kind]}, not a {'list' if isinstance(value, list) else 'mapping'}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise bad("expected true or false")
    if kind in (int, float):
        if isinstance(value, bool):
            raise bad(f"expected {_KIND_TEXT[kind]}")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(value, str) and kind is int and value.strip().lstrip("+-").isdigit():
                number = int(value)
        except ValueError:
            raise bad(f"expected {_KIND_TEXT[kind]}") from None
        if not isinstance(number, (int, float)) or math.isnan(number):
            raise bad(f"expected {_KIND_TEXT[kind]}")
        if kind is float:
            return float(number)
        if isinstance(number, float) and not number.is_integer():
            raise bad("expected an integer")
        return int(number)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a YAML number for a text field (exposure: 'fixed:0.5' needs quotes; lab_levels: 1)
    if not isinstance(value, str):
        raise bad("expected a string")
    return value


def check_value(name: str, value: Any, where: str) -> None:
    """The field's choices and check on a coerced value (None passes: it means 'recipe' or 'off')."""
    meta = _meta(name)
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise UsageError(f"{where}: {_show(value)} is not one of {', '.join(meta['choices'])}")
    if isinstance(value, float) and math.isinf(value) and name != "clip":
        raise UsageError(f"{where}: must be finite, got {value}")
    problem = meta["check"](value) if "check" in meta else None
    if problem:
        raise UsageError(f"{where}: {problem}, got {_show(value)}")


# ---------------------------------------------------------------------------------------------- validation
def validate(cfg: Config, labels: dict[str, str] | None = None) -> None:
    """Every field's type, choices and check, then the checks that need the machine or several fields; the
    first problem is raised as a one-line UsageError naming the flag (or ``labels[name]``, e.g. a YAML key)."""
    labels = labels or {}
    where = lambda name: labels.get(name, flag(name))  # noqa: E731
    for name in FIELDS:
        value = getattr(cfg, name)
        check_value(name, coerce(name, value, where(name)), where(name))
    for name in _CHECKS:
        problem = _CHECKS[name](cfg)
        if problem:
            raise UsageError(f"{where(name)} {_show(getattr(cfg, name))}: {problem}")


def _task_problem(cfg: Config) -> str | None:
    from atesd.engine.task import get_task, resolve_templates

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


def device_problem(spec: str) -> str | None:
    """Why ``spec`` (auto | cpu | cuda[:i]) cannot be used on this machine, or None."""
    if spec == "auto":
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        return "not a device; use auto, cpu, cuda or cuda:<i>"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"device type {device.type!r} is not supported; use auto, cpu, cuda or cuda:<i>"
    if not torch.cuda.is_available():
        return (
            "CUDA is not available on this machine"
            + (" (this torch is a CPU-only build)" if torch.version.cuda is None else " (no GPU is visible)")
            + "; use --device cpu or auto"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
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
    try:
        from atesd.engine.evaluate import BENCHMARKS
    except ImportError:  # evaluation unavailable: the evaluator says so in run.log
        return None
    from atesd.engine.task import is_task

    for name in names:
        if is_task(name):
            if not cfg.eval_problems:
                return f"{name} needs --eval-problems > 0"
        elif name.endswith(".jsonl"):
            if not os.path.isfile(name):
                return f"evaluation file {name!r} does not exist"
        elif name not in BENCHMARKS:
            return f"unknown benchmark {name!r}; choose from lab, {', '.join(sorted(BENCHMARKS))} or a local .jsonl"
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


# ------------------------------------------------------------------------------------------------ parsing
class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors (one line, exit 2, printed by the entry point)."""

    def error(self, message: str):
        if message.startswith("argument "):
            message = message[len("argument ") :]
        raise UsageError(message.replace("/--", " / --"))


class _Given(argparse.Action):
    """Stores (value, the option string the user typed), so errors name the flag as typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (values, option_string))


class _GivenBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            setattr(namespace, self.dest, (not option_string.startswith("--no-"), option_string))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m engine.train",
        description="On-policy self-distillation with adaptive teacher exposure. "
        "Precedence: built-in defaults < model recipe < --config YAML < flags.",
        epilog="Every flag also takes its underscore spelling (--max_new_tokens); TRL / transformers names: "
        + ", ".join(f"--{a} = {flag(n)}" for a, n in ALIASES.items())
        + ". Bad values are one-line errors (exit code 2); --debug shows tracebacks.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    p.add_argument(
        "--config",
        action=_Given,
        metavar="YAML",
        help="YAML file of the options below (keys with underscores); flags override it",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        action=_Given,
        metavar="DIR",
        help="continue a run with its own config.yaml: a run directory or one of its checkpoints; bare --resume "
        "takes --output-dir. Other flags must agree with the run, except --steps (extend), --save-every, "
        "--device, --report-to, --progress, --stop-after",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    aliases: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).extend({"--" + alias, flag(alias)})
    for f in dataclasses.fields(Config):
        default = f.default
        shown = "the model recipe" if default is None and f.name in RECIPE_FIELDS else _show(default)
        shown = "unset" if default is None and f.name not in RECIPE_FIELDS else shown
        text = f.metadata["help"]
        kw: dict[str, Any] = {"help": text if "(default:" in text else f"{text} (default: {shown})"}
        kind, _ = _kind(f.name)
        if "choices" in f.metadata:
            kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        kw["action"] = _GivenBool if kind is bool else _Given
        p.add_argument(flag(f.name), **kw)
        hidden = sorted({"--" + f.name} - {flag(f.name)} | set(aliases.get(f.name, ())))
        if hidden:
            p.add_argument(*hidden, dest=f.name, action=kw["action"], help=argparse.SUPPRESS)
    return p


def canonical_key(key: str) -> str | None:
    """Config field named by a YAML key or flag name (hyphens or underscores, TRL aliases), or None."""
    name = key.lstrip("-").replace("-", "_")
    name = ALIASES.get(name, name)
    return name if name in FIELDS else None


def _unknown(key: str, where: str) -> UsageError:
    bare = key.lstrip("-")
    if bare.replace("-", "_") in NOT_FLAGS:
        return UsageError(f"{where}{key}: not an option here; use {NOT_FLAGS[bare.replace('-', '_')]}")
    options = [flag(n) for n in FIELDS] + ["--config", "--resume", "--debug"]
    close = difflib.get_close_matches("--" + bare.replace("_", "-"), options, n=1)
    return UsageError(
        f"{where}unknown {'key' if where else 'flag'} {key}" + (f" (did you mean {close[0]}?)" if close else "")
        + " (see --help)"
    )


def read_yaml(path: str) -> dict[str, tuple[Any, str]]:
    """{field: (raw value, 'path: key')} of a YAML options file; every problem is a UsageError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path!r} is a directory") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"config file {path!r}: not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r}: expected a mapping of option: value, got a {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = canonical_key(str(key))
        if name is None:
            raise _unknown(str(key), f"config file {path!r}: ")
        out[name] = (value, f"{path}: {key}")
    return out


@dataclass
class Invocation:
    """One command line, parsed: the run's Config, the --resume target ('auto' = --output-dir), --debug, and
    (on --resume) the run directory and the fields changed from the run's config.yaml."""

    config: Config
    resume: str | None = None
    debug: bool = False
    run_dir: str | None = None
    changed: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)


def parse_invocation(argv: list[str] | None = None) -> Invocation:
    """Flags (and the optional YAML file), typed and validated; on --resume, the run's own config.yaml with the
    flags that may change applied. Nothing is loaded or written. Bad input raises a one-line UsageError."""
    ns, extra = build_parser().parse_known_args(argv)
    for token in extra:
        if token.startswith("-"):
            raise _unknown(token.split("=", 1)[0], "")
        raise UsageError(f"unexpected argument {token!r} (every option is a --flag; see --help)")
    args = vars(ns)
    debug = bool(args.pop("debug", False))
    given: dict[str, tuple[Any, str]] = {}
    if "config" in args:
        given.update(read_yaml(args.pop("config")[0]))
    resume = args.pop("resume", (None, None))[0]
    for name, (value, option) in args.items():
        given[name] = (value, option)
    values = {name: coerce(name, raw, where) for name, (raw, where) in given.items()}
    labels = {name: where for name, (_, where) in given.items()}
    for name, value in values.items():
        check_value(name, value, labels[name])
    if resume is None:
        cfg = Config(**values).resolve()
        cfg.validate(labels)
        return Invocation(cfg, None, debug)
    run_dir, _ = locate_run(resume, values.get("output_dir"))
    cfg, changed = restore(run_dir, values, labels)
    cfg.validate(labels)
    return Invocation(cfg, resume, debug, run_dir, changed)


def parse(argv: list[str] | None = None) -> tuple[Config, str | None]:
    """(validated Config, resume target or None) from flags and the optional YAML file (see parse_invocation)."""
    inv = parse_invocation(argv)
    return inv.config, inv.resume


# ------------------------------------------------------------------------------------------------- resume
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"


def locate_run(resume: str, output_dir: str | None = None) -> tuple[str, str | None]:
    """(run directory, the checkpoint named, or None) for ``--resume`` (``'auto'``: ``--output-dir``). A run
    directory holds config.yaml; a checkpoint is ``<run>/checkpoints/step-*`` holding trainer_state.json. Reads only."""
    if resume == "auto":
        if not output_dir:
            raise UsageError("--resume without a directory needs --output-dir (or give the run: --resume DIR)")
        path, named = output_dir, "--output-dir"
    else:
        path, named = resume, "--resume"
    if not os.path.exists(path):
        raise UsageError(f"{named} {path!r}: no such directory")
    if not os.path.isdir(path):
        raise UsageError(f"{named} {path!r} is a file, not a run directory")
    checkpoint = None
    parent = os.path.dirname(os.path.abspath(path))
    in_checkpoints = os.path.basename(parent) == "checkpoints" and os.path.basename(path).startswith("step-")
    if os.path.exists(os.path.join(path, STATE_FILE)) or in_checkpoints:
        if not in_checkpoints:
            raise UsageError(f"{named} {path!r}: a checkpoint outside a run's checkpoints/ directory")
        checkpoint, path = path, os.path.dirname(parent)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise UsageError(
            f"{named} {path!r} is not a run directory (no {CONFIG_FILE}) nor one of its checkpoints "
            f"(no {STATE_FILE})"
        )
    if resume != "auto" and output_dir and os.path.realpath(output_dir) != os.path.realpath(path):
        raise UsageError(f"--output-dir {output_dir!r} and --resume {resume!r} name different runs")
    return path, checkpoint


def read_run_config(run_dir: str) -> Config:
    """The run's own config.yaml as a typed Config (not validated against this machine)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    values = {name: coerce(name, raw, where) for name, (raw, where) in read_yaml(path).items()}
    return Config(**{k: v for k, v in values.items() if _meta(k).get("on_resume") != "invocation"})


def same_value(name: str, a: Any, b: Any) -> bool:
    """Equal as settings: paths compare by where they point."""
    if a == b:
        return True
    if _meta(name).get("path") and isinstance(a, str) and isinstance(b, str) and os.path.exists(a):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def restore(
    run_dir: str, values: dict[str, Any], labels: dict[str, str]
) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The run's Config with this invocation's values applied where allowed; returns (config, {field: (old,
    new)} for the fields changed). A given value that would change the run is a UsageError listing them all."""
    stored = read_run_config(run_dir)
    if stored.task and ":" in stored.task and values.get("task") != stored.task:  # a run directory is data
        raise UsageError(f"--resume {run_dir}: its config.yaml names the task {stored.task!r}, a module that would be "
                         f"imported (code); if you trust it, resume with --task {stored.task}")
    conflicts, changed = [], {}
    for name, value in values.items():
        mode = _meta(name).get("on_resume", "run")
        old = getattr(stored, name)
        if mode == "run" and not same_value(name, value, old):
            conflicts.append(f"{labels[name]} {_show(value)} (the run has {_show(old)})")
        elif mode == "change" and value != old:
            changed[name] = (old, value)
    if conflicts:
        raise UsageError(
            f"--resume {run_dir}: {'; '.join(conflicts)}; a resumed run keeps its config.yaml (only "
            f"{', '.join(flag(n) for n in FIELDS if _meta(n).get('on_resume') == 'change')} may change): start a new "
            "run to change the rest"
        )
    cfg = dataclasses.replace(stored)
    for name, value in values.items():
        if _meta(name).get("on_resume") in ("change", "invocation"):
            setattr(cfg, name, value)
    cfg.output_dir = run_dir
    steps = [int(d[5:]) for d in _checkpoint_dirs(run_dir) if d[5:].isdigit()]
    if steps and cfg.steps < max(steps):
        raise UsageError(f"--steps {cfg.steps} is below the run's newest checkpoint, step {max(steps)}")
    return cfg, changed


def _checkpoint_dirs(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    return sorted(d for d in os.listdir(root) if d.startswith("step-")) if os.path.isdir(root) else []


def diff_run(stored: Config, cfg: Config) -> tuple[list[str], dict[str, tuple[Any, Any]]]:
    """Compare a config with the run's stored one: (the run fields that differ, as '--flag value (the run has
    old)'; {field: (old, new)} for the fields that may change on --resume and did)."""
    conflicts, changed = [], {}
    for name in FIELDS:
        mode = _meta(name).get("on_resume", "run")
        old, new = getattr(stored, name), getattr(cfg, name)
        if mode == "run" and not same_value(name, new, old):
            conflicts.append(f"{flag(name)} {_show(new)} (the run has {_show(old)})")
        elif mode == "change" and new != old:
            changed[name] = (old, new)
    return conflicts, changed
