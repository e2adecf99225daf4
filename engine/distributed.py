"""Data-parallel training on torch.distributed (DESIGN 4.2c): ``torchrun --nproc_per_node N -m engine.train``.

    process_group(device_type, timeout_s)   joins the group torchrun / accelerate launch describe in the environment
    rank(), world_size(), is_main()         where this process stands (0, 1, True without a group)
    device_of(spec)                         the device this process trains on (--device; each rank its own GPU)
    broadcast(x), all_gather(x), all_reduce_sum(values), barrier()   collectives on Python values
    check_same_config(cfg)                  every rank runs the same resolved configuration, or all stop
    DataParallel(model, mode, device)       the one model over the ranks: FSDP2 ``fully_shard`` (mode 'lora': the
                                            adapter sharded, the frozen base replicated; 'full': the base sharded
                                            too) or plain replication with summed gradients ('off')

With one process (no torchrun, or ``--nproc_per_node 1``) nothing is initialised and every helper is the identity,
so the single-process engine runs exactly as it does without this module.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("engine")

FSDP_MODES = ("lora", "full", "off")


# ------------------------------------------------------------------------------------------- process group
def launched_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """RANK as the launcher set it (0 when started as a plain process); valid before and after the group."""
    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


def record_error(e: BaseException) -> None:
    """Under torchrun, write ``e`` to the rank's error file, so the launcher's failure summary shows its message
    (call from inside the ``except`` block). Nothing happens outside torchrun."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(e)


@contextlib.contextmanager
def process_group(device_type: str, timeout_s: float = 1800.0) -> Iterator[bool]:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) for the duration: NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU. A collective that
    waits longer than ``timeout_s`` (a rank died or hangs) raises instead of blocking forever. Yields True if this
    call created the group; a group that already exists, or a world of one, is left as it is."""
    if launched_world_size() <= 1 or dist.is_initialized():
        yield False
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
    )
    try:
        yield True
        dist.barrier()  # on success: no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def is_collective_failure(e: BaseException) -> bool:
    """True for the errors a collective raises when a peer is gone or silent (gloo/NCCL, reset or timed out)."""
    text = str(e)
    return isinstance(e, dist.DistError) or "gloo" in text or "NCCL" in text or "Connection reset" in text


def first_line(e: BaseException) -> str:
    """The first line of a backend error, without its source-file prefix ("[/path/pair.cc:537] Read error ...")."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device_of(spec: str) -> torch.device:
    """The device of ``--device spec`` (auto: CUDA when available, else the CPU) for this process: under torchrun
    each rank trains on ``cuda:LOCAL_RANK``, so a CUDA spec names no index there."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else torch.device(spec)
    if world_size() > 1 and device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {spec}: under torchrun pass --device cuda (rank r uses cuda:LOCAL_RANK)")
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _comm_device() -> torch.device:
    """Where collective buffers live: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it (picklable), on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Key-wise sum over the ranks, in float64 (one collective). Every rank must pass the same keys."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(buf)
    return dict(zip(keys, buf.tolist()))


def shard(n: int) -> range:
    """This rank's contiguous share of ``n`` items (``n`` must divide evenly; checked at start-up)."""
    per = n // world_size()
    return range(rank() * per, (rank() + 1) * per)


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(cfg: dict) -> None:
    """Raise ValueError on every rank, naming the fields, when the ranks' resolved configurations differ (a rank
    launched with other flags or another YAML would otherwise train a different model and hang or diverge)."""
    if world_size() == 1:
        return
    configs = all_gather(cfg)
    hashes = [config_hash(c) for c in configs]
    if len(set(hashes)) == 1:
        return
    odd = next(r for r, h in enumerate(hashes) if h != hashes[0])
    fields = sorted(k for k in set(configs[0]) | set(configs[odd]) if configs[0].get(k) != configs[odd].get(k))
    diff = ", ".join(f"{k}: {configs[0].get(k)!r} vs {configs[odd].get(k)!r}" for k in fields)
    raise ValueError(
        f"ranks disagree on the configuration (hash {hashes[0]} on rank 0, {hashes[odd]} on rank {odd}: {diff})"
    )


# ------------------------------------------------------------------------------------------------ tensors
def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into a plain tensor on every rank (a collective); any other tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The piece of the whole tensor ``full`` that this rank holds for ``ref`` (a DTensor; no communication: every
    rank has ``full``), or ``full`` on ``ref``'s device when ``ref`` is a plain tensor."""
    full = full.to(ref.device)
    if not is_dtensor(ref):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)


