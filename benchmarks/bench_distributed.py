"""The once-per-step LM-head gather of ``--fsdp full`` (``DTensor.full_tensor()`` of a Shard(0) [V, H] bf16 head),
on 2 CPU processes over gloo, at the Qwen3 head sizes; the figures go to docs/distributed.md.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m pytest benchmarks/bench_distributed.py --benchmark -q -s

On GPUs NCCL moves the same bytes over NVLink at hundreds of GB/s, so these CPU/gloo times are an upper bound
of a different machine class, not a GPU prediction.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time

import pytest
import torch
import torch.multiprocessing as mp

HEADS = {"qwen3-1.7b": (151936, 2048), "qwen3-4b": (151936, 2560), "qwen3-8b": (151936, 4096)}


def _gather(rank: int, port: int, v: int, h: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    head = distribute_tensor(torch.zeros(v, h, dtype=torch.bfloat16), mesh, [Shard(0)], src_data_rank=None)
    times = []
    for _ in range(4):
        dist.barrier()
        t0 = time.perf_counter()
        full = head.full_tensor()
        times.append(time.perf_counter() - t0)
        del full
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(times[1:], fh)  # the first includes buffer set-up
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("model", list(HEADS))
def test_head_gather(benchmark, tmp_path, model):
    v, h = HEADS[model]
    out = str(tmp_path / "times.json")

    def run():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_gather, args=(port, v, h, out), nprocs=2, join=True, start_method="spawn")
        with open(out) as fh:
            return json.load(fh)

    times = benchmark.pedantic(run, rounds=1, iterations=1)
    median = statistics.median(times)
    gib = v * h * 2 / 2**30
    benchmark.extra_info.update(model=model, head_gib=round(gib, 3), gather_s=round(median, 3))
    print(f"\n{model}: [{v}, {h}] bf16 head ({gib:.2f} GiB) gathered from 2 gloo ranks in {median:.3f} s (median of 3)")
