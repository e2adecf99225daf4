"""On-policy self-distillation with adaptive teacher exposure: ``python -m engine.train --help``.

The command line's entry point: the flags (``engine/invocation.py``) into a run (``engine/run.py: train``) of the
trainer's steps (``engine/trainer.py: Trainer``), every error one line with its exit code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

from atesd.engine import checkpoint, distributed, threads
from atesd.engine.errors import RankLost, UsageError
from atesd.engine.invocation import parse_invocation
from atesd.engine.options import fail, one_line
from atesd.engine.run import Interrupted, train
from atesd.engine.trainer import Trainer

__all__ = ["Trainer", "cli", "main", "train"]


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the run's summary.json content (``{"run_dir", "finished": False}`` if stopped
    early by --stop-after). Errors: bad input is one line on stderr and exit code 2; Ctrl-C exit code 130 naming
    the last checkpoint; anything else (a bug) one line and exit code 1, its traceback in run.log (and on the
    terminal with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    rank = distributed.launched_rank()
    who = f"[rank {rank}] " if distributed.launched_world_size() > 1 else ""
    terminal = logging.StreamHandler()  # the terminal gets warnings; run.log gets everything
    terminal.setLevel(logging.WARNING)
    terminal.setFormatter(logging.Formatter(f"{who}%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[terminal])  # (a no-op when logging is set up already)
    try:
        inv = parse_invocation(argv)
        on_cpu = distributed.device_of(inv.config.device).type == "cpu"
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        with threads.configured(inv.config.threads, local_ranks, follow=True) if on_cpu else contextlib.nullcontext():
            run_dir = train(inv.config, inv.resume)
    except UsageError as e:
        if debug:
            raise
        distributed.record_error(e)  # torchrun's failure summary then names the cause
        fail(f"{who}error: {one_line(e)}", 2)
    except KeyboardInterrupt as e:
        if debug:
            raise
        fail(who + (one_line(e) if isinstance(e, Interrupted) else "interrupted"), 130)
    except RankLost as e:
        if debug:
            raise
        distributed.record_error(e)
        fail(f"{who}error: {one_line(e)}", 1)
    except Exception as e:
        if debug:
            raise
        distributed.record_error(e)
        where = getattr(e, "run_log", None)
        more = f"the traceback is in {where}" if where else "run with --debug for the traceback"
        fail(f"{who}error: {type(e).__name__}: {one_line(e)} ({more})", 1)
    if rank > 0:
        return {"run_dir": run_dir, "rank": rank}
    print(f"run directory: {run_dir}")
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        newest = checkpoint.checkpoints(run_dir)
        at = f" at {os.path.basename(newest[-1])}" if newest else ""
        print(f"stopped before the last step, as --stop-after asked{at}; continue with --resume {run_dir}")
        return {"run_dir": run_dir, "finished": False}
    with open(path) as fh:
        return json.load(fh)


def cli() -> None:
    """Console-script entry point (``atesd-train``): :func:`main` without its return value."""
    main()


if __name__ == "__main__":
    main()
