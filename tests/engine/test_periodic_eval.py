"""Periodic evaluation: scripted accuracies give a known best checkpoint; the history survives --resume."""

import json
import os

import pytest
from engine_tiny import write_dataset

import atesd.engine.evaluation as evaluation_mod
from atesd.engine.invocation import parse
from atesd.engine.train import train
from atesd.engine.trainer import TIMING_METRICS

TIMING = TIMING_METRICS
SCRIPT = [0.25, 0.5, 0.75, 0.75]  # steps 0, 2, 4, 6: best is step 4 (tied with 6: the earliest wins)


def _args(model_dir, out, *extra):
    return [
        "--model", model_dir, "--data", "lab", "--task-option", "size=40", "--output-dir", str(out),
        "--exposure", "fixed:0.5", "--steps", "6", "--batch-size", "2", "--max-new-tokens", "8",
        "--eval-problems", "4", "--eval-every", "2", "--save-every", "3", "--probe-every", "0",
        "--no-progress", *extra,
    ]  # fmt: skip


def _scripted(monkeypatch, values):
    """evaluate_task replaced by one returning ``values`` in call order; returns the list of its calls."""
    it, calls = iter(values), []

    def fake(model, tokenizer, problems, task, **kw):
        calls.append({"n": len(problems), "task": task.name, **kw})
        acc = next(it)
        return {"accuracy": acc, "per_level": {1: acc}, "n": len(problems), "n_samples": 1, "pass@k": {1: acc}}

    monkeypatch.setattr(evaluation_mod, "evaluate_task", fake)
    return calls


def _read(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        metrics = [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in fh]
    with open(os.path.join(run_dir, "eval_summary.json")) as fh:
        summary = json.load(fh)
    for e in summary["benchmarks"]["lab"]["history"]:
        e.pop("seconds")
    return metrics, summary


def test_best_checkpoint_and_resume(tiny_model_dir, tmp_path, monkeypatch, capsys):
    calls = _scripted(monkeypatch, SCRIPT)
    full = train(*parse(_args(tiny_model_dir, tmp_path / "full")))
    assert [c["n"] for c in calls] == [4] * 4 and all(c["temperature"] == 0 for c in calls)  # the lab: greedy
    assert all(c["task"] == "lab" and c["max_new_tokens"] == 128 and c["n_samples"] == 1 for c in calls)
    m_full, s_full = _read(full)
    lab = s_full["benchmarks"]["lab"]
    assert [(e["step"], e["accuracy"]) for e in lab["history"]] == list(zip((0, 2, 4, 6), SCRIPT))
    assert lab["best"] == {"step": 4, "accuracy": 0.75, "checkpoint": os.path.join("checkpoints", "step-000004")}
    assert lab["history"][0]["checkpoint"] is None  # step 0 is the base model
    # every evaluated step is checkpointed, beside the --save-every ones
    assert sorted(os.listdir(os.path.join(full, "checkpoints"))) == [f"step-{s:06d}" for s in (2, 3, 4, 6)]
    assert os.path.isdir(os.path.join(full, lab["best"]["checkpoint"]))
    assert {m["step"]: m["eval/lab/accuracy"] for m in m_full if "eval/lab/accuracy" in m} == {2: 0.5, 4: 0.75, 6: 0.75}
    out = capsys.readouterr().out
    assert "held-out accuracy before training: 0.250" in out and "held-out accuracy at step 2: 0.500" in out
    assert "best lab accuracy: 0.750 at step 4" in out
    with open(os.path.join(full, "summary.json")) as fh:
        summary = json.load(fh)
    assert (summary["accuracy_before"], summary["accuracy_after"], summary["gain"]) == (0.25, 0.75, 0.5)
    assert summary["eval"]["lab"]["best"]["step"] == 4

    # killed after step 5 (last checkpoint: step 4), then resumed: only step 6 is evaluated again
    calls = _scripted(monkeypatch, SCRIPT[:3])
    killed = train(*parse(_args(tiny_model_dir, tmp_path / "killed", "--stop-after", "5")))
    assert len(calls) == 3 and not os.path.exists(os.path.join(killed, "summary.json"))
    calls = _scripted(monkeypatch, SCRIPT[3:])
    train(*parse(_args(tiny_model_dir, killed, "--resume")))
    assert len(calls) == 1
    m_res, s_res = _read(killed)
    assert s_res == s_full and m_res == m_full  # history restored; training still exact with evaluations on


def test_math_benchmark_dispatch(tiny_model_dir, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "train.jsonl", n=12)
    bench = tmp_path / "mybench.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(5)))
    seen = []

    def fake(model, tokenizer, problems, grader, **kw):
        seen.append((len(problems), kw))
        return {"accuracy": 0.2 * len(seen), "per_level": {}, "n": len(problems), "n_samples": 1, "results": []}

    monkeypatch.setattr(evaluation_mod, "evaluate_problems", fake)
    args = [
        "--model", tiny_model_dir, "--data", data, "--output-dir", str(tmp_path / "run"), "--steps", "2",
        "--batch-size", "2", "--max-new-tokens", "8", "--probe-every", "0", "--no-progress",
        "--eval-benchmarks", str(bench), "--eval-limit", "3",
    ]  # fmt: skip
    cfg, _ = parse(args)
    assert cfg.eval_every == 0 and cfg.eval_max_new_tokens is None and cfg.task == "math"
    run = train(cfg)
    assert [n for n, _ in seen] == [3, 3]  # before and after; --eval-limit keeps the first 3
    kw = seen[0][1]  # the paper's protocol (OPSD's): thinking on, T=1.0, top-p 0.95, no top-k, 38912, Average@12
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["max_new_tokens"], kw["n_samples"], kw["thinking"]) == (
        1.0, 0.95, 0, 38912, 12, True)
    assert kw["templates"].student.startswith("Problem: {problem}")  # OPSD's student prompt
    with open(os.path.join(run, "eval_summary.json")) as fh:
        best = json.load(fh)["benchmarks"]["mybench"]["best"]
    assert best["step"] == 2 and best["accuracy"] == pytest.approx(0.4)


def test_eval_flags_override_the_protocol(tiny_model_dir, tmp_path):
    from atesd.engine.evaluator import Evaluator

    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    cfg, _ = parse(["--model", "qwen3-1.7b", "--eval-benchmarks", str(bench), "--eval-temperature", "0",
                    "--eval-samples", "4", "--no-eval-thinking", "--eval-top-k", "20"])
    p = Evaluator(cfg, str(tmp_path)).protocol("b")
    got = (p.temperature, p.n_samples, p.thinking, p.top_k, p.top_p, p.max_new_tokens)
    assert got == (0.0, 4, False, 20, 0.95, 38912)  # the flags, and the task's protocol for the rest


def test_defaults_and_bad_benchmark(tiny_model_dir, tmp_path):
    assert parse([])[0].eval_benchmarks == "lab" and parse([])[0].eval_every == 0
    paper = parse(["--model", "qwen3-8b"])[0]  # the paper's rule: AIME 24/25, HMMT 25 at steps 25/50/75/100
    assert (paper.eval_benchmarks, paper.eval_every, paper.save_every) == ("aime24,aime25,hmmt25", 25, 25)
    assert paper.steps == 100
    assert parse(["--model", "Qwen/Qwen3-8B"])[0].clip == 0.06  # a hub id takes its size's recipe
    assert parse(["--eval-problems", "0"])[0].eval_benchmarks == ""
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        train(*parse(_args(tiny_model_dir, tmp_path / "bad", "--eval-benchmarks", "lab,nope")))
