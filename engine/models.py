"""Model presets (recipes), loading, LoRA, the decoder body and the teacher views of the one shared model.

The engine never builds full logits: it runs the decoder body for final hidden states and hands them, with
``lm_head.weight``, to the fused KL op.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass

import torch

from atesd.engine.errors import UsageError

DEFAULT_DATASET = "siyanzhao/Openthoughts_math_30k_opsd"  # OPSD's training set (problem, solution)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """Per-model defaults; any of them can be overridden by a flag or the YAML config."""

    model_id: str
    data: str = DEFAULT_DATASET  # a task that generates its problems, a hub dataset id or a local file
    clip: float | None = 0.05  # None: no clipping
    lr: float = 5e-6
    lora_r: int = 64
    lora_alpha: int = 128
    batch_size: int = 32  # problems per optimizer step
    micro_batch: int = 4  # problems per packed scoring pass
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 2048
    max_reference_tokens: int = 8192
    steps: int = 100
    eval_problems: int = 0
    lr_schedule: str = "linear"  # OPSD: the HF Trainer's default linear decay over --max_steps 100
    # the paper's checkpoint rule: save and evaluate every 25 steps (25/50/75/100), report the best checkpoint
    save_every: int = 25
    eval_every: int = 25
    eval_benchmarks: str | None = None  # None: the engine's rule (the --data task's held-out split, else none)


PAPER_BENCHMARKS = "aime24,aime25,hmmt25"  # the paper's Table 1, with the paper's protocol (the math task's)

# OPSD's recipe for Qwen3 (forward KL, T=1.1, clip 0.05; 0.06 for 8B; LoRA r=64/alpha=128, lr 5e-6).
# The embedded tiny model is ~1000x smaller and trains for a few dozen steps on 2 CPU cores: LoRA updates of
# 5e-6 per step would not move it at all, so it takes 1e-3 (2e-3 and above made it worse in our runs), a smaller
# adapter for its width, and short rollouts that fit its short solutions; 60 steps of 16 problems (chosen on the
# lab's val split: 0.46 -> 0.78 held-out accuracy in 45 s on 2 cores, RESULTS.md section 4). Clipping is off:
# with a 320-token vocabulary the teacher's top token carries almost all its mass, so at clip 0.05 the terms that say
# "put mass here" are clipped (no gradient) and the student drifts away from the teacher (measured: KL 0.14 ->
# 0.45 over 40 steps, held-out accuracy 0.13 -> 0.09; benchmarks/RESULTS.md).
RECIPES: dict[str, Recipe] = {
    "qwen3-1.7b": Recipe("Qwen/Qwen3-1.7B", eval_benchmarks=PAPER_BENCHMARKS),
    "qwen3-4b": Recipe("Qwen/Qwen3-4B", eval_benchmarks=PAPER_BENCHMARKS),
    "qwen3-8b": Recipe("Qwen/Qwen3-8B", clip=0.06, eval_benchmarks=PAPER_BENCHMARKS),
    "tiny": Recipe(
        "tiny",
        data="lab",  # the embedded default: the tiny model on the lab task it ships with
        clip=None,
        lr=1e-3,
        lora_r=16,
        lora_alpha=32,
        batch_size=16,
        micro_batch=8,
        max_new_tokens=64,
        max_prompt_tokens=256,
        max_reference_tokens=384,
        steps=60,
        eval_problems=400,
        lr_schedule="constant",
        save_every=10,
        eval_every=0,
    ),
}


def recipe_name(model: str) -> str | None:
    """The preset whose recipe ``model`` takes: a preset name, its hub id (any case: ``Qwen/Qwen3-8B``) or a local
    directory named like it (``/models/Qwen3-8B``); None for any other model."""
    if model in RECIPES:
        return model
    key = model.rstrip("/").lower()
    for name, r in RECIPES.items():
        hub = r.model_id.lower()
        if "/" in hub and (key == hub or os.path.basename(key) == hub.split("/")[-1]):
            return name
    return None


def recipe_for(model: str) -> Recipe:
    """The recipe of the preset ``model`` names (:func:`recipe_name`); for any other model the 1.7B/4B training
    defaults, evaluating only before and after training and no benchmark unless asked (the paper's benchmarks
    come from the hub: ``--eval-benchmarks aime24,aime25,hmmt25 --eval-every 25``)."""
    name = recipe_name(model)
    if name is not None:
        return RECIPES[name]
    return Recipe(model, eval_every=0)


class ModelLoadError(UsageError, RuntimeError):
    """A model that cannot be loaded, named with the reason (missing path, empty directory, not in the cache)."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_model_path(model: str) -> str:
    """Hub id of a preset, the directory of a model a task ships (the lab's 'tiny'), else ``model``."""
    if model in RECIPES and RECIPES[model].model_id != model:
        return RECIPES[model].model_id
    from atesd.engine.task import find_model

    shipped = find_model(model)
    if shipped is not None:
        return shipped
    if model == "tiny":
        raise ModelLoadError("model 'tiny' is shipped by the lab task (engine/lab), which is missing")
    return model


def looks_like_path(spec: str) -> bool:
    """A model or dataset spec meant as a local path (not a hub id ``name`` or ``org/name``)."""
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec in (".", "..")
        or os.sep != "/" and os.sep in spec
        or not _HUB_ID.match(spec)
    )


