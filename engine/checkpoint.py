"""Checkpoints: ``<run>/checkpoints/step-XXXXXX`` holding the peft adapter, the tokenizer, the trainer state
(``trainer_state.json`` + ``trainer_state.safetensors``) and ``manifest.json`` (each file's size and sha256).

Every file of a checkpoint is read as data, never as code: tensors through safetensors, everything else as JSON
(the format is in docs/engine.md, "Checkpoint format"). Nothing on the resume or evaluation path unpickles; a
``trainer_state.pt`` (a pickle, written by earlier versions) is refused with a one-line error that names
``python -m engine.checkpoint convert``, which rewrites it as data once (:func:`convert`).

A checkpoint is written into a temporary directory beside its final name and renamed into place, so a kill at
any moment leaves either the previous checkpoints or the new complete one, never a half-written directory. The
manifest, written last, makes later damage (a truncated or altered file) detectable before loading:
:func:`load_latest` falls back to the newest intact checkpoint and says which it skipped and why. A checkpoint
holding a symbolic link, or whose manifest names a file outside it, is refused the same way.

The adapter's ``base_model_name_or_path`` is portable: a preset's name ('tiny', resolved inside the installed
package) or hub id, never a path into one checkout; :func:`base_model` reads it, and the checkpoint's own
tokenizer loads with it, so a checkpoint copied to another machine evaluates there
(``python -m engine.evaluate --adapter <checkpoint>``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import stat
import sys
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from atesd.engine.errors import UsageError

log = logging.getLogger("engine.checkpoint")
STATE_FILE = "trainer_state.json"  # the trainer state's structure and plain values
STATE_TENSORS = "trainer_state.safetensors"  # its tensors, referenced by name from STATE_FILE
LEGACY_STATE_FILE = "trainer_state.pt"  # a pickle (torch.save), written by earlier versions; never read unasked
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_PICKLE = "adapter_model.bin"  # peft's pickled adapter: never read
MANIFEST_FILE = "manifest.json"
STATE_FORMAT = "atesd.trainer_state"
STATE_VERSION = 1
CONVERT_HINT = "python -m engine.checkpoint convert"


class BrokenCheckpoint(UsageError):
    """A checkpoint whose files are missing, truncated, unreadable or not plain data files inside it."""


class LegacyCheckpoint(UsageError):
    """A checkpoint whose trainer state is a pickle (``trainer_state.pt``): refused until converted."""


# ------------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) global RNG states, for an exact resume. Plain values and tensors only
    (numpy's MT19937 key as a list of ints), so the state is stored as data."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (str(name), [int(k) for k in key], int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]  # key: a list (this format) or a uint32 array (legacy)
    np.random.set_state((str(name), np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
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


# -------------------------------------------------------------------------------------- trainer state codec
# A state is a tree of dicts, lists, tuples, str, int, float, bool, None and tensors. It is stored as one JSON
# document whose values are JSON's own, except four tagged one-key objects (docs/engine.md, "Checkpoint format"):
#   {"$tensor": name}              a tensor of the safetensors file (names are the value's path in the tree)
#   {"$tuple": [...]}              a tuple (random.getstate() must get its tuples back)
#   {"$float": "nan"|"inf"|"-inf"} a non-finite float (strict JSON has none)
#   {"$dict": [[key, value], ..]}  a dict whose keys are not all strings (optimizer states are keyed by int), or
#                                  one with a key starting with "$"
# Finite floats are written with repr() and read back exactly; nothing else is accepted in either direction.
_TAGS = ("$tensor", "$tuple", "$float", "$dict")


def encode_state(state: Mapping) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-ready tree, {name: CPU tensor}) of ``state``. A value of any other type is a TypeError naming its
    path (a bug in a state_dict: it would not be stored as data)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def tensor_ref(t: torch.Tensor, path: str) -> dict:
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages:  # safetensors refuses tensors that share memory
            t = t.clone()
        if t.numel():
            storages.add(t.untyped_storage().data_ptr())
        name, n = path or "tensor", 1
        while name in tensors:
            n += 1
            name = f"{path}#{n}"
        tensors[name] = t
        return {"$tensor": name}

    def enc(v: Any, path: str) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (np.bool_, np.integer, np.floating)):
            v = v.item()
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {"$float": repr(float(v))}
        if isinstance(v, torch.Tensor):
            return tensor_ref(v, path)
        if isinstance(v, tuple):
            return {"$tuple": [enc(x, f"{path}/{i}") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, f"{path}/{i}") for i, x in enumerate(v)]
        if isinstance(v, Mapping):
            for k in v:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"trainer state {path or '/'}: key {k!r} is neither str nor int")
            plain = all(isinstance(k, str) and not k.startswith("$") for k in v)
            items = [(k, enc(x, f"{path}/{k}")) for k, x in v.items()]
            return dict(items) if plain else {"$dict": [[k, x] for k, x in items]}
        raise TypeError(f"trainer state {path or '/'}: a {type(v).__module__}.{type(v).__name__} is not data")

    return enc(dict(state), ""), tensors


def decode_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The state :func:`encode_state` encoded. Anything outside the format (an unknown tag, a tensor named twice
    or missing, a key of the wrong type) is a ValueError naming its path."""
    used: set[str] = set()

    def dec(v: Any, path: str) -> Any:
        if v is None or isinstance(v, (bool, str, int, float)):
            return v
        if isinstance(v, list):
            return [dec(x, f"{path}/{i}") for i, x in enumerate(v)]
        if not isinstance(v, dict):
            raise ValueError(f"{path or '/'}: unexpected {type(v).__name__}")
        tagged = [k for k in v if k.startswith("$")]
        if not tagged:
            return {k: dec(x, f"{path}/{k}") for k, x in v.items()}
        tag = tagged[0]
        if len(v) != 1 or tag not in _TAGS:
            raise ValueError(f"{path or '/'}: unknown tag {tag!r}")
        body = v[tag]
        if tag == "$tensor":
            if not isinstance(body, str) or body not in tensors:
                raise ValueError(f"{path or '/'}: tensor {str(body)[:80]!r} is not in {STATE_TENSORS}")
            if body in used:
                raise ValueError(f"{path or '/'}: tensor {body!r} is referenced twice")
            used.add(body)
            return tensors[body]
        if tag == "$float":
            if body not in ("nan", "inf", "-inf"):
                raise ValueError(f"{path or '/'}: $float must be nan, inf or -inf, got {str(body)[:20]!r}")
            return float(body)
        if not isinstance(body, list):
            raise ValueError(f"{path or '/'}: {tag} holds a {type(body).__name__}, not a list")
        if tag == "$tuple":
            return tuple(dec(x, f"{path}/{i}") for i, x in enumerate(body))
        out = {}
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2) or isinstance(pair[0], bool):
                raise ValueError(f"{path or '/'}: $dict entries are [key, value] pairs")
            if not isinstance(pair[0], (str, int)):
                raise ValueError(f"{path or '/'}: $dict key {pair[0]!r} is neither str nor int")
            out[pair[0]] = dec(pair[1], f"{path}/{pair[0]}")
        return out

    state = dec(tree, "")
    unused = set(tensors) - used
    if unused:
        raise ValueError(f"{STATE_TENSORS} holds {len(unused)} tensor(s) the state does not name")
    return state


