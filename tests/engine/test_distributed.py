"""Data-parallel training under torchrun on CPU (gloo, 2 processes, FSDP2): the same global batch on 2 processes
makes the same run as on 1 (loss, alpha, controller state, adapter weights), a rank SIGKILLed mid-run fails the
run with a clear message, and ``--resume`` then reproduces the uninterrupted run; ranks launched with different
configurations stop at start-up.

Every torchrun launch costs a few seconds of imports on each of its 2 processes, so the runs are shared through
module fixtures and kept to 3 steps of a tiny random Qwen3.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from engine_tiny import write_dataset
from safetensors.torch import load_file

from atesd.engine import checkpoint
from atesd.engine.invocation import parse
from atesd.engine.train import train

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "dist_worker.py")
EXACT = ("step", "alpha", "rollout_tokens", "revealed_frac", "skipped_step")
CLOSE = ("loss", "kl", "clipped_kl", "top1_agree", "confidence", "entropy", "credit", "grad_norm", "probe_nll",
         "probe_accuracy")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl", n=40)


def _args(model_dir, data, out, *extra):
    return [
        "--model", model_dir, "--data", data, "--output-dir", str(out), "--exposure", "adaptive",
        "--steps", "3", "--batch-size", "4", "--micro-batch", "2", "--num-samples", "2", "--max-new-tokens", "12",
        "--lr", "3e-3", "--save-every", "2", "--probe-every", "2", "--probe-size", "4", "--no-progress",
        "--gradient-checkpointing", "on", "--dist-timeout", "120",
        "--eval-benchmarks", "lab", "--eval-problems", "4", "--eval-max-new-tokens", "6", *extra,
    ]  # fmt: skip


def torchrun(args, tmp, env=None, timeout=240, monitor_s=0.1) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 dist_worker.py ARGS`` from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--monitor-interval", str(monitor_s), WORKER, *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _adapter(run_dir, step):
    return load_file(os.path.join(run_dir, "checkpoints", f"step-{step:06d}", "adapter_model.safetensors"))


def _state(run_dir, step):
    return checkpoint.read_state(os.path.join(run_dir, "checkpoints", f"step-{step:06d}"))


def assert_same_run(a, b, step=3, exact=False):
    """Two run directories made the same training run: every metric, the controller's record, the adapter."""
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, step + 1))
    for x, y in zip(ma, mb):
        assert {k: x[k] for k in EXACT} == {k: y[k] for k in EXACT}
        for k in CLOSE:
            assert (k in x) == (k in y) and (k not in x or x[k] == pytest.approx(y[k], rel=0 if exact else 1e-5)), k
    ca, cb = _state(a, step)["controller"], _state(b, step)["controller"]
    assert ca["pending"][0]["losses"] == pytest.approx(cb["pending"][0]["losses"], rel=0 if exact else 1e-5)
    assert ca["ema"] == pytest.approx(cb["ema"], rel=0 if exact else 1e-5)
    with open(os.path.join(a, "eval_summary.json")) as fa, open(os.path.join(b, "eval_summary.json")) as fb:
        ea, eb = (json.load(f)["benchmarks"]["lab"]["history"] for f in (fa, fb))  # sharded evaluation, gathered
    assert [(e["step"], e["accuracy"], e["n"]) for e in ea] == [(e["step"], e["accuracy"], e["n"]) for e in eb]
    wa, wb = _adapter(a, step), _adapter(b, step)
    assert sorted(wa) == sorted(wb) and len(wa) > 0
    for k in wa:
        # fp32 tolerance: sharded grad-norm sums round differently, and AdamW's first steps turn a 1-ulp change of
        # a near-zero gradient into up to ~lr/10 of update; the weights themselves are ~0.1
        torch.testing.assert_close(wa[k], wb[k], rtol=0 if exact else 1e-4, atol=0 if exact else 2e-5)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data, tmp_path_factory):
    """The reference: 3 steps of the global batch (4 problems x 2 samples) in this process."""
    return train(*parse(_args(tiny_model_dir, data, tmp_path_factory.mktemp("one") / "run")))


@pytest.fixture(scope="module")
def two_full(tiny_model_dir, data, tmp_path_factory):
    """The same run on 2 processes, base and adapter sharded (--fsdp full): 2 problems per rank."""
    tmp = tmp_path_factory.mktemp("two-full")
    _ok(torchrun(_args(tiny_model_dir, data, tmp / "run", "--fsdp", "full"), tmp))
    return str(tmp / "run")


