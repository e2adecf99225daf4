"""Checkpoints: ``<run>/checkpoints/step-XXXXXX`` holding the peft adapter and ``trainer_state.pt``.

A checkpoint is written into a temporary directory beside its final name and renamed into place, so a kill at
any moment leaves either the previous checkpoints or the new complete one, never a half-written directory.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter_model.safetensors"


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) global RNG states, for an exact resume."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str, step: int, model, state: dict, adapter_state_dict: dict | None = None) -> str:
    """Atomically write checkpoints/step-XXXXXX: the peft adapter + ``state`` (temp dir + rename).

    ``adapter_state_dict``: the adapter's whole tensors by parameter name, when the model holds only shards of them
    (data-parallel runs gather them first); by default the model's own."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(run_dir, checkpoint_name(step))
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({} if adapter_state_dict is None else {"state_dict": adapter_state_dict}))
    torch.save(state, os.path.join(tmp, STATE_FILE))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_adapter(model, path: str) -> None:
    """Load the checkpoint's adapter weights into the peft ``model``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(os.path.join(path, ADAPTER_FILE)))


def load_state(path: str, map_location: str | None = None) -> dict:
    return torch.load(os.path.join(path, STATE_FILE), weights_only=False, map_location=map_location)


def latest_checkpoint(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the newest checkpoints/step-* under the run directory."""
    if os.path.exists(os.path.join(path, STATE_FILE)):
        return path
    root = os.path.join(path, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-")) if os.path.isdir(root) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint to resume under {path!r}")
    return os.path.join(root, steps[-1])


def checkpoint_name(step: int) -> str:
    """Checkpoint directory of ``step``, relative to the run directory."""
    return os.path.join("checkpoints", f"step-{step:06d}")
