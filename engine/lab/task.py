"""Synthetic multi-step arithmetic word problems with step-by-step solutions and an exact verifier.

A problem is a start amount followed by 1-6 operations (``gets 7`` = +7, ``loses 3`` = -3, ``doubles them``
= *2, ``triples them`` = *3). Its solution is one line per operation (``12+7=19``) then ``\\boxed{answer}``.
Levels grow in the number of steps and in the size of the numbers:

    level 1: 1 step, start 1-20, operands 1-9, no multiplication
    level 2: 2 steps, start 10-60, operands 1-20, at most one multiplication
    level 3: 3-4 steps, start 10-99, operands 1-99, multiplications allowed
    level 4: 5-6 steps, start 100-999, operands 10-99, multiplications allowed

Splits are disjoint by construction: a problem belongs to ``test`` iff a hash of its text falls in one tenth
of the hash space, so train and test never share a problem text whatever their sizes and seeds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

LEVELS = (1, 2, 3, 4)
_NAMES = ("Ann", "Bob", "Cy", "Dee", "Eli", "Fay", "Gus", "Ida", "Jo", "Kim", "Lu", "Max", "Ned", "Ola")
_PRONOUN = {n: ("She" if n in {"Ann", "Dee", "Fay", "Ida", "Kim", "Lu", "Ola"} else "He") for n in _NAMES}
_ITEMS = ("pens", "eggs", "cards", "coins", "books", "shells", "stamps", "beads", "nuts", "apples")
_ADD = ("gets {n}", "buys {n}", "finds {n}")
_SUB = ("loses {n}", "sells {n}", "gives away {n}")
_MUL = {2: "doubles them", 3: "triples them"}
# (steps choices, start range, operand range, max multiplications)
_SPEC = {
    1: ((1,), (1, 20), (1, 9), 0),
    2: ((2,), (10, 60), (1, 20), 1),
    3: ((3, 4), (10, 99), (1, 99), 2),
    4: ((5, 6), (100, 999), (10, 99), 3),
}
_MAX_VALUE = 9999  # keeps every intermediate value at most 4 digits


def _make(rng: random.Random, level: int) -> dict:
    steps_choices, (lo, hi), (olo, ohi), max_mul = _SPEC[level]
    steps = rng.choice(steps_choices)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = start = rng.randint(lo, hi)
    phrases, lines, n_mul = [], [], 0
    for _ in range(steps):
        kinds = ["+", "-"] + (["*"] if n_mul < max_mul and value * 2 <= _MAX_VALUE else [])
        kind = rng.choice(kinds)
        if kind == "-" and value < max(olo, 1):
            kind = "+"
        if kind == "+" and value + olo > _MAX_VALUE:
            kind = "-"
        if kind == "+":
            n = rng.randint(olo, min(ohi, _MAX_VALUE - value))
            new, phrase = value + n, rng.choice(_ADD).format(n=n)
        elif kind == "-":
            n = rng.randint(olo, min(ohi, value))
            new, phrase = value - n, rng.choice(_SUB).format(n=n)
        else:
            n = 3 if value * 3 <= _MAX_VALUE and rng.random() < 0.4 else 2
            new, phrase, n_mul = value * n, _MUL[n], n_mul + 1
        lines.append(f"{value}{kind}{n}={new}")
        phrases.append(phrase)
        value = new
    if len(phrases) == 1:
        acts = phrases[0]
    else:
        acts = ", ".join(phrases[:-1]) + ", then " + phrases[-1]
    problem = f"{name} has {start} {item}. {_PRONOUN[name]} {acts}. How many now?"
    answer = str(value)
    return {
        "problem": problem,
        "solution": "\n".join(lines + [f"\\boxed{{{answer}}}"]),
        "answer": answer,
        "level": level,
    }


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(x) for x in levels)
    if not levels or any(x not in _SPEC for x in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
    return levels


def generate_problems(n: int, seed: int, levels: Sequence[int] = LEVELS) -> list[dict]:
    """``n`` problems cycling through ``levels`` (item i has level ``levels[i % len(levels)]``).

    Deterministic for ``seed``; duplicates are allowed (use :func:`lab_dataset` for unique, split problems).
    Each dict: ``problem`` str, ``solution`` str (lines, last ``\\boxed{..}``), ``answer`` str, ``level`` int.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = _check_levels(levels)
    rng = random.Random(f"lab-task-{seed}")
    return [_make(rng, levels[i % len(levels)]) for i in range(n)]


def is_test_problem(problem: str) -> bool:
    """Split membership: ``test`` iff the sha1 of the problem text is 0 mod 10."""
    return int(hashlib.sha1(problem.encode()).hexdigest()[:8], 16) % 10 == 0


def lab_dataset(split: str, n: int, seed: int = 0, levels: Sequence[int] = LEVELS) -> list[dict]:
    """``n`` unique problems of ``split`` ('train' or 'test'), balanced over ``levels``; disjoint splits."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = _check_levels(levels)
    want_test = split == "test"
    rng = random.Random(f"lab-{split}-{seed}")
    out: list[dict] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        level = levels[len(out) % len(levels)]
        ex = _make(rng, level)
        tries += 1
        if tries > 200 * (n + 10):
            raise RuntimeError(f"could not find {n} unique {split} problems for levels {levels}")
        if is_test_problem(ex["problem"]) != want_test or ex["problem"] in seen:
            continue
        seen.add(ex["problem"])
        out.append(ex)
    return out


def verify(completion: str, answer: str) -> bool:
    """Exact check: the content of the completion's last ``\\boxed{}`` (stripped) equals ``answer``."""
    from atesd.engine.grading import extract_boxed

    pred = extract_boxed(completion)
    return pred is not None and pred.strip() == str(answer).strip()
