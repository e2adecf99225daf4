import re

import pytest

from atesd.engine.lab import generate_problems, lab_dataset, verify
from atesd.engine.lab.prompts import DEFAULT_INSTRUCTION, expose_reference, student_messages, teacher_messages

_LINE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def test_deterministic_and_seed_dependent():
    a, b, c = generate_problems(40, 3), generate_problems(40, 3), generate_problems(40, 4)
    assert a == b
    assert a != c
    assert [p["level"] for p in a[:8]] == [1, 2, 3, 4, 1, 2, 3, 4]


@pytest.mark.parametrize("level,steps", [(1, {1}), (2, {2}), (3, {3, 4}), (4, {5, 6})])
def test_solutions_are_correct_arithmetic(level, steps):
    for p in generate_problems(300, 11, levels=(level,)):
        lines = p["solution"].split("\n")
        assert lines[-1] == f"\\boxed{{{p['answer']}}}"
        assert len(lines) - 1 in steps
        start = int(re.search(r" has (\d+) ", p["problem"]).group(1))
        value = start
        for ln in lines[:-1]:
            a, op, b, c = _LINE.match(ln).groups()
            assert int(a) == value, (p, ln)
            assert _OPS[op](int(a), int(b)) == int(c), ln
            value = int(c)
            assert value >= 0
        assert str(value) == p["answer"]
        # The problem text states every operation in order.
        n_ops = p["problem"].count(",") + 1
        assert n_ops == len(lines) - 1
        assert p["level"] == level
        assert len(p["problem"]) <= 130


def test_splits_disjoint_unique_balanced():
    train = lab_dataset("train", 2000, seed=0)
    test = lab_dataset("test", 400, seed=0)
    test2 = lab_dataset("test", 400, seed=1)
    tr = {p["problem"] for p in train}
    assert len(tr) == 2000 and len({p["problem"] for p in test}) == 400
    assert not tr & {p["problem"] for p in test}
    assert not tr & {p["problem"] for p in test2}
    assert lab_dataset("test", 400, seed=0) == test
    assert [sum(p["level"] == lv for p in test) for lv in (1, 2, 3, 4)] == [100] * 4
    assert [p["level"] for p in lab_dataset("test", 6, levels=(2,))] == [2] * 6


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        lab_dataset("valid", 3)
    with pytest.raises(ValueError, match="levels"):
        generate_problems(3, 0, levels=(5,))
    with pytest.raises(ValueError, match="n must"):
        generate_problems(-1, 0)


def test_verify():
    assert verify("12+7=19\n\\boxed{19}", "19")
    assert verify("\\boxed{3} wait \\boxed{ 19 }", "19")
    assert not verify("\\boxed{19} no, \\boxed{20}", "19")
    assert not verify("19", "19")
    assert not verify("\\boxed{19.0}", "19")  # exact, not numeric
    assert not verify("\\boxed{19", "19")


def test_prompts_and_exposure():
    sol = "1+2=3\n3*2=6\n6-1=5\n5+5=10\n\\boxed{10}"
    assert expose_reference(sol, 1.0) == sol
    assert expose_reference(sol, 0.0) == "\\boxed{10}"
    assert expose_reference(sol, 0.5) == "1+2=3\n3*2=6\n\\boxed{10}"
    assert expose_reference(sol, 0.74) == "1+2=3\n3*2=6\n\\boxed{10}"
    assert expose_reference(sol, 0.75) == "1+2=3\n3*2=6\n6-1=5\n\\boxed{10}"
    assert expose_reference(sol, 0.25, mode="chars") == "1+2=3\n\\boxed{10}"
    with pytest.raises(ValueError, match="alpha"):
        expose_reference(sol, 1.5)
    assert student_messages("P?") == [{"role": "user", "content": "P?"}]
    (msg,) = teacher_messages("P?", "\\boxed{1}")
    assert msg["content"] == f"P?\n\nReference solution:\n\\boxed{{1}}\n\n{DEFAULT_INSTRUCTION}"
