"""The GPU session's train-step benchmark runs end to end on CPU at a smoke shape, and its split adds up."""

import importlib.util
from pathlib import Path

import pytest


def test_train_step_benchmark_smoke(tmp_path):
    pytest.importorskip("atesd.engine.lab")
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    PHASES, measure, render = bench.PHASES, bench.measure, bench.render

    partial = []
    r = measure("smoke", workdir=str(tmp_path), on_step=partial.append)
    assert set(r["phases_s"]) == {*PHASES, "backward + rest"}
    assert all(v > 0 for k, v in r["phases_s"].items() if k != "backward + rest")
    assert sum(r["phases_s"].values()) == pytest.approx(r["step2_s"])
    assert r["rollout_tokens"] == 4 * 16 and r["rollout_tokens_per_s"] > 0  # a random model never stops early
    # graphs compiled per phase and step (the CPU default is eager: none), the engine and attention that ran
    assert r["graphs"][1]["total"] == 0 and set(PHASES) <= set(r["graphs"][1])
    assert r["rollout_impl"] == "StaticRollout static (merged LoRA)" and r["attention"] == "dense (asked: dense)"
    md = render(r, "python -m benchmarks.bench_train_step --shape smoke")
    assert "| rollout |" in md and "| backward + rest |" in md and "0 graphs compiled (any is a recompile)" in md
    # step 1's figures were handed out before step 2 ran (written at once by --out)
    assert len(partial) == 1 and partial[0]["step2_s"] is None and partial[0]["phases_s"] is None
    assert "step 2 not reached" in render(partial[0], "cmd")
