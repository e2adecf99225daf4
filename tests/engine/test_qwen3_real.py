"""The real Qwen3 path, exact to the token: the genuine Qwen3 tokenizer (merges, pre-tokenizer, chat template with
thinking) and a random-weight Qwen3 of its real vocabulary (tests/qwen3_real.py).

Every id the engine feeds the model is ``tokenizer(rendered_text)``: the teacher prompt at any exposure and for any
reference shape, the student prompt, the evaluation prompt and the credit branch's continuation."""

import json
import math

import pytest

from atesd.engine.exposure import make_example, split_reference
from atesd.engine.task import MATH, OPSD_EVALUATION

PROBLEM = "Let $x$ be the number of apples. Find $x$ if $2x = 16$."
REFERENCES = {
    # three paragraphs: Qwen merges ".\n\n" (and "$.\n\n") into single tokens across the line breaks
    "paragraphs": "First, note that $2x = 16$.\n\nDividing both sides by 2 gives $x = 8$.\n\n"
    "We check: $2 \\cdot 8 = 16$.\n\nSo the answer is \\boxed{8}.",
    "trailing_spaces": "Step one: write the equation.  \nStep two: divide by 2. \n  \nThus \\boxed{8}",
    "latex": "We have $\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}$.\n\\[ x^2 - 4 = 0 \\implies x = \\pm 2 \\]\n"
    "So $x = \\frac{5}{6}$.\nThe answer is $\\boxed{\\frac{5}{6}}$.",
    "unicode": "Since \u03c0 \u2248 3.14 and \u221a2 \u2248 1.41, the product is \u2248 4.44 \u2014 "
    "caf\u00e9 \U0001f600.\n"
    "\u5e73\u65b9\u6839\u662f 2\u3002\nThus \\boxed{4.44}",
    "bold": "**Step 1:** Set up $2x = 16$.\n**Step 2:** Solve: $x = 8$.\n\n**Answer:** \\boxed{8}",
    "answer_only": "\\boxed{8}",
}
ALPHAS = (0.0, 0.3, 0.5, 0.77, 1.0)


def _ids(tok, text):
    return tok(text)["input_ids"]  # exactly what a user would compute: no flags


def _chat(tok, content, thinking):
    msgs = [{"role": "user", "content": content}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)


@pytest.mark.parametrize("shape", sorted(REFERENCES))
@pytest.mark.parametrize("mode", ["tokens", "lines"])
def test_teacher_ids_are_the_ids_of_its_text(qwen3_tokenizer, shape, mode):
    tok, solution = qwen3_tokenizer, REFERENCES[shape]
    ex = make_example(tok, PROBLEM, solution, templates=MATH.templates)
    lines, answer = split_reference(solution)
    reasoning = "".join(lines)
    m = len(_ids(tok, reasoning)) if reasoning else 0
    for alpha in ALPHAS:
        cut = ex.cut(alpha, mode)
        shown = reasoning[:cut]
        if mode == "tokens":  # the first floor(alpha * m) tokens of the reasoning, as text
            assert ex.revealed_tokens(cut) == math.floor(alpha * m + 1e-9)
            assert tok.decode(_ids(tok, reasoning)[: ex.revealed_tokens(cut)]) == shown
        else:  # the first floor(alpha * L) lines
            assert shown == "".join(lines[: math.floor(alpha * len(lines) + 1e-9)])
        reference = shown + ("\n" if shown and not shown.endswith("\n") else "") + answer
        expected = _chat(tok, MATH.templates.teacher_messages(PROBLEM, reference)[0]["content"], thinking=True)
        assert ex.teacher_text(cut) == expected
        assert ex.teacher_prompt(cut) == _ids(tok, expected)
        assert tok.decode(ex.teacher_prompt(cut)) == expected
    # the credit branch: the whole reference as the reply, as the tokenizer reads prompt + reply
    full = ex.teacher_text(len(reasoning))
    assert ex.teacher_prompt(len(reasoning)) + ex.teacher_reply_ids == _ids(tok, full + solution)
    assert ex.student_prompt + ex.student_reply_ids == _ids(tok, ex.student_text + solution)


def test_piecewise_ids_would_differ(qwen3_tokenizer):
    """The bug this guards against: ids encoded piece by piece are not the ids of the text (BPE merges '.\\n\\n')."""
    tok, solution = qwen3_tokenizer, REFERENCES["paragraphs"]
    ex = make_example(tok, PROBLEM, solution, templates=MATH.templates)
    text = ex.teacher_text(ex.cut(1.0))
    lines, answer = split_reference(solution)
    head, tail = text.split(solution)
    piecewise = [t for piece in (head, *lines, answer, tail) for t in _ids(tok, piece)]
    assert ex.teacher_prompt(ex.cut(1.0)) == _ids(tok, text) != piecewise
    assert len(piecewise) > len(_ids(tok, text))
    assert _ids(tok, ".\n\n") == [382]  # one token across a paragraph break


