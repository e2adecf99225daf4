"""Distributed benchmarks; the figures go to docs/distributed.md and benchmarks/RESULTS.md.

- ``test_head_gather``: the once-per-step LM-head gather of ``--fsdp full`` (``DTensor.full_tensor()`` of a
  Shard(0) [V, H] bf16 head) at the Qwen3 head sizes, 2 CPU processes over gloo.
- ``test_fsdp_rollout``: rollout tokens/s under ``--fsdp lora|full`` on 2 gloo ranks, the static decoder over the
  gathered weights against the HF loop (:func:`fsdp_rollout`; issue 25). ``BENCH_FSDP_SHAPES`` (tiny,h512),
  ``BENCH_FSDP_MODES`` (lora,full; ``off`` adds the replicated mode), ``BENCH_FSDP_IMPLS`` (hf,static; compiled
  adds ~40 s of inductor compile per mode and shape).
- :func:`one_gpu_fsdp` (``--one-gpu``): ``--fsdp full`` on one GPU (a 1-rank NCCL group): speed and device memory
  of each engine at Qwen3-1.7B's shape, against the one-process compiled step with CUDA graphs.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m pytest benchmarks/bench_distributed.py --benchmark -q -s
    OMP_NUM_THREADS=1 PYTHONPATH=. python -m benchmarks.bench_distributed --shapes tiny,h512 --impls hf,static
    PYTHONPATH=. python3 -m benchmarks.bench_distributed --one-gpu --rounds 2 --out one_gpu.json

On GPUs NCCL moves the same bytes over NVLink at hundreds of GB/s, so the CPU/gloo gather times are an upper bound
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


# ------------------------------------------------------------------------------------------ rollouts under FSDP
def _rollout_worker(rank: int, port: int, mode: str, shape: str, impls: tuple, rounds: int, out: str) -> None:
    """One rank: the shape's model under ``DataParallel(mode)``, this rank's half of the prompts, every
    implementation decoding inside ``gathered()`` as the trainer does; rounds interleaved across implementations."""
    import torch.distributed as dist

    from atesd.engine import distributed
    from atesd.engine.rollout import build_rollout
    from atesd.engine.sampling import problem_seeds
    from benchmarks.bench_rollout import SAMPLING, SHAPES, build

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    with distributed.process_group("cpu", timeout_s=600):
        model, prompts, eos, pad = build(shape, "cpu", torch.float32)  # the same seeds: the same model on each rank
        parallel = distributed.DataParallel(model, mode)
        engines = {impl: build_rollout(impl, model) for impl in impls}
        mine = distributed.shard(len(prompts))
        local = [prompts[j] for j in mine]
        _, _, _, G, _, new = SHAPES[shape]
        kw = dict(num_samples=G, max_new_tokens=new, eos_ids=eos, pad_id=pad, **SAMPLING)

        def timed(engine, step: int) -> tuple[float, list]:
            dist.barrier()
            with parallel.gathered():  # the gather itself is outside the timing: the trainer pays it for any loop
                t0 = time.perf_counter()
                rollouts = engine.sample(local, seeds=problem_seeds(0, step, mine), **kw)
                seconds = time.perf_counter() - t0
            return seconds, rollouts

        first = {impl: timed(e, 0) for impl, e in engines.items()}  # warm-up (compiled: the compile)
        runs: dict[str, list[float]] = {impl: [] for impl in impls}
        for r in range(rounds):
            for impl, e in engines.items():
                runs[impl].append(timed(e, r + 1)[0])
        mine_result = {
            impl: dict(
                seconds=runs[impl], tokens=sum(len(x) for g in first[impl][1] for x in g), first_s=first[impl][0],
                same_as_hf=first[impl][1] == first["hf"][1] if "hf" in first else None,
                name=getattr(engines[impl], "name", impl), held=getattr(engines[impl], "decoder", None) is not None,
            )
            for impl in impls
        }  # fmt: skip
        every = distributed.all_gather(mine_result)
        if rank == 0:
            with open(out, "w") as fh:
                json.dump(every, fh)


def fsdp_rollout(shape: str = "h512", modes=("lora", "full"), impls=("hf", "static"), rounds: int = 3) -> dict:
    """Rollout throughput under ``--fsdp`` on 2 gloo ranks (one thread each), per mode and implementation:
    ``{mode: {impl: {tokens_per_s, seconds, first_s, same_as_hf, name, held}}}``.

    Equal work: the shape's prompts (``benchmarks/bench_rollout.py: SHAPES``), half on each rank, no EOS (every row
    generates exactly ``new`` tokens), sampling as in training with the step's problem seeds. A round's time is the
    slower rank's (the next collective waits for it); tokens/s = both ranks' tokens / that time, median over the
    rounds. ``same_as_hf``: the first call's rollouts equal the HF loop's on every rank; ``held``: the engine kept
    a decoder after the rollout (a transient one must not)."""
    import tempfile

    result = {}
    for mode in modes:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_rollout_worker, args=(port, mode, shape, tuple(impls), rounds, out), nprocs=2,
                               join=True, start_method="spawn")  # fmt: skip
            with open(out) as fh:
                ranks = json.load(fh)
        result[mode] = {}
        for impl in impls:
            per_round = [max(r[impl]["seconds"][i] for r in ranks) for i in range(rounds)]
            seconds = statistics.median(per_round)
            tokens = sum(r[impl]["tokens"] for r in ranks)
            result[mode][impl] = dict(
                tokens_per_s=tokens / seconds, seconds=seconds, tokens=tokens,
                first_s=max(r[impl]["first_s"] for r in ranks), name=ranks[0][impl]["name"],
                same_as_hf=all(r[impl]["same_as_hf"] for r in ranks) if ranks[0][impl]["same_as_hf"] is not None
                else None,
                held=any(r[impl]["held"] for r in ranks),
            )  # fmt: skip
    return result


def fsdp_rollout_table(shape: str, result: dict) -> str:
    lines = [
        f"| {shape} | --fsdp | implementation | tokens/s (2 ranks) | vs hf | median s | first call s "
        "| same tokens as hf |",
        "|---" * 8 + "|",
    ]
    for mode, per_impl in result.items():
        base = per_impl["hf"]["tokens_per_s"] if "hf" in per_impl else None
        for r in per_impl.values():
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
            same = {True: "yes", False: "no", None: "-"}[r["same_as_hf"]]
            lines.append(
                f"| {shape} | {mode} | {r['name']} | {r['tokens_per_s']:.0f} | {ratio} | {r['seconds']:.3f} "
                f"| {r['first_s']:.1f} | {same} |"
            )
    return "\n".join(lines)


def _rollout_shapes() -> list[str]:
    return os.environ.get("BENCH_FSDP_SHAPES", "tiny,h512").split(",")


@pytest.mark.parametrize("shape", _rollout_shapes())
def test_fsdp_rollout(benchmark, shape):
    impls = tuple(os.environ.get("BENCH_FSDP_IMPLS", "hf,static").split(","))
    modes = tuple(os.environ.get("BENCH_FSDP_MODES", "lora,full").split(","))
    result = benchmark.pedantic(lambda: fsdp_rollout(shape, modes, impls), rounds=1, iterations=1)
    print(f"\n[fsdp rollout] {shape}, 2 gloo ranks, fp32, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load {os.getloadavg()[0]:.1f}\n{fsdp_rollout_table(shape, result)}")  # fmt: skip
    for mode, per_impl in result.items():
        for impl, r in per_impl.items():
            benchmark.extra_info[f"{mode}_{impl}_tokens_per_s"] = r["tokens_per_s"]
            assert r["same_as_hf"] is not False, (mode, impl)  # fp32: the HF loop's tokens
            assert impl == "hf" or mode == "off" or not r["held"], (mode, impl)  # FSDP: nothing kept between rollouts


# --------------------------------------------------------------------------------- one GPU, FSDP2 on one rank
ONE_GPU_SHAPE = dict(prompts=16, prompt_tokens=128, new_tokens=128)  # Qwen3-1.7B's shape, a short rollout


def _qwen3(spec: dict, device: str, dtype: torch.dtype, lora_r: int):
    """A random Qwen3 (initialised on ``device``) with LoRA r on every projection, B random (the adapter acts)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from atesd.engine.models import add_lora

    torch.manual_seed(0)
    cfg = Qwen3Config(max_position_embeddings=4096, attn_implementation="sdpa", **spec)
    with torch.device(device):
        base = Qwen3ForCausalLM(cfg).to(dtype)
    model = add_lora(base, lora_r, 2 * lora_r).eval()
    g = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, device=device).to(p) * 0.01)
    return model


