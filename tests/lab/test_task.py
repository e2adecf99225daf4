import random
import re

import pytest

from atesd.engine.lab import generate_problems, lab_dataset, verify
from atesd.engine.lab.prompts import DEFAULT_INSTRUCTION, expose_reference, student_messages, teacher_messages
from atesd.engine.lab.task import (
    CONTAINERS,
    LEVELS,
    PRETRAIN_SIZES,
    _make,
    continue_solution,
    solution_lines,
    split_of,
)

_PRODUCT = re.compile(r"^(\d+)\*(\d+)=(\d+)$")
_SUM = re.compile(r"^(\d+)\+(\d+)=(\d+)$")
_GROUP = re.compile(r"(\d+) (?:(?:bags|boxes|jars) of (\d+)|(" + "|".join(CONTAINERS) + r"))\b")


def test_deterministic_and_seed_dependent():
    a, b, c = generate_problems(40, 3), generate_problems(40, 3), generate_problems(40, 4)
    assert a == b
    assert a != c
    assert [p["level"] for p in a[:8]] == [1, 2, 3, 4, 1, 2, 3, 4]


def _check_products(p: dict) -> list[int]:
    """The solution's first lines are the groups' products, in the problem's order; returns the products."""
    stated = _GROUP.findall(p["problem"])
    assert len(stated) == len(p["groups"]) and p["containers"] == sum(bool(box) for *_, box in stated)
    products = []
    for (a, b), ln in zip(p["groups"], p["solution"].split("\n")):
        x, y, z = map(int, _PRODUCT.match(ln).groups())
        assert (x, y) == (a, b) and z == a * b
        products.append(z)
    return products


def _check_additions(lines: list[str], products: list[int]) -> tuple[int, ...]:
    """``lines`` add every product exactly once, one pair per line onto a running total; returns the order."""
    sums = [tuple(map(int, _SUM.match(ln).groups())) for ln in lines]
    used = [sums[0][0]] + [b for _, b, _ in sums]
    assert sorted(used) == sorted(products)
    total = sums[0][0]
    for a, b, c in sums:
        assert a == total and c == a + b
        total = c
    assert total == sum(products)
    return tuple(used)


@pytest.mark.parametrize("level,groups", [(1, 2), (2, 3), (3, 4), (4, 5)])
def test_references_are_correct_terse_and_follow_the_problem(level, groups):
    containers = 0
    for p in generate_problems(300, 11, levels=(level,)):
        lines = p["solution"].split("\n")
        assert lines[-1] == f"\\boxed{{{p['answer']}}}" and len(lines) == groups + 2
        # the text states every group in order; a container's size is the lab world's
        for (n, size, box), (count, true_size) in zip(_GROUP.findall(p["problem"]), p["groups"]):
            assert int(n) == count and (int(size) if size else CONTAINERS[box]) == true_size
        products = _check_products(p)
        terms, total = lines[groups].split("=")  # every addition in one line, in order
        assert [int(t) for t in terms.split("+")] == products and int(total) == sum(products)
        assert p["answer"] == str(sum(products))
        containers += p["containers"]
        assert p["level"] == level and len(p["problem"]) <= 160
    assert 0.3 < containers / (300 * groups) < 0.5  # CONTAINER_RATE = 0.4


def test_styles_and_continuation():
    groups = [(3, 12), (4, 7), (5, 9)]
    assert solution_lines(groups, "terse") == ["3*12=36", "4*7=28", "5*9=45", "36+28+45=109"]
    stepwise = solution_lines(groups, "stepwise")
    assert stepwise == ["3*12=36", "4*7=28", "5*9=45", "36+28=64", "64+45=109"]
    orders = set()
    for seed in range(30):
        shuffled = solution_lines(groups, "shuffled", random.Random(seed))
        orders.add(_check_additions(shuffled[3:], [36, 28, 45]))
        # a reference shown k lines deep is followed that far, then continued stepwise
        for k in range(len(shuffled) + 1):
            cont = continue_solution(groups, shuffled, k)
            assert cont[:k] == shuffled[:k] and cont[:3] == stepwise[:3]
            _check_additions(cont[3:], [36, 28, 45])
            if k <= 3:
                assert cont == stepwise
    assert len(orders) == 6
    terse = solution_lines(groups, "terse")
    assert [continue_solution(groups, terse, k) for k in (2, 3, 4)] == [stepwise, stepwise, terse]
    dup = [(3, 9), (9, 3), (2, 5)]  # equal products are counted once each
    ref = ["3*9=27", "9*3=27", "2*5=10", "10+27=37", "37+27=64"]
    assert continue_solution(dup, ref, 4) == ref
    with pytest.raises(ValueError, match="style"):
        solution_lines(groups, "chatty")
    with pytest.raises(ValueError, match="rng"):
        solution_lines(groups, "shuffled")