def model_problem(model: str) -> str | None:
    """Why ``model`` cannot be a model (checked before anything loads), or None. Only local paths are checked
    here; a hub id's problems (not found, offline and not cached) surface when it loads."""
    if model in RECIPES:
        return None
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        entries = [e for e in os.listdir(path) if not e.startswith(".")]
        if not entries:
            return "the model directory is empty"
        if "config.json" not in entries:
            return "the model directory has no config.json (not a Hugging Face model directory)"
        return None
    if os.path.exists(path):
        return "is a file; give the model's directory, a preset or a hub id"
    if looks_like_path(model) or not model.strip():
        return "no such model directory (and not a hub id: those look like org/name)"
    return None


def hub_unreachable(timeout: float = 3.0) -> bool:
    """True when the hub cannot be reached directly (no network): skip hub retries, use the cache only."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return False  # behind a proxy a direct probe says nothing
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout
        ).close()
        return False
    except OSError:
        return True


def offline_problem(model: str) -> str | None:
    """Why ``model`` cannot load here, known before anything else loads: a hub model (or a preset's) that is not
    in the local cache while the hub is unreachable, with what to do instead. None otherwise (a local directory, a
    cached or reachable hub model)."""
    path = os.path.expanduser(resolve_model_path(model))
    if os.path.isdir(path) or looks_like_path(path) or not hub_unreachable():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return None
    named = f"{model!r} (hub id {path})" if path != model else repr(model)
    return (f"model {named} is not in the local Hugging Face cache and the hub cannot be reached from this machine: "
            f"download it where there is a network (`huggingface-cli download {path} --local-dir DIR`, or copy "
            "the cache) and give --model DIR")


def load_model(
    model: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", attn: str = "sdpa", tokenizer=None
):
    """(model, tokenizer) from a preset name, hub id or local directory; a one-line ModelLoadError naming the model
    and the reason (missing or empty directory, no tokenizer, hub unreachable and not cached). ``tokenizer``: one
    already loaded (:func:`load_tokenizer`, its chat template chosen): only the weights load, and it is returned."""
    return _load(model, weights=dict(dtype=dtype, attn_implementation=attn), device=device, tokenizer=tokenizer)


def load_tokenizer(model: str):
    """The tokenizer alone of a preset name, hub id or local directory (no weights); errors as :func:`load_model`."""
    return _load(model, weights=None)[1]


def _load(model: str, *, weights: dict | None, device: str = "cpu", tokenizer=None):
    problem = model_problem(model)
    if problem:
        raise ModelLoadError(f"model {model!r}: {problem}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.expanduser(resolve_model_path(model))
    local = os.path.isdir(path)
    # without a network, hub downloads retry for about a minute; go straight to the local cache instead
    local_only = not local and hub_unreachable()
    where = f"local directory {path!r}" if local else f"hub id {path!r}"
    hint = (
        " (the hub is unreachable from this machine and the model is not in the local cache)"
        if local_only
        else "" if local else " -- check the name, or the network"
    )
    step, net = "tokenizer", None
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        if weights is not None:
            step = "weights"
            net = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only, **weights).to(device)
    except Exception as e:  # hub unreachable, offline, bad id, broken files: all end here
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            f"could not load the {step} of model {model!r} ({where}): {type(e).__name__}: {first}{hint}"
        ) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer


def context_length(model, tokenizer=None) -> int | None:
    """Positions the model can attend over: the smaller of its config's ``max_position_embeddings`` and the
    tokenizer's ``model_max_length``, each where it is a real limit (transformers writes 1e30 for "none");
    None when neither is."""
    limits = [getattr(causal_lm(model).config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    real = [int(n) for n in limits if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 10**9]
    return min(real) if real else None


def add_lora(model, r: int, alpha: int, dropout: float = 0.0, targets=LORA_TARGETS):
    """Wrap in a peft LoRA model; only the adapter trains (the LM head stays frozen)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in targets if t in present]
    if not targets:
        raise ValueError("none of the LoRA target modules exist in this model")
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`: its
        # FutureWarning (peft's, not ours; the behaviour is right) printed on every run is noise
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def causal_lm(model):
    """The underlying transformers CausalLM (unwraps peft; LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model):
    """The decoder body that returns final (normed) hidden states."""
    return causal_lm(model).get_decoder()


def lm_head_weight(model) -> torch.Tensor:
    return causal_lm(model).get_output_embeddings().weight


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Teacher:
    """Which weights the teacher uses: 'base' (adapter disabled, the default), 'current' (the student's
    weights, no grad) or 'ema' (an exponential moving average of the adapter, swapped in for the teacher
    pass)."""

    def __init__(self, model, kind: str = "base", ema_decay: float = 0.99) -> None:
        if kind not in ("base", "current", "ema"):
            raise ValueError(f"teacher kind must be base, current or ema, got {kind!r}")
        self.model, self.kind, self.decay = model, kind, ema_decay
        self.ema = {n: p.detach().clone() for n, p in adapter_params(model).items()} if kind == "ema" else {}

    @contextlib.contextmanager
    def view(self):
        if self.kind == "base" and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        elif self.kind == "ema":
            params = adapter_params(self.model)
            saved = {n: p.detach().clone() for n, p in params.items()}
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.ema[n])
            try:
                yield
            finally:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(saved[n])
        else:
            yield

    @torch.no_grad()
    def update(self) -> None:
        for n, p in adapter_params(self.model).items():
            if n in self.ema:
                self.ema[n].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.ema = {n: t.clone() for n, t in state.get("ema", {}).items()}