def one_gpu_fsdp(spec: dict | None = None, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 impls=("hf", "static", "compiled"), rounds: int = 2, backend: str | None = None,
                 reference: bool = True, **shape) -> dict:
    """``--fsdp full`` on one device (a 1-rank NCCL group, gloo on the CPU; FSDP2 gathers and frees every unit as
    on N ranks): the rollout engines inside ``gathered()``, then the same model unsharded in one process with the
    compiled step (CUDA graphs on CUDA) for reference. Per engine: tokens/s (median of ``rounds`` after a warm-up
    call), the first call's seconds, and the device memory (CUDA; MiB): ``extra_peak`` above the gathered model
    during the rollout, ``left_in_gathered`` (allocated after the rollout minus before it, inside ``gathered()``)
    and ``left_after_exit`` (allocated after ``gathered()`` minus before it). Fixed lengths (no EOS), sampling
    as in training; ``same_as_hf``: the first call's rollouts equal the HF loop's (bf16 may differ by rounding)."""
    import torch.distributed as dist

    from atesd.engine import distributed
    from atesd.engine.decode import StaticRollout
    from atesd.engine.rollout import build_rollout
    from atesd.engine.sampling import problem_seeds
    from benchmarks.bench_rollout import SAMPLING
    from benchmarks.shapes import QWEN3_1P7B

    spec = spec or QWEN3_1P7B
    shape = {**ONE_GPU_SHAPE, **shape}
    cuda = device.startswith("cuda")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"), world_size=1, rank=0)
    mib = 2**20

    def allocated() -> float:
        return torch.cuda.memory_allocated() / mib if cuda else 0.0

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, spec["vocab_size"], (shape["prompt_tokens"],), generator=g).tolist()
               for _ in range(shape["prompts"])]  # fmt: skip
    kw = dict(num_samples=1, max_new_tokens=shape["new_tokens"], eos_ids=set(), pad_id=0, **SAMPLING)
    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                    "backend": dist.get_backend(), "dtype": str(dtype), "shape": shape}
    try:
        model = _qwen3(spec, device, dtype, 64)
        parallel = distributed.DataParallel(model, "full", torch.device(device))
        parallel.world = 1  # one rank: DataParallel shards nothing by itself; shard anyway, a 1-rank mesh
        parallel._fully_shard(torch.device(device))
        unmerged = {"static-unmerged": dict(merge=False), "compiled-unmerged": dict(merge=False, compile=True)}
        engines = {
            impl: StaticRollout(model, **unmerged[impl]) if impl in unmerged else build_rollout(impl, model)
            for impl in impls
        }
        first: dict = {}
        for impl, engine in engines.items():
            times, mem = [], {}
            for r in range(rounds + 1):
                before = allocated()
                with parallel.gathered():
                    gathered_at = allocated()
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    sync()
                    t0 = time.perf_counter()
                    out = engine.sample(prompts, seeds=problem_seeds(0, r, range(len(prompts))), **kw)
                    sync()
                    times.append(time.perf_counter() - t0)
                    peak = torch.cuda.max_memory_allocated() / mib if cuda else 0.0
                    mem = dict(gathered=gathered_at - before, extra_peak=peak - gathered_at,
                               left_in_gathered=allocated() - gathered_at)  # fmt: skip
                mem["left_after_exit"] = allocated() - before
                if r == 0:
                    first[impl] = out
            tokens = sum(len(x) for grp in first[impl] for x in grp)
            result[f"fsdp-full/{impl}"] = dict(
                name=getattr(engine, "name", impl), first_s=times[0],
                tokens_per_s=tokens / statistics.median(times[1:]),
                same_as_hf=first[impl] == first["hf"] if "hf" in first else None,
                held=getattr(engine, "decoder", None) is not None, **{k: round(v, 1) for k, v in mem.items()},
            )  # fmt: skip
            print(impl, result[f"fsdp-full/{impl}"], flush=True)
        del engines, parallel, model
        if not reference:
            return result
        # the reference: one process, no FSDP, the compiled step with CUDA graphs (persistent decoder)
        model = _qwen3(spec, device, dtype, 64)
        engine = StaticRollout(model, compile=True)
        times = []
        for r in range(rounds + 1):
            sync()
            t0 = time.perf_counter()
            out = engine.sample(prompts, seeds=problem_seeds(0, r, range(len(prompts))), **kw)
            sync()
            times.append(time.perf_counter() - t0)
            if r == 0:
                same = out == first["hf"] if "hf" in first else None
        tokens = sum(len(x) for grp in out for x in grp)
        result["one-process/compiled"] = dict(name=engine.name, first_s=times[0], same_as_hf=same,
                                              tokens_per_s=tokens / statistics.median(times[1:]), held=True)
        print("one-process compiled", result["one-process/compiled"], flush=True)
    finally:
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.bench_distributed [--shapes tiny,h512] [--impls hf,static,compiled]``: the FSDP
    rollout tables (:func:`fsdp_rollout`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=main.__doc__)
    parser.add_argument("--shapes", default="tiny,h512")
    parser.add_argument("--impls", default=None, help="comma-separated, from hf, static, compiled (default: hf,static; "
                        "--one-gpu: hf,static,compiled, and static-unmerged, compiled-unmerged there)")
    parser.add_argument("--no-reference", action="store_true", help="--one-gpu: skip the one-process compiled run")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one-gpu", action="store_true", help="run one_gpu_fsdp (Qwen3-1.7B shape) instead")
    parser.add_argument("--out", default=None, help="with --one-gpu: write the result (JSON) here")
    args = parser.parse_args(argv)
    if args.one_gpu:
        impls = tuple((args.impls or "hf,static,compiled").split(","))
        result = one_gpu_fsdp(impls=impls, rounds=args.rounds, reference=not args.no_reference)
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
        return
    print(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}, load {os.getloadavg()[0]:.1f}")
    for shape in args.shapes.split(","):
        result = fsdp_rollout(shape, tuple(args.modes.split(",")), tuple((args.impls or "hf,static").split(",")),
                              args.rounds)
        print(f"{fsdp_rollout_table(shape, result)}\nload {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
