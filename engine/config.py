"""Training configuration: defaults < model recipe < YAML ``--config`` < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

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
)


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # model and data
    model: str = _f(
        "tiny",
        f"preset ({', '.join(RECIPES)}), hub id or local directory; 'tiny' is the embedded default model",
    )
    data: str | None = _f(
        None,
        "'lab' (embedded synthetic task), hub dataset id or local .json/.jsonl/.parquet; "
        "default: lab for tiny, else siyanzhao/Openthoughts_math_30k_opsd",
    )
    split: str = _f("train", "dataset split")
    problem_column: str = _f("problem", "column holding the problem text")
    solution_column: str = _f("solution", "column holding the reference solution (ends in \\boxed{})")
    answer_column: str = _f(
        "answer", "column holding the final answer (taken from the last \\boxed{} if absent)"
    )
    lab_size: int = _f(2000, "number of lab training problems (data=lab)")
    lab_levels: str = _f("1,2", "comma list of lab difficulty levels used for training and held-out evaluation")
    # exposure
    exposure: str = _f(
        "adaptive",
        "exposure policy: adaptive | full | fixed:<alpha> | random | linear:<a>:<b> | adaptive-onestep",
    )
    exposure_mode: str = _f(
        "tokens", "truncate the reference reasoning by 'tokens' or by 'lines'", choices=("tokens", "lines")
    )
    instruction: str | None = _f(
        None, "transition instruction after the exposed reference (default: the built-in wording)"
    )
    teacher: str = _f(
        "base",
        "teacher weights: base (adapter off), current (student weights, no grad), ema",
        choices=("base", "current", "ema"),
    )
    ema_decay: float = _f(0.99, "EMA decay for --teacher ema")
    teacher_thinking: bool = _f(
        False, "Qwen3 thinking mode in the teacher prompt (the student's is always off)"
    )
    # rollouts
    num_samples: int = _f(1, "rollouts per problem (G)")
    max_new_tokens: int | None = _f(None, "rollout length cap (recipe)")
    rollout_temperature: float = _f(1.1, "sampling temperature of the rollouts")
    top_p: float = _f(0.95, "nucleus sampling threshold")
    top_k: int = _f(20, "top-k sampling (0 = off)")
    rollout: str = _f(
        "auto",
        "rollout decoder: auto (compiled static-cache loop on CUDA, eager static-cache loop on CPU) | hf (the eager "
        "HF loop) | static (static KV cache, LoRA merged) | compiled (static + torch.compile, CUDA graphs on GPU)",
        choices=("auto", "hf", "static", "compiled"),
    )
    max_prompt_tokens: int | None = _f(None, "skip problems whose student prompt is longer (recipe)")
    max_reference_tokens: int | None = _f(None, "skip problems whose reference is longer (recipe)")
    # loss and optimisation
    kl_temperature: float = _f(1.1, "temperature of the distillation softmax")
    clip: float | None = _f(None, "pointwise KL clip tau; inf = off (recipe: 0.05, 0.06 for qwen3-8b, off for tiny)")
    beta: float = _f(0.0, "0 = forward KL(teacher||student), 1 = reverse KL, between = generalized JSD")
    steps: int | None = _f(None, "optimizer steps (recipe)")
    batch_size: int | None = _f(None, "problems per optimizer step (recipe)")
    micro_batch: int | None = _f(
        None, "problems per packed scoring pass; gradients accumulate over the batch"
    )
    lr: float | None = _f(None, "AdamW learning rate (recipe: 5e-6 for Qwen3, 1e-3 for tiny)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps")
    lr_schedule: str = _f("constant", "after warm-up: constant or cosine", choices=("constant", "cosine"))
    max_grad_norm: float = _f(0.1, "gradient-norm clip")
    lora_r: int | None = _f(None, "LoRA rank (recipe: 64)")
    lora_alpha: int | None = _f(None, "LoRA alpha (recipe: 128)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    # system
    device: str = _f("auto", "auto | cpu | cuda[:i]")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    attention: str = _f(
        "auto",
        "tree-mask attention: auto (flex on CUDA, dense elsewhere) | dense | flex",
        choices=("auto", "dense", "flex"),
    )
    gradient_checkpointing: str = _f("auto", "auto (on for GPU) | on | off", choices=("auto", "on", "off"))
    seed: int = _f(0, "seed of data order, sampling and initialisation")
    # outputs
    output_dir: str | None = _f(None, "run directory (default runs/<model>-<time>)")
    save_every: int = _f(10, "checkpoint every N steps (and at the end)")
    probe_every: int = _f(5, "compute the probe NLL every N steps (0 = never)")
    probe_size: int = _f(8, "number of fixed reference solutions in the probe set")
    eval_problems: int | None = _f(None, "held-out lab problems for greedy accuracy before/after (0 = skip)")
    eval_every: int = _f(
        0, "also evaluate every N steps, checkpointing each evaluated step (0 = only before and after training)"
    )
    eval_benchmarks: str | None = _f(
        None,
        "comma list evaluated before training, every --eval-every steps and at the end: lab (held-out lab "
        "split, --eval-problems problems), aime24, aime25, hmmt25 or a local .jsonl with problem/answer; "
        "'' = none (default: lab when --data lab and --eval-problems > 0, else none)",
    )
    eval_max_new_tokens: int | None = _f(
        None, "generation cap of the evaluations (default: 128 on lab, 32768 on math benchmarks)", type=int
    )
    eval_samples: int = _f(1, "samples per problem when --eval-temperature > 0 (accuracy = Average@n)")
    eval_temperature: float = _f(
        0.0, "evaluation sampling temperature (0 = greedy; else with the rollout --top-p/--top-k)"
    )
    eval_limit: int | None = _f(
        None, "evaluate only the first N problems of each math benchmark (default: all)", type=int
    )
    progress: bool = _f(True, "show a progress bar")
    stop_after: int | None = _f(
        None, "stop after this step as if killed (tests resume); the schedule still spans --steps"
    )

    def lab_level_tuple(self) -> tuple[int, ...]:
        """``lab_levels`` parsed: '1,2' -> (1, 2); bad entries raise a ValueError naming them."""
        try:
            levels = tuple(int(x) for x in str(self.lab_levels).split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--lab-levels must be a comma list of integers, got {self.lab_levels!r}") from None
        if not levels or any(lv not in (1, 2, 3, 4) for lv in levels):
            raise ValueError(f"--lab-levels must name levels among 1,2,3,4, got {self.lab_levels!r}")
        return levels

    def resolve(self) -> Config:
        """Fill recipe-driven fields left unset and the model-dependent data default."""
        recipe = recipe_for(self.model)
        for name in RECIPE_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(recipe, name))
        if self.data is None:
            from atesd.engine.data import DEFAULT_DATASET

            self.data = "lab" if self.model == "tiny" else DEFAULT_DATASET
        if self.eval_benchmarks is None:
            self.eval_benchmarks = "lab" if self.data == "lab" and self.eval_problems else ""
        return self


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.train",
        description="On-policy self-distillation with adaptive teacher exposure. "
        "Precedence: built-in defaults < "
        "model recipe < --config YAML < flags.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--config", help="YAML file of the options below (keys with underscores); flags override it"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue a run exactly: a run directory or checkpoint directory; bare --resume takes the "
        "latest checkpoint under --output-dir",
    )
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = "the model recipe" if default is None and f.name in RECIPE_FIELDS else default
        text = f.metadata["help"]
        kw: dict[str, Any] = {"help": text if "(default:" in text else f"{text} (default: {shown})"}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kind = f.metadata.get("type") or {"clip": float, "lr": float}.get(f.name)
            if kind is None:
                kind = (
                    type(default)
                    if default is not None
                    else (int if f.name in RECIPE_FIELDS or f.name == "stop_after" else str)
                )
            kw["type"] = kind
        p.add_argument(flag, **kw)
    return p


def parse(argv: list[str] | None = None) -> tuple[Config, str | None]:
    """(resolved Config, resume target or None) from flags and the optional YAML file."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if "config" in args:
        with open(args.pop("config")) as fh:
            values.update(yaml.safe_load(fh) or {})
    resume = args.pop("resume", None)
    values.update(args)
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"unknown config keys: {', '.join(unknown)}")
    return Config(**values).resolve(), resume
