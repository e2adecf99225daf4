"""Checkpoints: ``<run>/checkpoints/step-XXXXXX`` holding the peft adapter, the tokenizer, ``trainer_state.pt`` and
``manifest.json`` (each file's size and sha256).

A checkpoint is written into a temporary directory beside its final name and renamed into place, so a kill at
any moment leaves either the previous checkpoints or the new complete one, never a half-written directory. The
manifest, written last, makes later damage (a truncated or altered file) detectable before loading:
:func:`load_latest` falls back to the newest intact checkpoint and says which it skipped and why.

The adapter's ``base_model_name_or_path`` is portable: a preset's name ('tiny', resolved inside the installed
package) or hub id, never a path into one checkout; :func:`base_model` reads it, and the checkpoint's own
tokenizer loads with it, so a checkpoint copied to another machine evaluates there
(``python -m engine.evaluate --adapter <checkpoint>``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil

import numpy as np
import torch

from atesd.engine.errors import UsageError

log = logging.getLogger("engine.checkpoint")
STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST_FILE = "manifest.json"


class BrokenCheckpoint(UsageError):
    """A checkpoint whose files are missing, truncated or unreadable."""


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


def portable_model_ref(model: str) -> str:
    """What a checkpoint records as its base model: the preset name for the embedded model ('tiny'), the hub id
    for the other presets, a hub id as given, a local directory as an absolute path (it is the user's own)."""
    from atesd.engine.models import RECIPES

    if model == "tiny":
        return "tiny"
    if model in RECIPES:
        return RECIPES[model].model_id
    path = os.path.expanduser(model)
    return os.path.abspath(path) if os.path.isdir(path) else model


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str, step: int, base_model: str | None) -> None:
    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel != MANIFEST_FILE:
                files[rel] = {"bytes": os.path.getsize(full), "sha256": _sha256(full)}
    manifest = {"format": 1, "step": step, "base_model": base_model, "files": files}
    with open(os.path.join(directory, MANIFEST_FILE), "w") as fh:
        json.dump(manifest, fh, indent=1)


def save(
    run_dir: str,
    step: int,
    model,
    state: dict,
    *,
    tokenizer=None,
    base_model: str | None = None,
    adapter_state_dict: dict | None = None,
) -> str:
    """Atomically write checkpoints/step-XXXXXX: the peft adapter, the tokenizer, ``state`` and the manifest.

    ``adapter_state_dict``: the adapter's whole tensors by parameter name, when the model holds only shards of them
    (data-parallel runs gather them first); by default the model's own."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(run_dir, checkpoint_name(step))
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _recorded_base(model, base_model):
        # the adapter never touches the embeddings (engine.models.LORA_TARGETS) nor resizes the vocabulary; saying
        # so skips peft's probe of the base model's config on the hub at every save
        whole = {} if adapter_state_dict is None else {"state_dict": adapter_state_dict}
        model.save_pretrained(tmp, save_embedding_layers=False, **whole)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    write_manifest(tmp, step, base_model)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


@contextlib.contextmanager
def _recorded_base(model, base_model: str | None):
    """While saving, the peft model names ``base_model`` as its base (adapter_config.json and the model card),
    not the directory it was loaded from."""
    if base_model is None:
        yield
        return
    configs = list(getattr(model, "peft_config", {}).values())
    net = model.get_base_model()
    saved = [c.base_model_name_or_path for c in configs], net.config._name_or_path, net.name_or_path
    try:
        for c in configs:
            c.base_model_name_or_path = base_model
        net.config._name_or_path = net.name_or_path = base_model
        yield
    finally:
        for c, name in zip(configs, saved[0]):
            c.base_model_name_or_path = name
        net.config._name_or_path, net.name_or_path = saved[1], saved[2]


def verify(path: str, *, hashes: bool = True) -> None:
    """Raise BrokenCheckpoint (naming the file) unless every file the manifest lists is there with its size
    (and sha256). A checkpoint written before manifests existed passes when its two essential files exist."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(manifest_path):
        for name in (ADAPTER_FILE, STATE_FILE):
            if not os.path.isfile(os.path.join(path, name)):
                raise BrokenCheckpoint(f"{name} is missing")
        return
    try:
        with open(manifest_path) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BrokenCheckpoint(f"{MANIFEST_FILE} is unreadable ({type(e).__name__})") from None
    for rel, want in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise BrokenCheckpoint(f"{rel} is missing")
        size = os.path.getsize(full)
        if size != want["bytes"]:
            raise BrokenCheckpoint(f"{rel} has {size} bytes, the manifest says {want['bytes']} (truncated?)")
        if hashes and _sha256(full) != want["sha256"]:
            raise BrokenCheckpoint(f"{rel} does not match its sha256 in the manifest (altered or corrupted)")


def read(path: str, map_location: str | None = None) -> tuple[dict, dict]:
    """(adapter tensors, trainer state) of a verified checkpoint; nothing is applied to any model yet.
    ``map_location`` as torch.load's (data-parallel runs read the gathered state onto the CPU first)."""
    from safetensors.torch import load_file

    verify(path)
    try:
        adapter = load_file(os.path.join(path, ADAPTER_FILE))
    except Exception as e:  # safetensors reports truncation as various errors
        raise BrokenCheckpoint(f"{ADAPTER_FILE} is unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    try:
        state = torch.load(os.path.join(path, STATE_FILE), weights_only=False, map_location=map_location)
    except Exception as e:  # truncated zip, unpickling error
        raise BrokenCheckpoint(f"{STATE_FILE} is unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    return adapter, state


def apply_adapter(model, adapter: dict) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, adapter)


def checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint directories, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step-")]


def load_latest(
    run_dir: str, named: str | None = None, map_location: str | None = None
) -> tuple[str, dict, dict] | None:
    """(path, adapter, state) of the newest intact checkpoint of the run, or of the ``named`` one (which must be
    intact); None when the run has no checkpoint. Each damaged newer checkpoint is skipped with a warning; all of
    them damaged is a BrokenCheckpoint."""
    if named is not None:
        try:
            return (named, *read(named, map_location))
        except BrokenCheckpoint as e:
            intact = [os.path.basename(c) for c in checkpoints(run_dir) if c != named and _intact(c)]
            raise BrokenCheckpoint(
                f"checkpoint {named} is damaged: {e}; intact checkpoints: {', '.join(intact) or 'none'}"
            ) from None
    found, damaged = checkpoints(run_dir), []
    for path in reversed(found):
        try:
            return (path, *read(path, map_location))
        except BrokenCheckpoint as e:
            log.warning("checkpoint %s is damaged (%s); falling back to the one before it", path, e)
            damaged.append(f"{os.path.basename(path)}: {e}")
    if found:
        raise BrokenCheckpoint(f"no intact checkpoint under {run_dir} ({'; '.join(damaged)})")
    return None


def _intact(path: str) -> bool:
    try:
        verify(path, hashes=False)
        return True
    except BrokenCheckpoint:
        return False


def base_model(path: str) -> str | None:
    """The base model a checkpoint's adapter was trained on (its adapter_config.json), or None."""
    try:
        with open(os.path.join(path, ADAPTER_CONFIG)) as fh:
            return json.load(fh).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def checkpoint_name(step: int) -> str:
    """Checkpoint directory of ``step``, relative to the run directory."""
    return os.path.join("checkpoints", f"step-{step:06d}")
