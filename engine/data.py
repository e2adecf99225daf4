"""Training rows (problem, solution, optional answer) from a task that generates its problems, a
local json/jsonl/parquet file or a hub dataset.

Bad rows (missing fields, no boxed answer, over-long) are skipped and counted, never fatal. Local JSON / JSON
Lines files are read by :func:`read_records`, which skips unreadable lines (not UTF-8, not JSON, not an object)
and counts them by reason with their line numbers; a source with no usable row is a :class:`DataError` naming
the file and the counts.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atesd.engine.errors import DataError
from atesd.engine.exposure import last_boxed
from atesd.engine.task import get_task, is_task
from atesd.engine.task import task_options as task_options_of

log = logging.getLogger("engine.data")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def source_problem(source: str | None) -> str | None:
    """Why ``source`` cannot be a data source (checked before anything loads), or None: a local file must exist
    and be .json/.jsonl/.parquet; a task's name and hub ids (``name`` or ``org/name``) pass (they fail
    when loaded)."""
    from atesd.engine.models import looks_like_path

    if source is None or is_task(source):
        return None
    path = os.path.expanduser(source)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        return "is a directory; give a .json, .jsonl or .parquet file, a task's name or a hub dataset id"
    if os.path.isfile(path):
        return None if ext in LOCAL_FORMATS else "expected a .json, .jsonl or .parquet file"
    if ext in LOCAL_FORMATS or looks_like_path(source):
        return "no such file"
    return None


@dataclass
class SkippedLines:
    """Lines of a local file that gave no record, by reason ('not_utf8', 'bad_json', 'not_an_object'), with
    their 1-based line numbers."""

    path: str
    lines: dict[str, list[int]] = field(default_factory=dict)
    total: int = 0

    def add(self, reason: str, line: int) -> None:
        self.lines.setdefault(reason, []).append(line)

    def counts(self) -> dict[str, int]:
        return {reason: len(lines) for reason, lines in self.lines.items()}

    def describe(self, first: int = 5) -> str:
        """'bad_json 2 (lines 3, 9), not_utf8 1 (line 5)'."""
        parts = []
        for reason, lines in self.lines.items():
            shown = ", ".join(map(str, lines[:first])) + (", ..." if len(lines) > first else "")
            parts.append(f"{reason} {len(lines)} (line{'s' if len(lines) > 1 else ''} {shown})")
        return ", ".join(parts)


def read_records(path: str) -> tuple[list[dict], SkippedLines]:
    """Records of a local .json (one array or mapping of columns, else JSON Lines) or .jsonl file, tolerating
    bad lines: a line that is not UTF-8, not JSON or not a JSON object is skipped and counted by reason with its
    line number (and logged). A file with no usable record is a DataError naming it and the counts."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise DataError(f"data file {path!r}: {e.strerror or e}") from None
    skipped = SkippedLines(path)
    records: list[dict] | None = None
    if path.lower().endswith(".json"):
        records = _whole_json(raw, path)
    if records is None:
        records = []
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            skipped.total += 1
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.add("not_utf8", number)
                continue
            except json.JSONDecodeError:
                skipped.add("bad_json", number)
                continue
            if isinstance(row, dict):
                records.append(row)
            else:
                skipped.add("not_an_object", number)
    if not records:
        counts = f"; skipped {skipped.describe()}" if skipped.lines else ""
        raise DataError(f"data file {path!r} has no usable row ({skipped.total} non-empty lines{counts})")
    if skipped.lines:
        log.warning(
            "data file %s: skipped %d of %d lines: %s",
            path,
            sum(skipped.counts().values()),
            skipped.total,
            skipped.describe(),
        )
    return records, skipped


def _whole_json(raw: bytes, path: str) -> list[dict] | None:
    """The records of a file holding one JSON document (array of objects, or {column: [values]}), else None."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(doc, list):
        records = [r for r in doc if isinstance(r, dict)]
        if len(records) < len(doc):
            skipped = len(doc) - len(records)
            log.warning("data file %s: skipped %d array item(s) that are not JSON objects", path, skipped)
        return records
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        n = max(len(v) for v in doc.values())
        return [{k: (v[i] if i < len(v) else None) for k, v in doc.items()} for i in range(n)]
    return [doc] if isinstance(doc, dict) else None


def load_rows(
    source: str,
    *,
    split: str = "train",
    problem_column: str = "problem",
    solution_column: str = "solution",
    answer_column: str = "answer",
    seed: int = 0,
    size: int | None = None,
    task_options: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Raw rows as dicts with keys problem / solution / answer (answer may be None). A ``source`` naming a
    task that generates its problems (``engine.task``) draws ``size`` rows of its split (None: the task's own
    training amount), with the options it declares taken from ``task_options`` (a run's: the rest at their
    declared defaults; None: none passed, the task's dataset decides)."""
    task = get_task(source) if is_task(source) else None
    if task is not None and task.dataset is not None:
        options = {} if task_options is None else task_options_of(task, task_options)
        raw = task.dataset(split, size, seed, **options)
    elif os.path.isfile(os.path.expanduser(source)) or source_problem(source):
        problem = source_problem(source)
        if problem:
            raise DataError(f"data file {source!r}: {problem}")
        path = os.path.expanduser(source)
        if LOCAL_FORMATS[os.path.splitext(path)[1].lower()] == "json":
            raw, _ = read_records(path)
        else:
            raw = _load_parquet(path)
    else:
        import datasets

        try:
            raw = _load_hub(datasets, source, split)
        except Exception as e:  # hub/network/format errors: name the dataset
            first = (str(e).strip().splitlines() or [""])[0]
            from atesd.engine.models import hub_unreachable

            hint = (" (the hub cannot be reached from this machine and the dataset is not in the local cache: give a "
                    "local .json/.jsonl/.parquet with --data, or download it where there is a network)"
                    if hub_unreachable() else "")
            raise DataError(
                f"could not load dataset {source!r} (split {split!r}): {type(e).__name__}: {first}{hint}"
            ) from e
    return [
        {"problem": r.get(problem_column), "solution": r.get(solution_column), "answer": r.get(answer_column)}
        for r in raw
    ]


def _load_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except Exception as e:  # not parquet, truncated, unreadable
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"data file {path!r}: not a readable parquet file: {type(e).__name__}: {first}") from None


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