def test_two_processes_fsdp_full_reproduce_one_process(one_process, two_full):
    assert_same_run(one_process, two_full)
    m = _metrics(two_full)
    assert all("head_gather_s" in r for r in m)  # the LM head was sharded and gathered once per step
    state = _state(two_full, 3)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2  # every rank's RNG and data position
    # one set of outputs, written by rank 0 only; rollouts, evaluations and the accuracy probe decoded by the
    # static decoder over the gathered weights (the HF loop is never chosen for a supported model)
    with open(os.path.join(two_full, "run.log")) as fh:
        log = fh.read()
    assert log.count("finished 3 steps") == 1
    assert "rollout: static (merged LoRA, weights gathered per rollout)" in log and "HF loop" not in log
    assert "probe_accuracy" in m[0]
    assert sorted(os.listdir(os.path.join(two_full, "checkpoints"))) == ["step-000002", "step-000003"]


@pytest.mark.parametrize("mode", ["lora", "off"])
def test_other_parallel_modes_reproduce_one_process(one_process, tiny_model_dir, data, tmp_path, mode):
    """--fsdp lora: FSDP2 over the adapter, base replicated; --fsdp off: replicated, gradients all-reduced."""
    _ok(torchrun(_args(tiny_model_dir, data, tmp_path / "run", "--fsdp", mode), tmp_path))
    assert_same_run(one_process, str(tmp_path / "run"))
    assert "head_gather_s" not in _metrics(str(tmp_path / "run"))[0]  # the head stayed a plain replicated tensor
    with open(tmp_path / "run" / "run.log") as fh:
        gathered = "rollout: static (merged LoRA, weights gathered per rollout)" in fh.read()
    assert gathered == (mode == "lora")  # --fsdp off: plain replicated weights, the decoder kept for the run


def test_killed_rank_then_resume_reproduces_the_run(one_process, two_full, tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, data, run, "--fsdp", "full")
    # rank 1 dies as step 3 begins while rank 0 still saves step 2 (a slow disk: the save lasts until torchrun,
    # polling every 0.1 s, sees the death and sends rank 0 SIGTERM). That request waits for step 3's stop check,
    # which rank 0 never reaches: it reports the lost rank. (Stopping alone at once made it say "stopped by SIGTERM"
    # instead: CI saw that once, when the save took longer than torchrun's polling interval.)
    env = {"ATESD_TEST_KILL": "1:3", "ATESD_TEST_SLOW_SAVE": "0:2"}
    killed = torchrun(args, tmp_path, env=env)
    assert killed.returncode != 0
    assert "Signal 9 (SIGKILL)" in killed.stderr  # torchrun names the rank that died
    assert "[rank 0] error: rank 0 of 2 lost contact with another rank during a collective" in killed.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["step-000002"]  # nothing half-written
    assert len(_metrics(run)) == 2

    # a different world size continues correctly: the step-2 checkpoint of 2 processes, resumed on 1
    other = tmp_path / "one-process"
    shutil.copytree(run, other)
    train(*parse(_args(tiny_model_dir, data, other, "--resume")))
    assert_same_run(one_process, str(other))
    with open(other / "run.log") as fh:
        assert "resuming a 2-process checkpoint on 1 processes" in fh.read()

    _ok(torchrun([*args, "--resume"], tmp_path))
    assert_same_run(two_full, str(run), exact=True)  # same world size: the uninterrupted run, bit for bit


def test_a_signal_reaching_one_rank_stops_every_rank_after_the_same_step(tiny_model_dir, data, tmp_path):
    """SIGTERM reaches rank 1 alone while it saves step 2, after that step's stop check: every rank runs step 3,
    saves it and stops there. (It used to stop rank 1 at once and leave rank 0 waiting in step 3's collectives.)"""
    run = tmp_path / "run"
    proc = torchrun([*_args(tiny_model_dir, data, run), "--steps", "4"], tmp_path, env={"ATESD_TEST_SIGTERM": "1:2"})
    assert proc.returncode != 0 and "lost contact" not in proc.stderr, proc.stderr[-4000:]
    ckpt = run / "checkpoints" / "step-000003"
    for who in ("[rank 0] ", "[rank 1] "):
        assert f"{who}stopped by SIGTERM after step 3; checkpoint {ckpt}; continue" in proc.stderr, proc.stderr[-4000:]
    assert sorted(os.listdir(run / "checkpoints")) == ["step-000002", "step-000003"]
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]


def test_ranks_with_different_configs_stop_at_start(tiny_model_dir, data, tmp_path):
    proc = torchrun(
        _args(tiny_model_dir, data, tmp_path / "run"), tmp_path, env={"ATESD_TEST_RANK_ARGS": "1:--lr 0.5"}
    )
    assert proc.returncode != 0
    assert "ranks disagree on the configuration" in proc.stderr and "lr: 0.003 vs 0.5" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