def test_pretraining_world_has_two_sizes_per_container():
    rng = random.Random(0)
    seen: dict[str, set[int]] = {}
    for _ in range(400):
        p = _make(rng, 2, container_rate=0.5, world="pretrain", style="stepwise")
        for (*_, box), (_, true_size) in zip(_GROUP.findall(p["problem"]), p["groups"]):
            if box:
                assert true_size in PRETRAIN_SIZES[box]
                seen.setdefault(box, set()).add(true_size)
        _check_additions(p["solution"].split("\n")[3:-1], _check_products(p))
    assert seen == {box: set(sizes) for box, sizes in PRETRAIN_SIZES.items()}
    assert all(CONTAINERS[box] in sizes for box, sizes in PRETRAIN_SIZES.items())
    with pytest.raises(ValueError, match="world"):
        _make(rng, 1, world="mars")


def test_splits_disjoint_by_content_unique_balanced():
    train = lab_dataset("train", 2000, seed=0, levels=(1, 2))
    val = lab_dataset("val", 400, seed=0, levels=(1, 2))
    test = lab_dataset("test", 400, seed=0, levels=(1, 2))
    test2 = lab_dataset("test", 400, seed=1, levels=(1, 2))
    keys = {name: {tuple(map(tuple, p["groups"])) for p in rows} for name, rows in
            (("train", train), ("val", val), ("test", test), ("test2", test2))}  # fmt: skip
    assert len(keys["train"]) == 2000 and len(keys["val"]) == 400 and len(keys["test"]) == 400
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["test2"]
    assert not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    assert all(split_of(p) == "test" for p in test) and all(split_of(p) == "val" for p in val)
    assert lab_dataset("test", 400, seed=0, levels=(1, 2)) == test
    assert [sum(p["level"] == lv for p in test) for lv in (1, 2)] == [200, 200]
    assert [p["level"] for p in lab_dataset("test", 6, levels=(2,))] == [2] * 6
    everything = lab_dataset("test", 40, seed=0)
    assert [sum(p["level"] == lv for p in everything) for lv in LEVELS] == [10] * 4


def test_split_depends_on_numbers_not_names():
    p = generate_problems(1, 0)[0]
    renamed = {**p, "problem": p["problem"].replace(p["problem"].split()[0], "Zed")}
    assert split_of(renamed) == split_of(p)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        lab_dataset("valid", 3)
    with pytest.raises(ValueError, match="levels"):
        generate_problems(3, 0, levels=(5,))
    with pytest.raises(ValueError, match="n must"):
        generate_problems(-1, 0)
    with pytest.raises(ValueError, match="n must"):
        lab_dataset("train", -1)


def test_verify():
    assert verify("3*4=12\n\\boxed{19}", "19")
    assert verify("\\boxed{3} wait \\boxed{ 19 }", "19")
    assert not verify("\\boxed{19} no, \\boxed{20}", "19")
    assert not verify("19", "19")
    assert not verify("\\boxed{19.0}", "19")  # exact, not numeric
    assert not verify("\\boxed{19", "19")
    for p in generate_problems(20, 5):
        assert verify(p["solution"], p["answer"])
        assert not verify(p["solution"], str(int(p["answer"]) + 1))


def test_prompts_and_exposure():
    sol = "2*3=6\n4*5=20\n6+20=26\n26+1=27\n\\boxed{27}"
    assert expose_reference(sol, 1.0) == sol
    assert expose_reference(sol, 0.0) == "\\boxed{27}"
    assert expose_reference(sol, 0.5) == "2*3=6\n4*5=20\n\\boxed{27}"
    assert expose_reference(sol, 0.74) == "2*3=6\n4*5=20\n\\boxed{27}"
    assert expose_reference(sol, 0.75) == "2*3=6\n4*5=20\n6+20=26\n\\boxed{27}"
    assert expose_reference(sol, 0.25, mode="chars") == "2*3=6\n4\n\\boxed{27}"  # 7 of 28 chars
    with pytest.raises(ValueError, match="alpha"):
        expose_reference(sol, 1.5)
    assert student_messages("P?") == [{"role": "user", "content": "P?"}]
    (msg,) = teacher_messages("P?", "\\boxed{1}")
    assert msg["content"] == f"P?\n\nReference solution:\n\\boxed{{1}}\n\n{DEFAULT_INSTRUCTION}"
