"""Several nodes through torchrun's c10d rendezvous, on one machine: two torchrun agents ("nodes", one process
each) launched apart meet at one rendezvous endpoint, as two hosts would (docs/distributed.md, "Several nodes"),
and train one run in a shared run directory, the same run as one process with the same global batch."""

import os
import socket
import subprocess
import sys

from engine_tiny import write_dataset
from test_distributed import REPO, WORKER, _args, _state, assert_same_run

from atesd.engine.invocation import parse
from atesd.engine.train import train

STEPS = ("--steps", "2")  # a checkpoint (step 2), evaluations before and after, the controller's pending decision


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(node: int, port: int, args: list[str], tmp) -> subprocess.Popen:
    """One node's agent: ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint ...``. Node 0
    hosts the rendezvous store (on real hosts torchrun infers that from the endpoint's hostname; here both share it).
    Each node has its own temporary directory; the run directory, data and model are shared paths."""
    own_tmp = tmp / f"node{node}"
    own_tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TMPDIR": str(own_tmp)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "atesd-multinode-test",
           "--rdzv-conf", f"is_host={int(node == 0)},join_timeout=120", "--max-restarts", "0",
           "--monitor-interval", "0.1", WORKER, *args]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_nodes_through_c10d_rendezvous_reproduce_one_process(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "train.jsonl", n=40)
    one = train(*parse(_args(tiny_model_dir, data, tmp_path / "one", *STEPS)))

    run = tmp_path / "run"
    args = _args(tiny_model_dir, data, run, *STEPS)  # --fsdp lora, the default: the adapter sharded across nodes
    port = _free_port()
    nodes = [_node(1, port, args, tmp_path), _node(0, port, args, tmp_path)]  # arrival order does not matter
    try:
        outs = [p.communicate(timeout=240) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-4000:]

    assert_same_run(one, str(run), step=2)
    state = _state(str(run), 2)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2  # one process on each node, one process group
    with open(run / "run.log") as fh:  # written once, by global rank 0, whichever node it landed on
        assert sum("finished 2 steps" in line for line in fh) == 1


def test_docs_show_the_multinode_command():
    """docs/distributed.md gives the rendezvous command the test above runs and says what the nodes must share."""
    with open(os.path.join(REPO, "docs", "distributed.md")) as fh:
        text = fh.read()
    for piece in ("--nnodes 2", "--rdzv-backend c10d", "--rdzv-endpoint", "--rdzv-id", "shared filesystem"):
        assert piece in text, piece
