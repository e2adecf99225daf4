"""The lab's plug-in: its task (data, prompts, verifier, evaluation protocol, the tiny model it ships).

The engine reaches it only by name, through ``engine.task.PLUGINS`` (``lab`` -> ``TASK`` here), exactly as it
reaches a user's ``--task package.module:TASK``; nothing in the engine's core imports this package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from atesd.engine.lab import TINY_MODEL_DIR
from atesd.engine.lab.prompts import TEMPLATES
from atesd.engine.lab.task import LEVELS, lab_dataset, verify
from atesd.engine.options import at_least, option
from atesd.engine.task import EvalProtocol, Task

# Greedy, short: the lab's answers are one line, and greedy accuracy is what the shipped model was measured by.
GREEDY = EvalProtocol(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=128, n_samples=1, thinking=False)


def _levels(v: str) -> str | None:
    try:
        levels = [int(x) for x in str(v).split(",") if x.strip()]
    except ValueError:
        return "must be a comma list of integers"
    return None if levels and all(lv in LEVELS for lv in levels) else "must name levels among 1,2,3,4"


@dataclass(frozen=True)
class Options:
    """The lab's own options: ``--task-option size=2000 --task-option levels=1,2`` (YAML: ``task_options:``)."""

    size: int = option(2000, "training problems the lab generates", check=at_least(1))
    levels: str = option("1,2", "comma list of difficulty levels (1-4) used for training and held-out evaluation",
                         sep=",", check=_levels)


def level_tuple(levels: str | Sequence[int] | None) -> tuple[int, ...]:
    """``'1,2'`` or ``(1, 2)`` -> ``(1, 2)``; None or empty: every level."""
    if isinstance(levels, str):
        levels = [int(x) for x in levels.split(",") if x.strip()]
    return tuple(levels) if levels else LEVELS


def dataset(split: str, n: int | None = None, seed: int = 0, *, size: int = Options.size,
            levels: str | Sequence[int] | None = None) -> list[dict]:
    """``n`` unique problems (None: ``size``, the training amount) of the 'train', 'val' or 'test' split (disjoint
    by their numbers), of ``levels`` (None: every level)."""
    return lab_dataset(split, size if n is None else n, seed, levels=level_tuple(levels))


TASK = Task(name="lab", templates=TEMPLATES, eval=GREEDY, verify=verify, dataset=dataset,
            models={"tiny": TINY_MODEL_DIR}, options=Options)


def val_dataset(split: str, n: int | None = None, seed: int = 0, **options) -> list[dict]:
    """As :func:`dataset`, with the held-out split the engine evaluates on (``test``) served from ``val``."""
    return dataset("val" if split == "test" else split, n, seed, **options)


# ``--eval-benchmarks lab-val``: the lab evaluated on its val split, where settings are chosen (never on test).
VAL_TASK = dataclasses.replace(TASK, name="lab-val", dataset=val_dataset)
