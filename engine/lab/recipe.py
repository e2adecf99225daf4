"""The lab's plug-in: its task (data, prompts, verifier, evaluation protocol, the tiny model it ships).

The engine reaches it only by name, through ``engine.task.PLUGINS`` (``lab`` -> ``TASK`` here), exactly as it
reaches a user's ``--task package.module:TASK``; nothing in the engine's core imports this package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from atesd.engine.lab import TINY_MODEL_DIR
from atesd.engine.lab.prompts import TEMPLATES
from atesd.engine.lab.task import LEVELS, lab_dataset, verify
from atesd.engine.task import EvalProtocol, Task

# Greedy, short: the lab's answers are one line, and greedy accuracy is what the shipped model was measured by.
GREEDY = EvalProtocol(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=128, n_samples=1, thinking=False)


def dataset(split: str, size: int, seed: int = 0, levels: Sequence[int] | None = None) -> list[dict]:
    """``size`` unique problems of the 'train', 'val' or 'test' split (disjoint by their numbers)."""
    return lab_dataset(split, size, seed, levels=tuple(levels) if levels else LEVELS)


TASK = Task(name="lab", templates=TEMPLATES, eval=GREEDY, verify=verify, dataset=dataset,
            models={"tiny": TINY_MODEL_DIR})


def val_dataset(split: str, size: int, seed: int = 0, levels: Sequence[int] | None = None) -> list[dict]:
    """As :func:`dataset`, with the held-out split the engine evaluates on (``test``) served from ``val``."""
    return dataset("val" if split == "test" else split, size, seed, levels)


# ``--eval-benchmarks lab-val``: the lab evaluated on its val split, where settings are chosen (never on test).
VAL_TASK = dataclasses.replace(TASK, name="lab-val", dataset=val_dataset)
