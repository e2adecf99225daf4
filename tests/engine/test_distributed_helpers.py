"""engine/distributed.py's helpers: the identity with one process; with 2 gloo processes (torch.multiprocessing),
the collectives on Python values, the configuration check, the evaluation harness sharded over the ranks (the same
completions and grades as one process), and a stalled rank that makes the other fail within --dist-timeout instead
of waiting forever."""

import datetime
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from engine_tiny import build_model, build_tokenizer

from atesd.engine import distributed
from atesd.engine.evaluation import evaluate_problems

PROBLEMS = [{"problem": f"({a}+{a + 1})*2?", "answer": str(4 * a + 2), "level": 1 + a % 2} for a in range(7)]


def _grade(completion: str, gold: str) -> bool:
    """Any deterministic verdict does (the test compares the gathered verdicts with one process's); this one
    mixes True and False whatever a random model generates."""
    return (int(gold) // 2 + sum(map(ord, completion))) % 2 == 0


def _evaluate() -> dict:
    tok = build_tokenizer()
    res = evaluate_problems(build_model(len(tok)), tok, PROBLEMS, _grade, temperature=0.0, max_new_tokens=6)
    res.pop("generate_seconds")
    return res


def test_one_process_is_the_identity():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    values = {"loss": 1.5, "n": 3}
    assert distributed.all_reduce_sum(values) is values
    assert distributed.broadcast("x") == "x" and distributed.all_gather(7) == [7]
    assert distributed.shard(8) == range(8)
    distributed.check_same_config({"lr": 1.0})
    state = {"a": torch.ones(2), "b": [torch.zeros(1), (1, 2)], "c": "s"}
    full = distributed.to_full(state)
    assert torch.equal(full["a"], state["a"]) and full["b"][1] == (1, 2) and full["c"] == "s"
    with distributed.process_group("cpu") as created:  # no launcher environment: nothing to join
        assert created is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    with distributed.process_group("cpu", timeout_s=120) as created:
        assert created and distributed.world_size() == 2 and distributed.rank() == rank
        assert distributed.shard(8) == range(4 * rank, 4 * rank + 4)
        assert distributed.broadcast(f"from {rank}") == "from 0"
        assert distributed.all_gather(rank * 10) == [0, 10]
        assert distributed.all_reduce_sum({"b": 0.25, "a": float(rank)}) == {"a": 1.0, "b": 0.5}
        distributed.check_same_config({"lr": 1e-3, "steps": 3})
        with pytest.raises(ValueError, match=r"ranks disagree on the configuration .* lr: 0\.001 vs 0\.5"):
            distributed.check_same_config({"lr": 1e-3 if rank == 0 else 0.5, "steps": 3})
        with open(os.path.join(out, f"eval-{rank}.json"), "w") as fh:  # rank r generated problems r, r+2, ...
            json.dump(_evaluate(), fh)
        # a group with a 3 s timeout (the main one has a generous one: a loaded machine skews the ranks by seconds)
        quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=3))
        distributed.barrier()
        if rank == 1:  # stalls: never joins the next collective
            time.sleep(8)
            return
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError) as err:
            torch.distributed.all_reduce(torch.ones(1), group=quick)
        assert distributed.is_collective_failure(err.value), err.value
        assert time.perf_counter() - t0 < 7  # the 3 s timeout, not rank 1's 8 s stall (nor forever)


def test_two_processes_collectives_eval_sharding_and_timeout(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    alone = json.loads(json.dumps(_evaluate()))  # one process, every problem
    for rank in (0, 1):
        with open(tmp_path / f"eval-{rank}.json") as fh:
            assert json.load(fh) == alone
    assert len({r["completions"][0] for r in alone["results"]}) > 1 and 0 < alone["accuracy"] < 1
