"""Synthetic "bags" word problems with expert reference solutions and an exact verifier.

A problem lists ``g`` groups of items and asks for the total. A group either states its size (``4 bags of 7``)
or names a standard container, whose size is a fact of the lab's world that the problem never states
(``3 cartons``: a carton holds 12; see ``CONTAINERS``)::

    Ann has pens in 3 cartons, 4 bags of 7 and 5 boxes of 9. How many pens in all?

The lab's reference solutions are an expert's: one product per group in the order the problem lists them,
then every addition at once (the ``"terse"`` style)::

    3*12=36
    4*7=28
    5*9=45
    36+28+45=109
    \\boxed{109}

The shipped student was pre-trained (``engine/lab/pretrain.py``) in a world in which every container comes in
two sizes (``PRETRAIN_SIZES``: a carton holds 10 or 12), so it cannot know which one the lab's world uses, and
on its own it solves problems the ``"stepwise"`` way, one addition per line (``36+28=64`` then ``64+45=109``);
it has never written several additions in one line. A reference's first lines thus carry a fact the student
lacks, within its reach (a product); its last line, from level 2 on (three groups), a step beyond it.

Levels grow in the number of groups; bags: 2-9 of them, stated sizes 2-12; a group names a container with
probability ``CONTAINER_RATE``:

    level 1: 2 groups    level 2: 3 groups    level 3: 4 groups    level 4: 5 groups

Splits are disjoint by construction and by content, not only by text: a problem's split is a hash of its groups
(bag counts and sizes, in order), one tenth ``test``, one tenth ``val`` (for choosing settings), the rest
``train``; two problems with the same numbers and different names or containers always share a split.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence

LEVELS = (1, 2, 3, 4)
SPLITS = ("train", "val", "test")
GROUPS = {1: 2, 2: 3, 3: 4, 4: 5}  # level -> number of groups
BAG_COUNTS = (2, 9)
BAG_SIZES = (2, 12)
# The lab world's standard containers and how many items each holds; in the pre-training world, either size.
CONTAINERS = {"cartons": 12, "crates": 9, "tins": 8, "cases": 6, "trays": 5, "racks": 4}
PRETRAIN_SIZES = {
    "cartons": (10, 12), "crates": (9, 7), "tins": (6, 8), "cases": (6, 4), "trays": (5, 3), "racks": (2, 4)
}  # fmt: skip
CONTAINER_RATE = 0.4
STYLES = ("terse", "stepwise", "shuffled")
REFERENCE_STYLE = "terse"  # the lab's references; the student's own style is stepwise
_NAMES = ("Ann", "Bob", "Cy", "Dee", "Eli", "Fay", "Gus", "Ida", "Jo", "Kim", "Lu", "Max", "Ned", "Ola")
_ITEMS = ("pens", "eggs", "cards", "coins", "books", "shells", "stamps", "beads", "nuts", "apples")
_BAGS = ("bags", "boxes", "jars")


def solution_lines(groups: Sequence[tuple[int, int]], style: str, rng: random.Random | None = None) -> list[str]:
    """Reasoning lines (no boxed answer): one product per group in order, then the additions in ``style``:
    ``"terse"`` (all in one line, in order), ``"stepwise"`` (one per line, in order) or ``"shuffled"`` (one per
    line, in an order drawn from ``rng``)."""
    products = [a * b for a, b in groups]
    lines = [f"{a}*{b}={p}" for (a, b), p in zip(groups, products)]
    if style == "terse":
        return lines + ["+".join(map(str, products)) + f"={sum(products)}"]
    if style == "stepwise":
        order = list(range(len(products)))
    elif style == "shuffled":
        if rng is None:
            raise ValueError("style 'shuffled' needs an rng")
        order = rng.sample(range(len(products)), len(products))
    else:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    total = products[order[0]]
    for i in order[1:]:
        lines.append(f"{total}+{products[i]}={total + products[i]}")
        total += products[i]
    return lines


def continue_solution(groups: Sequence[tuple[int, int]], reference: list[str], k: int) -> list[str]:
    """The first ``k`` lines of ``reference`` (reasoning lines), then the rest the stepwise way: the products
    not yet written, then the products not yet added, one per line in order, onto the running total."""
    products = [a * b for a, b in groups]
    lines = list(reference[:k])
    lines += [f"{a}*{b}={p}" for (a, b), p in list(zip(groups, products))[len(lines) :]]
    added: Counter[int] = Counter()
    total = None
    for line in lines[len(products) :]:
        terms, result = line.split("=")
        values = [int(t) for t in terms.split("+")]
        added.update(values if total is None else values[1:])
        total = int(result)
    for p in products:
        if added[p]:
            added[p] -= 1
        elif total is None:
            total = p
        else:
            lines.append(f"{total}+{p}={total + p}")
            total += p
    return lines


def _make(
    rng: random.Random,
    level: int,
    *,
    container_rate: float = CONTAINER_RATE,
    world: str = "lab",
    style: str = REFERENCE_STYLE,
) -> dict:
    """One problem with its solution in ``style``; ``world`` ``"lab"`` (containers of ``CONTAINERS`` size) or
    ``"pretrain"`` (either size of ``PRETRAIN_SIZES``, drawn per group)."""
    if world not in ("lab", "pretrain"):
        raise ValueError(f"world must be 'lab' or 'pretrain', got {world!r}")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    groups, phrases, n_containers = [], [], 0
    for _ in range(GROUPS[level]):
        count = rng.randint(*BAG_COUNTS)
        if rng.random() < container_rate:
            container = rng.choice(list(CONTAINERS))
            size = CONTAINERS[container] if world == "lab" else rng.choice(PRETRAIN_SIZES[container])
            phrase = f"{count} {container}"
            n_containers += 1
        else:
            size = rng.randint(*BAG_SIZES)
            phrase = f"{count} {rng.choice(_BAGS)} of {size}"
        groups.append((count, size))
        phrases.append(phrase)
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    problem = f"{name} has {item} in {listed}. How many {item} in all?"
    answer = str(sum(a * b for a, b in groups))
    return {
        "problem": problem,
        "solution": "\n".join(solution_lines(groups, style, rng) + [f"\\boxed{{{answer}}}"]),
        "answer": answer,
        "level": level,
        "groups": groups,
        "containers": n_containers,
    }


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(x) for x in levels)
    if not levels or any(x not in GROUPS for x in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
    return levels


def generate_problems(n: int, seed: int, levels: Sequence[int] = LEVELS) -> list[dict]:
    """``n`` lab problems cycling through ``levels`` (item i has level ``levels[i % len(levels)]``), any split.

    Deterministic for ``seed``; duplicates are allowed (use :func:`lab_dataset` for unique, split problems).
    Each dict: ``problem`` str, ``solution`` str (reference, last line ``\\boxed{..}``), ``answer`` str,
    ``level`` int, ``groups`` list of (count, size) pairs, ``containers`` the number of groups naming a container.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = _check_levels(levels)
    rng = random.Random(f"lab-task-{seed}")
    return [_make(rng, levels[i % len(levels)]) for i in range(n)]


