"""Evaluation defaults: the paper's protocol (OPSD's) for math benchmarks in engine.evaluate and in the
trainer's periodic evaluation; greedy stays available (the lab's protocol, --greedy)."""

import inspect
import json

import atesd.engine.evaluate as evaluate_mod
import atesd.engine.evaluation as evaluation_mod
from atesd.engine.invocation import parse
from atesd.engine.task import PAPER_EVAL, get_task

PAPER = dict(temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=38912, n_samples=12, thinking=True)


def test_paper_protocol_constants_and_api_defaults():
    assert vars(PAPER_EVAL) == PAPER and get_task("math").eval == PAPER_EVAL
    defaults = {k: p.default for k, p in inspect.signature(evaluation_mod.evaluate_problems).parameters.items()}
    assert {k: defaults[k] for k in PAPER} == PAPER
    lab = get_task("lab").eval
    assert (lab.temperature, lab.n_samples, lab.max_new_tokens) == (0.0, 1, 128)  # greedy for the lab
    cfg, _ = parse(["--model", "qwen3-4b"])  # no --eval-* flag: the task decides
    assert all(getattr(cfg, f"eval_{k}") is None for k in ("temperature", "top_p", "top_k", "samples", "thinking"))


def test_cli_defaults_are_the_papers_and_greedy_is_a_flag(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    seen = []

    def fake(model, tokenizer, problems, grader, **kw):
        seen.append(kw)
        return {"accuracy": 0.5, "pass@k": {1: 0.5}, "per_level": {}, "n": len(problems),
                "n_samples": kw["n_samples"], "results": []}

    monkeypatch.setattr(evaluation_mod, "evaluate_problems", fake)
    base = ["--model", tiny_model_dir, "--data", str(data), "--workers", "1", "--out", str(tmp_path / "o")]
    summary = evaluate_mod.main(base)
    assert {k: seen[0][k] for k in PAPER} == PAPER
    assert seen[0]["templates"].student.startswith("Problem: {problem}")  # OPSD's student prompt
    assert summary["benchmarks"]["data"]["protocol"] == PAPER
    evaluate_mod.main(base + ["--greedy"])
    assert (seen[1]["temperature"], seen[1]["n_samples"]) == (0.0, 1)
    evaluate_mod.main(base + ["--no-thinking", "--top-k", "20", "--n", "4"])
    assert (seen[2]["thinking"], seen[2]["top_k"], seen[2]["n_samples"], seen[2]["temperature"]) == (False, 20, 4, 1.0)