def test_thinking_blocks_as_qwen3_renders_them(qwen3_tokenizer):
    tok = qwen3_tokenizer
    ex = make_example(tok, PROBLEM, REFERENCES["bold"], templates=MATH.templates)
    think, end_think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    # the student (thinking off): Qwen3 writes an empty think block; the rollout follows it
    assert ex.student_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ex.student_text == _chat(tok, MATH.templates.student_messages(PROBLEM)[0]["content"], thinking=False)
    assert ex.student_prompt[-4:] == _ids(tok, "<think>\n\n</think>\n\n") == [think, 271, end_think, 271]
    # the teacher (thinking on, OPSD's): the assistant turn is open, no think block; the student's rollout tokens
    # are appended right after "<|im_start|>assistant\n", as in OPSD's trainer
    teacher = ex.teacher_prompt(ex.cut(0.5))
    assert ex.teacher_text(ex.cut(0.5)).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert think not in teacher and end_think not in teacher
    off = make_example(tok, PROBLEM, REFERENCES["bold"], templates=MATH.templates, teacher_thinking=False)
    assert off.teacher_text(0).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # evaluation: OPSD's evaluate_math.py prompt (no "Problem: "), thinking on (the paper's protocol)
    assert OPSD_EVALUATION == "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert MATH.templates.evaluation_messages(PROBLEM)[0]["content"] == (
        PROBLEM + "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def test_prompts_tool_prints_what_the_engine_feeds(qwen3_model_dir, tmp_path, capsys):
    from atesd.engine import prompts

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"problem": PROBLEM, "solution": s}) + "\n" for s in REFERENCES.values()))
    assert prompts.main(["--model", qwen3_model_dir, "--data", str(data), "--alpha", "0.5", "--limit", "2"]) == 2
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(qwen3_model_dir)
    for row, solution in zip(rows, REFERENCES.values()):
        assert tuple(row) == ("student_text", "teacher_text", "student_ids", "teacher_ids")
        ex = make_example(tok, PROBLEM, solution, templates=MATH.templates)
        assert row["teacher_ids"] == _ids(tok, row["teacher_text"]) == ex.teacher_prompt(ex.cut(0.5))
        assert row["student_ids"] == _ids(tok, row["student_text"]) == ex.student_prompt
    with pytest.raises(SystemExit) as e:
        prompts.main(["--model", qwen3_model_dir, "--data", str(data), "--alpha", "1.5"])
    assert e.value.code == 2 and "--alpha" in capsys.readouterr().err


def test_train_math_and_evaluate_end_to_end(qwen3_model_dir, tmp_path, monkeypatch):
    """engine.train --task math and engine.evaluate on the real vocabulary (151936) and tokenizer."""
    from atesd.engine import evaluate as evaluate_mod
    from atesd.engine import evaluation as evaluation_mod
    from atesd.engine.invocation import parse
    from atesd.engine.train import train

    data, bench = tmp_path / "train.jsonl", tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {a}?", "solution": f"We add.\n\n"
                                        f"{a} + {a} = {2 * a}.\n\nSo \\boxed{{{2 * a}}}"}) + "\n" for a in range(6)))
    bench.write_text("".join(json.dumps({"problem": f"What is {a} * 3?", "answer": str(3 * a)}) + "\n"
                             for a in range(3)))
    seen = []
    real = evaluation_mod.generate_completions

    def spy(model, tokenizer, prompts, **kw):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(evaluation_mod, "generate_completions", spy)
    run = tmp_path / "run"
    cfg, resume = parse([
        "--model", qwen3_model_dir, "--data", str(data), "--task", "math", "--steps", "2", "--batch-size", "2",
        "--micro-batch", "2", "--max-new-tokens", "6", "--probe-every", "1", "--probe-size", "2",
        "--eval-benchmarks", str(bench), "--eval-max-new-tokens", "4", "--eval-samples", "2",
        "--output-dir", str(run), "--no-progress", "--lora-r", "4", "--lora-alpha", "8",
    ])  # fmt: skip
    assert cfg.task == "math" and cfg.exposure == "adaptive"  # the credit branch runs too (lambda_gt > 0)
    train(cfg, resume)
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(math.isfinite(m["credit"]) and math.isfinite(m["probe_nll"]) for m in metrics)
    summary = json.loads((run / "eval_summary.json").read_text())["benchmarks"]["bench"]
    assert summary["base"]["step"] == 0 and summary["best"]["step"] == 2  # the base model is never "best"
    want = _chat(__import__("transformers").AutoTokenizer.from_pretrained(qwen3_model_dir),
                 "What is 0 * 3?\n\nPlease reason step by step, and put your final answer within \\boxed{}.", True)
    assert want in seen  # OPSD's evaluation prompt, thinking on
    seen.clear()
    out = evaluate_mod.main(["--adapter", str(run / "checkpoints" / "step-000002"), "--data", str(bench),
                             "--n", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])
    assert out["benchmarks"]["data"]["n"] == 3 and want in seen
    assert (tmp_path / "eval" / "summary.json").exists()
