"""The pre-training corpus and a smoke run of the script at toy size (the real run is not a test)."""

import json
import random

import pytest

from atesd.engine.lab import generate_problems, pretrain
from atesd.engine.lab.prompts import expose_reference
from atesd.engine.lab.task import solution_lines


@pytest.fixture(scope="module")
def tok():
    from atesd.engine.lab.tokenizer import build_tokenizer

    texts = []
    for p in generate_problems(200, 0):
        texts += [p["problem"], p["solution"], "\n".join(solution_lines(p["groups"], "stepwise"))]
    return build_tokenizer(texts + ["Reference solution:", "Now solve the problem yourself"], vocab_size=300)


def test_revealed_lines_matches_expose_reference():
    reasoning = "2*3=6\n4*5=20\n6+20=26"
    for alpha in [i / 20 for i in range(21)]:
        k = pretrain.revealed_lines(reasoning, alpha, "lines")
        assert k == expose_reference(reasoning + "\n\\boxed{26}", alpha, "lines").count("\n")
        shown = expose_reference(reasoning + "\n\\boxed{26}", alpha, "chars").split("\n")[:-1]
        assert pretrain.revealed_lines(reasoning, alpha, "chars") == len(shown)


def test_examples_student_stepwise_teacher_follows_then_continues(tok):
    rng = random.Random(0)
    stream = pretrain.train_stream(0)
    seen_styles = set()
    for i in range(300):
        ex = next(stream)
        teacher = i % 2 == 0
        ids, labels = pretrain.build_example(tok, ex, teacher, rng)
        n_prompt = labels.count(-100)
        assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        prompt, target = tok.decode(ids[:n_prompt]), tok.decode(ids[n_prompt:])
        assert target.endswith(f"\\boxed{{{ex['answer']}}}<|im_end|>")
        lines = target.split("\n")[:-1]
        stepwise = solution_lines(ex["groups"], "stepwise")
        if not teacher:
            assert lines == stepwise and "Reference solution" not in prompt
            continue
        reference = prompt.split("Reference solution:\n")[1].split("\n\n")[0].split("\n")[:-1]
        # the target agrees with every line the reference shows (a cut one completed) ...
        for shown, written in zip(reference, lines):
            assert written.startswith(shown)
        # ... and ends stepwise unless the reference showed its own additions
        if len(reference) <= len(ex["groups"]):
            assert lines == stepwise
        else:
            seen_styles.add("terse" if lines[len(ex["groups"])].count("+") > 1 else "pairs")
    assert seen_styles == {"terse", "pairs"}


def test_pretrain_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "level_report", lambda *a, **k: {"split": "val", "accuracy": 0.0})
    out = tmp_path / "tiny"
    pretrain.main(["--out", str(out), "--steps", "3", "--batch-size", "4", "--hidden", "32", "--layers", "1",
                   "--threads", "1", "--save-at", "2", "--vocab-size", "200"])  # fmt: skip
    info = json.loads((out / "pretrain_info.json").read_text())
    assert info["steps"] == 3 and info["layers"] == 1 and info["command"].startswith("python -m engine.lab.pretrain")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "step-2" / "pretrain_info.json").read_text())["steps_done"] == 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and len(AutoTokenizer.from_pretrained(out)) <= 200
