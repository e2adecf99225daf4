"""Cost of taking the LM head as FSDP2 gives it: the all-gather (``full_tensor``) of a Shard(0) DTensor head
against the fused op's own forward + backward, 2 processes, torch.distributed gloo on CPU.

    python -m pytest benchmarks/bench_dtensor.py --benchmark -q -s -p no:cacheprovider

Each rank holds N tokens and half of a [V, H] fp32 head; per shape it times (median of 3, after one warm-up)
the gather alone, and one fused forward + backward (head frozen, as in LoRA) from the already gathered weight.
Prints a markdown table (rank 0's times).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = [(512, 256, 32768), (512, 1024, 32768), (2048, 256, 151936)]


def _time(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from atesd.kernels import backend_for, fused_linear_kl

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows = [f"| N | H | V | head MiB | gather s | op fwd+bwd s ({backend_for('cpu')}) | gather / op |",
            "|---|---|---|---|---|---|---|"]
    for n, h, v in SHAPES:
        torch.manual_seed(0)
        w = distribute_tensor(torch.randn(v, h) / h**0.5, mesh, [Shard(0)])
        hs = torch.randn(n, h, requires_grad=True)
        ht = torch.randn(n, h)
        gather = _time(lambda w=w: w.full_tensor())
        full = w.full_tensor()

        def op(full=full, hs=hs, ht=ht):
            fused_linear_kl(hs, ht, full, temperature=1.1, clip=0.05).backward()

        op_s = _time(op)
        rows.append(f"| {n} | {h} | {v} | {v * h * 4 / 2**20:.0f} | {gather:.3f} | {op_s:.2f} | "
                    f"{gather / op_s:.1%} |")
    if rank == 0:
        with open(out_file, "w") as fh:
            fh.write("\n".join(rows) + "\n")
    dist.destroy_process_group()


def test_dtensor_gather_cost(tmp_path):
    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    out = tmp_path / "table.md"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    print("\n" + out.read_text())
