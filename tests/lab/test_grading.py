import itertools
import sys
import time
from math import comb

import pytest

from atesd.engine.grading import (
    MathGrader,
    average_at_n,
    extract_boxed,
    grade,
    mean_pass_at_k,
    normalize_answer,
    pass_at_k,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} end", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("no box here", None),
        ("\\boxed {7}", "7"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed{a} and unclosed \\boxed{b", "a"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{}", ""),
        ("$\\boxed{\\dfrac{3}{4}}$", "\\dfrac{3}{4}"),
        ("\\boxed{10 \\text{ cm}}", "10 \\text{ cm}"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_rejects_non_str():
    with pytest.raises(TypeError, match="str"):
        extract_boxed(None)


@pytest.mark.parametrize(
    "raw,norm",
    [
        ("$42$", "42"),
        ("10 \\text{ cm}", "10"),
        ("90^\\circ", "90"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("1,000", "1000"),
        ("\\text{Monday}", "Monday"),
        ("5 dollars", "5"),
        ("(1, 2)", "(1, 2)"),
    ],
)
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize(
    "pred,gold,ok",
    [
        ("1/2", "\\frac{1}{2}", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "0.5", True),
        ("3\\pi", "3 \\pi", True),
        ("\\frac{6\\pi}{2}", "3\\pi", True),
        ("\\sqrt{4}", "2", True),
        ("10 \\text{ cm}", "10", True),
        ("Monday", "\\text{Monday}", True),
        ("0.6", "\\frac{1}{2}", False),
        ("3", "3\\pi", False),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        (None, "1", False),
        ("", "1", False),
    ],
)
def test_grade_equivalent_forms(pred, gold, ok):
    assert grade(pred, gold) is ok


def _slow(args):
    completion, gold = args
    if "hang" in completion:
        time.sleep(60)
    return completion.endswith(gold)


def test_math_grader_workers_and_timeout():
    comps = ["\\boxed{0.5}", "\\boxed{1/3}", "nothing", "\\boxed{3\\pi}", "\\boxed{7}"]
    golds = ["\\frac{1}{2}", "\\frac{1}{2}", "1", "3\\pi", "7"]
    with MathGrader(workers=2) as g:
        assert g.grade_many(comps, golds) == [True, False, False, True, True]
        assert g("\\boxed{\\dfrac{2}{4}}", "1/2")
        with pytest.raises(ValueError, match="completions"):
            g.grade_many(["a"], [])
    # A hang is cut off by the timeout, counted wrong, and the other answers are still graded.
    g = MathGrader(workers=1, timeout=2.0, start_method="fork", fn=_slow)
    t0 = time.time()
    out = g.grade_many(["\\boxed{hang}", "\\boxed{2} x", "\\boxed{3}y"], ["1", "x", "y"])
    g.close()
    assert out == [False, True, True]
    assert time.time() - t0 < 30


def _hog(args):
    """Allocates 1 GiB (touched) in the worker: True when it could."""
    try:
        block = bytearray(2**30)
        block[:: 2**20] = b"x" * 1024
        return True
    except MemoryError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker memory cap is Linux's RLIMIT_DATA")
def test_math_grader_caps_worker_memory():
    # an answer whose grading would allocate past the cap is graded wrong; the pool goes on grading
    with MathGrader(workers=1, start_method="fork", fn=_hog, memory_mib=256) as g:
        assert g.grade_many(["\\boxed{a}", "\\boxed{b}"], ["x", "y"]) == [False, False]
    with MathGrader(workers=1, start_method="fork", fn=_hog, memory_mib=0) as g:  # uncapped, the same 1 GiB fits
        assert g.grade_many(["\\boxed{a}"], ["x"]) == [True]
    with MathGrader(workers=1, memory_mib=256) as g:  # real grading (math-verify, sympy) fits well under it
        assert g.grade_many(["\\boxed{0.5}", "\\boxed{1/3}"], ["\\frac{1}{2}", "\\frac{1}{2}"]) == [True, False]
    with pytest.raises(ValueError, match="memory_mib"):
        MathGrader(memory_mib=-1)


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - comb(7, 4) / comb(10, 4))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_pass_at_k_matches_subset_enumeration():
    row = [True, False, False, True, False, False]
    for k in range(1, 7):
        subsets = list(itertools.combinations(row, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(6, 2, k) == pytest.approx(brute)
    assert mean_pass_at_k([row, [False] * 6], 2) == pytest.approx(pass_at_k(6, 2, 2) / 2)


def test_average_at_n():
    assert average_at_n([[True, False, False, False], [True, True, True, True]]) == pytest.approx(0.625)
    assert average_at_n([[True], [False], [False]]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        average_at_n([])
    with pytest.raises(ValueError):
        average_at_n([[]])
