"""Exposure: alpha=0 keeps only the answer, alpha=1 the whole reference, the boxed answer always, monotone."""

import math

import pytest

from atesd.engine.exposure import DEFAULT_INSTRUCTION, last_boxed, make_example, split_reference

SOLUTION = "Let x = 3.\nThen 2x = 6.\nAdd {1}: 7.\nFinally 7 * 2 = 14.\nThe answer is \\boxed{\\frac{28}{2}}"
ALPHAS = [i / 20 for i in range(21)]


def test_last_boxed_nested_and_missing():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("no answer") is None
    assert last_boxed("\\boxed{unclosed") is None
    lines, answer = split_reference("\\boxed{5}")
    assert lines == [] and answer == "\\boxed{5}"


@pytest.mark.parametrize("mode", ["tokens", "lines"])
def test_exposure_ends_and_monotone(tiny_tokenizer, mode):
    ex = make_example(tiny_tokenizer, "What is 14?", SOLUTION)
    lines, answer = split_reference(SOLUTION)
    reasoning = "".join(lines)
    assert ex.answer == "\\frac{28}{2}" and ex.reasoning == reasoning and ex.answer_block == answer
    assert ex.exposed_reference(ex.cut(0.0, mode)) == answer  # alpha = 0: the answer only
    assert ex.exposed_reference(ex.cut(1.0, mode)) == SOLUTION  # alpha = 1: the whole reference
    cuts = [ex.cut(a, mode) for a in ALPHAS]
    assert cuts == sorted(cuts) and cuts[0] == 0 and cuts[-1] == len(reasoning)
    for cut in cuts:
        shown = reasoning[:cut]  # a prefix that only grows, then the answer line on a line of its own
        closing = "\n" if shown and not shown.endswith("\n") else ""
        assert ex.exposed_reference(cut) == shown + closing + answer
    if mode == "lines":  # whole lines only
        assert [reasoning[:c].count("\n") for c in cuts] == [math.floor(a * 4 + 1e-9) for a in ALPHAS]
    else:  # floor(alpha * m) tokens (the character tokenizer: one token per character)
        m = len(ex.reasoning_ids)
        assert [ex.revealed_tokens(ex.cut(a)) for a in (0.25, 0.5, 0.7)] == [
            int(0.25 * m), int(0.5 * m), int(0.7 * m + 1e-9)
        ]


def test_prompts_roles_and_instruction(tiny_tokenizer):
    ex = make_example(tiny_tokenizer, "What is 14?", SOLUTION, instruction="Go on.")
    teacher = tiny_tokenizer.decode(ex.teacher_prompt(ex.cut(0.5)))
    student = tiny_tokenizer.decode(ex.student_prompt)
    assert "What is 14?" in teacher and "=== Reference Solution Begin ===" in teacher and "Go on." in teacher
    assert "Reference" not in student and "What is 14?" in student and "\\boxed{}" in student
    assert student.endswith("<think>\n\n</think>\n\n")  # OPSD: thinking off for the student
    assert teacher.endswith("<|im_start|>assistant\n")  # and on for the teacher
    no_thinking = make_example(tiny_tokenizer, "What is 14?", SOLUTION, teacher_thinking=False)
    assert tiny_tokenizer.decode(no_thinking.teacher_prompt(0)).endswith("</think>\n\n")
    # (this character tokenizer has no em dash; tests/engine/test_prompts.py checks the wording byte by byte)
    assert DEFAULT_INSTRUCTION.split(" \u2014 ")[1] in tiny_tokenizer.decode(no_thinking.teacher_prompt(0))
    with pytest.raises(ValueError, match="alpha"):
        ex.cut(1.5)
    with pytest.raises(ValueError, match="mode"):
        ex.cut(0.5, "words")
    with pytest.raises(ValueError, match="boxed"):
        make_example(tiny_tokenizer, "p", "no answer")