# What a trainer state must hold at its top (name: type); nested values are checked by the load_state_dict
# methods that take them.
_STATE_KEYS = {
    "step": int, "optimizer": dict, "scheduler": dict, "controller": dict, "teacher": dict, "data": dict,
    "skipped": dict, "rng": dict,
}  # fmt: skip


def _check_state(state: Any) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"the state is a {type(state).__name__}, not a mapping")
    for key, kind in _STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"'{key}' is missing or not a {kind.__name__}")
    if state["step"] < 0:
        raise ValueError(f"'step' is {state['step']}")


def write_state(directory: str, state: Mapping) -> None:
    """``STATE_FILE`` and ``STATE_TENSORS`` of ``state`` in ``directory``."""
    _write_encoded(directory, *encode_state(state))


def _write_encoded(directory: str, tree: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    text = json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "state": tree}, allow_nan=False)
    save_file(tensors, os.path.join(directory, STATE_TENSORS), metadata={"format": "pt"})
    with open(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as fh:
        fh.write(text)


def read_state(directory: str, map_location: str | None = None) -> dict:
    """The trainer state stored in ``directory`` (JSON + safetensors; nothing is unpickled), its tensors on
    ``map_location`` (default the CPU). Any file that is not exactly this format is a BrokenCheckpoint."""
    from safetensors.torch import load_file

    try:
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as fh:
            doc = json.load(fh, parse_constant=_no_constant)
    except (OSError, ValueError, RecursionError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise BrokenCheckpoint(f"{STATE_FILE} is unreadable ({type(e).__name__}: {_first(e)})") from None
    if not (isinstance(doc, dict) and doc.get("format") == STATE_FORMAT and "state" in doc):
        raise BrokenCheckpoint(f"{STATE_FILE} is not an atesd trainer state (no format {STATE_FORMAT!r})")
    if doc.get("version") != STATE_VERSION:
        raise BrokenCheckpoint(
            f"{STATE_FILE} has format version {str(doc.get('version'))[:20]}; this atesd reads version "
            f"{STATE_VERSION} (a newer atesd wrote it?)"
        )
    try:
        tensors = load_file(os.path.join(directory, STATE_TENSORS), device=map_location or "cpu")
    except Exception as e:  # safetensors reports truncation and bad headers as various errors
        raise BrokenCheckpoint(f"{STATE_TENSORS} is unreadable ({type(e).__name__}: {_first(e)})") from None
    try:
        state = decode_state(doc["state"], tensors)
        _check_state(state)
    except (ValueError, RecursionError) as e:
        raise BrokenCheckpoint(f"{STATE_FILE} is not a valid trainer state: {_first(e)}") from None
    return state


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (non-finite floats are stored as $float)")


def _first(e: BaseException, limit: int = 120) -> str:
    """The first line of an error message, cut to ``limit`` characters (messages go on one line)."""
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ writing
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str, step: int, base_model: str | None, exclude: tuple[str, ...] = ()) -> None:
    """``manifest.json`` listing every file under ``directory`` but ``exclude`` (temp file + rename)."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel not in (MANIFEST_FILE, MANIFEST_FILE + ".tmp") and rel not in exclude:
                files[rel] = {"bytes": os.path.getsize(full), "sha256": _sha256(full)}
    manifest = {"format": 1, "step": step, "base_model": base_model, "files": files}
    with open(os.path.join(directory, MANIFEST_FILE + ".tmp"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(os.path.join(directory, MANIFEST_FILE + ".tmp"), os.path.join(directory, MANIFEST_FILE))


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
    final = os.path.join(run_dir, checkpoint_name(step))
    for path in (root, final):
        if os.path.islink(path):  # writing through it would write outside the run
            raise UsageError(f"{path} is a symbolic link: a run's checkpoints are plain directories inside it")
    encoded = encode_state(state)  # a state that is not data fails here, before anything is written
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _recorded_base(model, base_model):
        # the adapter never touches the embeddings (engine.models.LORA_TARGETS) nor resizes the vocabulary; saying
        # so skips peft's probe of the base model's config on the hub at every save
        whole = {} if adapter_state_dict is None else {"state_dict": adapter_state_dict}
        model.save_pretrained(tmp, save_embedding_layers=False, **whole)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _write_encoded(tmp, *encoded)
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


# ------------------------------------------------------------------------------------------------ reading
def _plain_files(path: str) -> None:
    """BrokenCheckpoint unless everything under ``path`` is a regular file or directory: a symbolic link could
    point anywhere (and a FIFO or device would block or read forever)."""
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                rel = os.path.relpath(full, path)
                raise BrokenCheckpoint(f"{rel} is a symbolic link (a checkpoint holds plain files only)")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BrokenCheckpoint(f"{os.path.relpath(full, path)} is not a regular file")


def _inside(rel: Any) -> bool:
    """True for a manifest entry naming a file inside the checkpoint: relative, normalised, no '..'."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel) or "\\" in rel:
        return False
    return os.path.normpath(rel) == rel and ".." not in rel.split("/")


def verify(path: str, *, hashes: bool = True, need_state: bool = True) -> None:
    """Raise BrokenCheckpoint (naming the file) unless every file the manifest lists is there with its size
    (and sha256), inside the checkpoint, and nothing in it is a symbolic link. A checkpoint written before
    manifests existed passes when its essential files exist (the adapter, and the trainer state unless
    ``need_state`` is False: evaluating an adapter needs no trainer state)."""
    _plain_files(path)
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(manifest_path):
        state = [] if not need_state else [LEGACY_STATE_FILE if _is_legacy(path) else STATE_FILE]
        for name in (ADAPTER_FILE, *state):
            if not os.path.isfile(os.path.join(path, name)):
                raise BrokenCheckpoint(f"{name} is missing")
        return
    try:
        with open(manifest_path) as fh:
            files = json.load(fh)["files"]
        entries = [(rel, int(want["bytes"]), str(want["sha256"])) for rel, want in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise BrokenCheckpoint(f"{MANIFEST_FILE} is unreadable ({type(e).__name__})") from None
    for rel, _, _ in entries:
        if not _inside(rel):
            raise BrokenCheckpoint(
                f"{MANIFEST_FILE} names {str(rel)[:80]!r}, which is not a file inside the checkpoint"
            )
    for rel, size_want, sha_want in entries:
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise BrokenCheckpoint(f"{rel} is missing")
        size = os.path.getsize(full)
        if size != size_want:
            raise BrokenCheckpoint(f"{rel} has {size} bytes, the manifest says {size_want} (truncated?)")
        if hashes and _sha256(full) != sha_want:
            raise BrokenCheckpoint(f"{rel} does not match its sha256 in the manifest (altered or corrupted)")


def _is_legacy(path: str) -> bool:
    """A checkpoint whose trainer state exists only as a pickle (written by an earlier version)."""
    return not os.path.exists(os.path.join(path, STATE_FILE)) and os.path.exists(os.path.join(path, LEGACY_STATE_FILE))


def _legacy_error(path: str) -> LegacyCheckpoint:
    return LegacyCheckpoint(
        f"checkpoint {path} holds {LEGACY_STATE_FILE}, a pickle written by an earlier atesd, which is not read "
        f"(unpickling can run code); convert it once to the data format with `{CONVERT_HINT} {path}` (docs/engine.md,"
        f" 'Checkpoint format')"
    )


def read(path: str, map_location: str | None = None) -> tuple[dict, dict]:
    """(adapter tensors, trainer state) of a verified checkpoint; nothing is applied to any model yet, nothing
    is unpickled. ``map_location``: the device the tensors load to (default the CPU; the optimizer, the teacher
    and the RNG move them where they belong). A pickled legacy state is a LegacyCheckpoint."""
    from safetensors.torch import load_file

    verify(path)
    if _is_legacy(path):
        raise _legacy_error(path)
    try:
        adapter = load_file(os.path.join(path, ADAPTER_FILE))
    except Exception as e:  # safetensors reports truncation as various errors
        raise BrokenCheckpoint(f"{ADAPTER_FILE} is unreadable ({type(e).__name__}: {_first(e, 80)})") from None
    return adapter, read_state(path, map_location)


def verify_adapter(path: str) -> None:
    """BrokenCheckpoint unless ``path`` is an adapter directory read as data only: the manifest (if any) holds,
    nothing in it is a symbolic link, and its weights are ``adapter_model.safetensors`` (peft's pickled
    ``adapter_model.bin`` is refused, so peft never falls back to unpickling it)."""
    if not os.path.isfile(os.path.join(path, ADAPTER_FILE)) and os.path.exists(os.path.join(path, ADAPTER_PICKLE)):
        raise BrokenCheckpoint(
            f"its weights are {ADAPTER_PICKLE}, a pickle, which is not read (unpickling can run code); save the "
            f"adapter as {ADAPTER_FILE} (peft's default: model.save_pretrained(dir, safe_serialization=True))"
        )
    verify(path, need_state=False)
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        raise BrokenCheckpoint(f"{ADAPTER_CONFIG} is missing")
    try:
        from safetensors import safe_open

        with safe_open(os.path.join(path, ADAPTER_FILE), framework="pt") as fh:
            list(fh.keys())  # parses and bounds-checks the header before peft reads the file
    except Exception as e:
        raise BrokenCheckpoint(f"{ADAPTER_FILE} is unreadable ({type(e).__name__}: {_first(e, 80)})") from None


def apply_adapter(model, adapter: dict) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, adapter)


def checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint directories, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step-")]


def check_run_dir(run_dir: str) -> None:
    """UsageError unless everything inside ``run_dir`` is a regular file, a directory, or a symbolic link that
    stays inside the run (wandb keeps such links under ``wandb/``). A link leading out of the run (``run.log``,
    ``metrics.jsonl``, ``checkpoints/`` pointing elsewhere) would make a resumed run read or write outside its
    directory. The run directory itself may be a link: where runs live is the user's choice."""
    top = os.path.realpath(run_dir)
    for root, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            full = os.path.join(root, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(full)
                if target == top or target.startswith(top + os.sep):
                    continue
                problem = "a symbolic link leading outside the run"
            elif stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                continue
            else:
                problem = "not a regular file"
            raise UsageError(
                f"run directory {run_dir}: {os.path.relpath(full, run_dir)} is {problem}; refused, since the run "
                "would read or write through it"
            )


def load_latest(
    run_dir: str, named: str | None = None, map_location: str | None = None
) -> tuple[str, dict, dict] | None:
    """(path, adapter, state) of the newest intact checkpoint of the run, or of the ``named`` one (which must be
    intact); None when the run has no checkpoint. Each damaged newer checkpoint is skipped with a warning; all of
    them damaged is a BrokenCheckpoint. A run holding a symbolic link is refused (:func:`check_run_dir`), and so
    is a legacy (pickled) trainer state (LegacyCheckpoint, naming the conversion)."""
    check_run_dir(run_dir)
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
            name = json.load(fh).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return name if isinstance(name, str) else None


def checkpoint_name(step: int) -> str:
    """Checkpoint directory of ``step``, relative to the run directory."""
    return os.path.join("checkpoints", f"step-{step:06d}")


# --------------------------------------------------------------------------------- legacy: trainer_state.pt
def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs (the legacy numpy RNG state holds one uint32 array): numpy's array
    reconstructor, ndarray, dtype and the uint32 dtype class; nothing that can call other code."""
    reconstruct = np.zeros(1, dtype=np.uint32).__reduce__()[0]
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_legacy_state(path: str, *, trust: bool = False) -> dict:
    """A legacy ``trainer_state.pt``, as plain data. Without ``trust``: ``torch.load(weights_only=True)``,
    PyTorch's restricted unpickler, which builds tensors, containers and numbers only, plus numpy's uint32 arrays
    (the RNG state); anything else is refused. ``trust=True`` unpickles anything: only for a file you trust."""
    file = os.path.join(path, LEGACY_STATE_FILE)
    try:
        if trust:
            state = torch.load(file, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt zip or a truncated pickle: damage; a global off the allow-list: refusal
        if trust or not isinstance(e, pickle.UnpicklingError) or "weights_only" not in str(e).lower():
            raise BrokenCheckpoint(f"{LEGACY_STATE_FILE} is unreadable ({type(e).__name__}: {_first(e, 80)})") from None
        raise UsageError(
            f"{file}: not converted: it holds more than tensors, containers and numbers ({type(e).__name__}), "
            "which only a full unpickling can read and which can run code; if you trust the file, convert with "
            f"`{CONVERT_HINT} --trust {path}`"
        ) from None
    try:
        _check_state(state)
    except ValueError as e:
        raise BrokenCheckpoint(f"{LEGACY_STATE_FILE} is not a trainer state: {e}") from None
    return _as_data(state)


def _as_data(v: Any) -> Any:
    """A legacy state with numpy arrays and deques as lists, mappings (Counter, OrderedDict) as dicts."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Mapping):
        return {k: _as_data(x) for k, x in v.items()}
    if isinstance(v, (list, deque)):
        return [_as_data(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_as_data(x) for x in v)
    return v


def convert(path: str, *, trust: bool = False) -> list[str]:
    """Rewrite the legacy checkpoints at ``path`` (one checkpoint, or a run directory: all of its checkpoints)
    in the data format; returns the converted paths (none when already converted). Each checkpoint is verified
    first; its new state files are written beside ``trainer_state.pt`` (each by rename), then its manifest
    (without the pickle), and only then is the pickle removed, so an interrupted conversion leaves a checkpoint
    that loads. Writes only inside the checkpoints."""
    if not os.path.isdir(path):
        raise UsageError(f"{path!r}: no such directory")
    names = (STATE_FILE, LEGACY_STATE_FILE)
    if any(os.path.exists(os.path.join(path, n)) for n in names):
        targets = [path]
    else:
        check_run_dir(path)  # a link out of the run would be written through
        targets = checkpoints(path)
        if not targets:
            raise UsageError(f"{path!r} is neither a checkpoint nor a run directory with checkpoints")
    done = []
    for ckpt in targets:
        if not _is_legacy(ckpt):
            continue
        try:
            verify(ckpt)
        except BrokenCheckpoint as e:
            raise BrokenCheckpoint(f"checkpoint {ckpt} is damaged: {e}") from None
        state = read_legacy_state(ckpt, trust=trust)
        try:
            encoded = encode_state(state)
        except TypeError as e:
            raise UsageError(f"checkpoint {ckpt}: its state cannot be stored as data: {e}") from None
        tmp = os.path.join(ckpt, ".tmp-convert")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _write_encoded(tmp, *encoded)
        for name in (STATE_TENSORS, STATE_FILE):  # the JSON last: until it exists, the checkpoint stays legacy
            os.replace(os.path.join(tmp, name), os.path.join(ckpt, name))
        os.rmdir(tmp)
        write_manifest(ckpt, int(state["step"]), base_model(ckpt), exclude=(LEGACY_STATE_FILE,))
        os.remove(os.path.join(ckpt, LEGACY_STATE_FILE))
        done.append(ckpt)
    return done


def build_parser() -> argparse.ArgumentParser:
    """``python -m engine.checkpoint``'s parser: the ``convert`` command."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.checkpoint",
        description="Convert checkpoints written by earlier atesd versions (trainer_state.pt, a pickle) to the data "
        "format (trainer_state.json + trainer_state.safetensors), in place.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a checkpoint, or every checkpoint of a run directory")
    conv.add_argument("paths", nargs="+", metavar="PATH", help="a checkpoint or a run directory")
    conv.add_argument(
        "--trust",
        action="store_true",
        help="read the pickle with full unpickling (it can run code): only for files you trust, when the default "
        "restricted reading refuses them",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.checkpoint convert [--trust] PATH...``: legacy checkpoints to the data format. Errors
    are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        for path in args.paths:
            converted = convert(path, trust=args.trust)
            print(
                f"{path}: converted {len(converted)} checkpoint(s) to the data format"
                if converted
                else f"{path}: nothing to convert (already in the data format)"
            )
    except UsageError as e:
        print(f"error: {'; '.join(ln.strip() for ln in str(e).splitlines() if ln.strip())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