def to_full(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples) with every DTensor gathered whole and every tensor on the CPU, as one
    process would have saved it. A collective when ``obj`` holds DTensors: every rank calls it in the same order."""
    if isinstance(obj, torch.Tensor):
        return full_tensor(obj).detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same mapping type (OrderedDict, defaultdict, ...)
        for k, v in obj.items():
            out[k] = to_full(v)
        return out
    if isinstance(obj, list):
        return [to_full(v) for v in obj]
    if isinstance(obj, tuple):
        items = [to_full(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


# ------------------------------------------------------------------------------------------------- model
class DataParallel:
    """The trainer's one peft model over the ranks of the process group (a no-op with one process).

    mode 'lora'  FSDP2 over the LoRA adapter (parameters, gradients, AdamW states sharded, gradients
                 reduce-scattered); the frozen base replicated on every rank (``ignored_params``).
    mode 'full'  the frozen base sharded too: each decoder layer its own FSDP unit, the decoder body (embeddings,
                 final norm) the root, an untied LM head a unit of its own (gathered once per step for the loss);
                 a head tied to the input embeddings stays replicated.
    mode 'off'   no FSDP: every rank holds everything, adapter gradients are all-reduced after backward.

    FSDP forwards all-gather parameters, so ranks must run the same number of them; rollouts, evaluation and the
    probe run different numbers per rank, so they run inside :meth:`gathered`, where nothing is communicated.
    """

    def __init__(self, model, mode: str = "lora", device: torch.device | None = None) -> None:
        if mode not in FSDP_MODES:
            raise ValueError(f"--fsdp must be one of {', '.join(FSDP_MODES)}, got {mode!r}")
        self.model, self.mode = model, mode
        self.world = world_size()
        self.units: list[tuple[Any, bool]] = []  # (FSDP module, its reshard_after_forward)
        self.root = None  # the FSDP root: the decoder body
        self.head_sharded = False
        if self.world == 1:
            return
        self._sync_adapter_from_rank0()
        if mode != "off":
            self._fully_shard(device or torch.device("cpu"))

    # the loss of each rank is scaled so that the reduced gradient is the sum over ranks (FSDP averages)
    @property
    def grad_scale(self) -> float:
        return float(self.world) if self.units else 1.0

    def _sync_adapter_from_rank0(self) -> None:
        """Every rank starts from rank 0's adapter (seeded identically anyway; this makes it certain)."""
        from atesd.engine.models import adapter_params

        with torch.no_grad():
            for p in adapter_params(self.model).values():
                dist.broadcast(p.data, src=0)

    def _fully_shard(self, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from atesd.engine.models import causal_lm, decoder

        mesh = init_device_mesh(device.type, (self.world,))
        body, lm = decoder(self.model), causal_lm(self.model)
        head = lm.get_output_embeddings()
        layers = getattr(body, "layers", None)
        if layers is None:
            raise ValueError(f"--fsdp {self.mode}: the decoder {type(body).__name__} has no .layers to shard")
        tied = head.weight is body.get_input_embeddings().weight
        if self.mode == "lora":
            ignored = {p for p in self.model.parameters() if not p.requires_grad}
        else:
            ignored = {head.weight} if tied else set()
            if tied:
                log.info("--fsdp full: the LM head is tied to the input embeddings and stays replicated")
        for layer in layers:
            self.units.append((fully_shard(layer, mesh=mesh, reshard_after_forward=True, ignored_params=ignored), True))
        # the engine calls the decoder body directly for scoring, so it is the root (its hooks must run)
        self.root = fully_shard(body, mesh=mesh, reshard_after_forward=False, ignored_params=ignored)
        self.units.append((self.root, False))
        if self.mode == "full" and not tied:
            self.units.append((fully_shard(head, mesh=mesh, reshard_after_forward=True), True))
            self.head_sharded = True

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Whole parameters on every rank for the duration (one all-gather per FSDP unit on entry, a local free on
        exit): forwards inside run no collectives, so ranks may run different numbers of them."""
        if not self.units:
            yield
            return
        for unit, _ in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit, reshard in self.units:
                unit.reshard()
                unit.set_reshard_after_forward(reshard, recurse=False)

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head as a plain tensor (gathered from its shards under --fsdp full; the fused op takes no DTensor)."""
        from atesd.engine.models import lm_head_weight

        return full_tensor(lm_head_weight(self.model)).detach()

    def sync_gradients(self, sync: bool) -> None:
        """Reduce gradients in the coming backward (the step's last micro-batch) or only accumulate them locally."""
        if self.root is not None:
            self.root.set_requires_gradient_sync(sync)  # recurses into the layers

    def reduce_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """--fsdp off: sum every adapter gradient over the ranks (FSDP reduced them already in backward)."""
        if self.world == 1 or self.units:
            return
        works = [dist.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]
        for w in works:
            w.wait()

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Load whole (checkpoint) tensors into sharded parameters: each rank copies its own piece."""
        if not self.units:
            yield
            return
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():
            yield

    def shard_optimizer_state(self, state: dict, params: Sequence[torch.Tensor]) -> dict:
        """A whole optimizer state dict (as one process saves it: param i of ``params`` is entry i) cut to this
        rank's shards of ``params``."""
        if not self.units:
            return state
        out = {**state, "state": {}}
        for i, per_param in state["state"].items():
            ref = params[int(i)]
            out["state"][i] = {
                k: shard_like(v, ref) if isinstance(v, torch.Tensor) and v.shape == ref.shape else v
                for k, v in per_param.items()
            }
        return out
