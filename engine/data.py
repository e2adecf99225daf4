"""Training rows (problem, solution, optional answer) from a task that generates its problems (the lab), a
local json/jsonl/parquet file or a hub dataset.

Bad rows (missing fields, no boxed answer, over-long) are skipped and counted, never fatal.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from atesd.engine.exposure import last_boxed
from atesd.engine.task import get_task, is_task

DEFAULT_DATASET = "siyanzhao/Openthoughts_math_30k_opsd"


def load_rows(
    source: str,
    *,
    split: str = "train",
    problem_column: str = "problem",
    solution_column: str = "solution",
    answer_column: str = "answer",
    lab_size: int = 2000,
    lab_levels: tuple[int, ...] = (1, 2, 3, 4),
    seed: int = 0,
) -> list[dict]:
    """Raw rows as dicts with keys problem / solution / answer (answer may be None). A ``source`` naming a
    task that generates its problems (``engine.task``; e.g. ``lab``) draws ``lab_size`` rows of its split."""
    task = get_task(source) if is_task(source) else None
    if task is not None and task.dataset is not None:
        raw = task.dataset(split, lab_size, seed, levels=lab_levels)
    else:
        import datasets

        try:
            if os.path.isfile(source):
                ext = os.path.splitext(source)[1].lower()
                kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(ext)
                if kind is None:
                    raise ValueError(f"data file {source!r}: expected .json, .jsonl or .parquet")
                raw = datasets.load_dataset(kind, data_files=source, split="train")
            else:
                raw = _load_hub(datasets, source, split)
        except ValueError:
            raise
        except Exception as e:  # hub/network/format errors: name the dataset
            raise RuntimeError(f"could not load dataset {source!r} (split {split!r}): {e}") from e
    return [
        {"problem": r.get(problem_column), "solution": r.get(solution_column), "answer": r.get(answer_column)}
        for r in raw
    ]


def _load_hub(datasets, source: str, split: str):
    """load_dataset from the hub; with no network, straight from the local cache (no minute of retries)."""
    import contextlib

    import huggingface_hub.constants as hub

    from atesd.engine.models import hub_unreachable

    offline = hub_unreachable()
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    with contextlib.ExitStack() as stack:
        if offline:
            datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
            stack.callback(
                lambda: (
                    setattr(datasets.config, "HF_HUB_OFFLINE", saved[0]),
                    setattr(hub, "HF_HUB_OFFLINE", saved[1]),
                )
            )
        return datasets.load_dataset(source, split=split)


def clean_rows(rows: list[dict]) -> tuple[list[dict], Counter]:
    """Keep rows with a problem, a solution and a boxed answer; answer from the last \\boxed{} when absent."""
    kept, skipped = [], Counter()
    for r in rows:
        problem, solution = r.get("problem"), r.get("solution")
        if (
            not isinstance(problem, str)
            or not problem.strip()
            or not isinstance(solution, str)
            or not solution
        ):
            skipped["missing_field"] += 1
            continue
        boxed = last_boxed(solution)
        if boxed is None:
            skipped["no_boxed_answer"] += 1
            continue
        answer = r.get("answer")
        kept.append(
            {
                "problem": problem,
                "solution": solution,
                "answer": str(answer) if answer not in (None, "") else boxed,
            }
        )
    return kept, skipped


class DataStream:
    """Endless shuffled pass over rows; the permutation of epoch e is drawn from (seed, e), so the position
    (epoch, index) is the whole state and resuming continues exactly."""

    def __init__(self, n: int, seed: int) -> None:
        if n == 0:
            raise ValueError("no usable training rows (all were skipped or the dataset is empty)")
        self.n, self.seed, self.epoch, self.index = n, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> int:
        if self.index >= self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        i = int(self._order[self.index])
        self.index += 1
        return i

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()