def split_of(problem: dict) -> str:
    """``test``, ``val`` or ``train``: sha1 of the problem's groups, mod 10 (0 test, 1 val, else train)."""
    key = ";".join(f"{a}x{b}" for a, b in problem["groups"])
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def lab_dataset(split: str, n: int, seed: int = 0, levels: Sequence[int] = LEVELS) -> list[dict]:
    """``n`` unique lab problems of ``split`` ('train', 'val' or 'test'), balanced over ``levels``.

    The splits never share a problem's numbers (see the module docstring), whatever ``n`` and ``seed``;
    within one call no two problems share their numbers either.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = _check_levels(levels)
    rng = random.Random(f"lab-{split}-{seed}")
    out: list[dict] = []
    seen: set[tuple] = set()
    tries = 0
    while len(out) < n:
        level = levels[len(out) % len(levels)]
        ex = _make(rng, level)
        tries += 1
        if tries > 200 * (n + 10):
            raise RuntimeError(f"could not find {n} unique {split} problems for levels {levels}")
        key = tuple(ex["groups"])
        if key in seen or split_of(ex) != split:
            continue
        seen.add(key)
        out.append(ex)
    return out


def verify(completion: str, answer: str) -> bool:
    """Exact check: the content of the completion's last ``\\boxed{}`` (stripped) equals ``answer``."""
    from atesd.engine.grading import extract_boxed

    pred = extract_boxed(completion)
    return pred is not None and pred.strip() == str(answer).strip()
