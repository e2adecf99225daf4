"""The fused op takes the LM head as FSDP2 gives it: a sharded DTensor parameter (torch.distributed gloo on CPU).

Two processes, ``fully_shard`` over a small model whose lm_head is sharded; each rank computes the loss on its own
tokens from the head's DTensor weight (gathered once per call with ``full_tensor``). Checked on rank 0 against one
process with the unsharded model: the value on each rank, and the gradients of the head and of the body, which
FSDP2 averages over the ranks.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available():
    pytest.skip("torch built without torch.distributed", allow_module_level=True)

H, V, N = 16, 70, 11


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the hidden states; the loss takes lm_head.weight
        return self.body(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyLM()


def _data(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N + rank, H, generator=gen)  # ranks hold different token counts
    ht = torch.randn(N + rank, H, generator=gen)
    return x, ht


def _worker(rank: int, world: int, init_file: str, out_file: str, backends: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in backends:
            _check(rank, world, name)
        if rank == 0:
            with open(out_file, "w") as fh:
                fh.write(" ".join(backends))
        dist.barrier()  # no rank tears the group down while another still uses it (as engine/distributed.py)
    finally:
        dist.destroy_process_group()


def _check(rank: int, world: int, backend_name: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from atesd.kernels import _ops, fused_linear_kl, native_cpu_available
    from atesd.kernels.reference import linear_kl

    assert backend_name != "native" or native_cpu_available()  # loads the library in this fresh process
    _ops.backend_for = lambda device: backend_name
    model = _model()
    fully_shard(model.lm_head)
    fully_shard(model)
    assert type(model.lm_head.weight).__name__ == "DTensor"
    x, ht = _data(rank)
    loss = fused_linear_kl(model(x), ht, model.lm_head.weight, temperature=1.1, clip=0.05)
    loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    frozen = model.lm_head.weight.requires_grad_(False)  # a frozen (LoRA) head: no gradient, same value
    again = fused_linear_kl(model(x), ht, frozen, temperature=1.1, clip=0.05)
    if rank == 0:
        ref = _model()
        ref_losses = []
        for r in range(world):
            xr, htr = _data(r)
            ref_losses.append(linear_kl(ref(xr), htr, ref.lm_head.weight, temperature=1.1, clip=0.05))
        (sum(ref_losses) / world).backward()  # FSDP2 averages gradients over the ranks
        for r in range(world):
            torch.testing.assert_close(losses[r], ref_losses[r].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again.detach(), ref_losses[0].detach(), rtol=1e-5, atol=1e-6)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, k=name: f"{backend_name} {k}: {m}")


def test_fsdp2_sharded_lm_head(tmp_path):
    from atesd import kernels

    backends = ["torch"] + (["native"] if kernels.native_cpu_available() else [])
    out = tmp_path / "ok"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + ("" if not old else os.pathsep + old)  # the spawned children import atesd
    try:
        mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out), backends), nprocs=2,
                           join=True, start_method="spawn")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    assert out.read_text() == " ".join(backends)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
