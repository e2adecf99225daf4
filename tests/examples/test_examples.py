"""The integration recipes in examples/ run end to end on tiny random models, 2 optimizer steps each (CI)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def _run(name: str, monkeypatch, tmp_path, *extra: str) -> float:
    monkeypatch.syspath_prepend(EXAMPLES)  # the examples import their sibling common.py
    monkeypatch.setattr(sys, "argv", [name, "--tiny", "--steps", "2", "--output-dir", str(tmp_path), *extra])
    monkeypatch.chdir(tmp_path)  # nothing may be written into the checkout
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main()


@pytest.mark.parametrize("name", ["plain_loop", "hf_trainer", "sdft_self_distillation"])
def test_example_runs_two_steps(name, monkeypatch, tmp_path, capsys):
    loss = _run(name, monkeypatch, tmp_path)
    assert math.isfinite(loss) and loss > 0
    out = capsys.readouterr().out
    assert "loss" in out


def test_trl_distillation_trainer_example(monkeypatch, tmp_path, capsys):
    trl = pytest.importorskip("trl")
    if not hasattr(trl, "DistillationTrainer"):
        pytest.skip(f"trl {trl.__version__} has no DistillationTrainer")
    loss = _run("trl_distillation", monkeypatch, tmp_path)
    assert math.isfinite(loss) and loss > 0
    assert "trained 2 steps" in capsys.readouterr().out


def test_served_teacher_topk_example(monkeypatch, tmp_path, capsys):
    # the teacher in its own process (a stand-in for an inference server), then from a file an offline job wrote
    loss = _run("served_teacher_topk", monkeypatch, tmp_path)
    assert math.isfinite(loss) and loss > 0
    out = capsys.readouterr().out
    assert "step 1: loss" in out and "top-32 mass: teacher" in out
    path = str(tmp_path / "topk.pt")
    _run("served_teacher_topk", monkeypatch, tmp_path, "--write-teacher-topk", path)
    assert "wrote the teacher's top-32" in capsys.readouterr().out
    from_file = _run("served_teacher_topk", monkeypatch, tmp_path, "--teacher-topk", path)
    assert math.isfinite(from_file) and abs(from_file - loss) < 1e-4  # the same teacher, the same two steps
