"""The evaluation sets that are not a task's own problems: the paper's hub benchmarks and local JSON Lines files.

:data:`BENCHMARKS` names the hub benchmarks (``--eval-benchmarks`` of ``engine.train``, ``--benchmarks`` of
``engine.evaluate``); :func:`load_benchmark` and :func:`load_jsonl` read them as rows ``{"problem", "answer"}``,
failing with one line that names the dataset or the file.
"""

from __future__ import annotations

import logging
import os

from atesd.engine.data import read_records
from atesd.engine.errors import DataError

# name -> (hub dataset ids tried in order, split, problem column, answer column)
BENCHMARKS: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "aime24": (("HuggingFaceH4/aime_2024",), "train", "problem", "answer"),
    "aime25": (("yentinglin/aime_2025", "math-ai/aime25"), "train", "problem", "answer"),
    "hmmt25": (("MathArena/hmmt_feb_2025",), "train", "problem", "answer"),
}
log = logging.getLogger("engine.evaluate")


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_benchmark(name: str) -> list[dict]:
    """Rows ``{"problem", "answer"}`` of a hub benchmark in :data:`BENCHMARKS`; fails naming the dataset."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    ids, _, pcol, acol = BENCHMARKS[name]
    import datasets
    from datasets import load_dataset

    if not _hub_reachable():
        # Cache only: otherwise datasets retries the hub for ~30 s per dataset id before failing.
        import huggingface_hub.constants as hub_constants

        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    errors = []
    for ds_id in ids:
        try:
            dd = load_dataset(ds_id)
        except Exception as e:  # noqa: BLE001 - offline, missing, renamed: try the next id, then report all
            errors.append(f"{ds_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        split = next((s for s in ("test", "train") if s in dd), next(iter(dd)))
        ds = dd[split]
        cols = {c.lower(): c for c in ds.column_names}
        if pcol not in cols or acol not in cols:
            errors.append(f"{ds_id}: columns {ds.column_names} lack {pcol!r}/{acol!r}")
            continue
        return [{"problem": r[cols[pcol]], "answer": str(r[cols[acol]]), "source": ds_id} for r in ds]
    raise RuntimeError(
        f"could not load benchmark {name!r} (tried {', '.join(ids)}; no network or cache? give local .jsonl files "
        "with problem/answer instead, or --eval-benchmarks '' to evaluate nothing):\n  " + "\n  ".join(errors)
    )


def load_jsonl(path: str) -> list[dict]:
    """Local jsonl with ``problem`` and ``answer`` fields per line. Unreadable lines and rows lacking a field are
    skipped and counted (logged); a file with no usable row is a DataError naming it and the counts."""
    records, skipped = read_records(path)
    rows = [
        {"problem": str(r["problem"]), "answer": str(r["answer"]), "level": r.get("level")}
        for r in records
        if r.get("problem") is not None and r.get("answer") is not None
    ]
    missing = len(records) - len(rows)
    if not rows:
        keys = sorted({k for r in records for k in r})[:8]
        raise DataError(
            f"{path}: no usable row: {missing} row(s) lack 'problem'/'answer' (keys seen: {', '.join(keys)})"
            + (f"; skipped lines: {skipped.describe()}" if skipped.lines else "")
        )
    if missing:
        log.warning("%s: skipped %d row(s) lacking 'problem'/'answer'", path, missing)
    return rows
