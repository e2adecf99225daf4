"""CPU threads on a machine other jobs share (engine.train, engine.evaluate, engine.sweep, engine.reproduce).

Two things made CPU runs several times slower than one thread whenever other processes were busy:

- OpenMP's default wait policy spins: a torch thread that waits for its siblings burns its core (libgomp spins
  for 300000 iterations before it sleeps). With more threads than free cores, the spinning threads take the cores
  the working ones need. ``GOMP_SPINCOUNT=1000`` bounds the spin; the main job (20 steps, 100 evaluation problems,
  2 threads on 2 cores; ``python -m benchmarks.bench_busy --policies``, RESULTS section 16) took, idle / under two
  competing matmul processes: default spin 19.9 / 225 s, spin 10000 22.0 / 163 s, **spin 1000 23.4 / 74 s**,
  ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) 40.5 / 81 s, one thread 21.3 / 66 s. libgomp reads these when it
  loads, i.e. when torch is imported, so :func:`bounded_spin` must run first: ``engine/__init__.py`` calls it (only
  if torch is not loaded yet and neither variable is set).
- torch takes one thread per core whatever the load. :func:`choose_threads` takes the free cores instead:
  ``max(1, round(cores - load))`` with ``load`` the cores other processes keep busy, sampled from /proc/stat over
  0.3 s when the command starts (the 1-minute load average trails a load that just started or ended by a minute:
  right after another job ended it made an idle 2-core machine look half busy).

``--threads N`` (or ``OMP_NUM_THREADS``) overrides the choice; the choice and its reason go to ``run.log``. The
command lines (engine.train, engine.evaluate, engine.reproduce) apply it; code calling the library keeps its own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator


def bounded_spin() -> None:
    """``GOMP_SPINCOUNT=1000`` unless the user chose a wait policy, before torch (and its libgomp) loads."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat (Linux); None where it cannot be read."""
    busy = total = 0
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                    continue
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError):
        return None
    return (busy, total) if total else None


def busy_cores(window: float = 0.3) -> float | None:
    """Cores other processes keep busy now: the busy share of this process's cores over ``window`` seconds (this
    process sleeps meanwhile), times their number. None where /proc/stat is unavailable. Unlike the load average,
    which trails by a minute, it sees a load that just started or just ended."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    time.sleep(window)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def choose_threads(requested: int | None = None, *, n_cores: int | None = None,
                   load: float | None = None) -> tuple[int, str]:
    """(threads, why): ``requested`` (--threads), else ``OMP_NUM_THREADS``, else the free cores:
    ``max(1, round(cores - load))`` with ``load`` the busy cores sampled now (:func:`busy_cores`), or the 1-minute
    load average where that cannot be read."""
    if requested:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    n_cores = n_cores or cores()
    what = "busy"
    if load is None:
        load = busy_cores()
        if load is None:
            what = "load average"
            try:
                load = os.getloadavg()[0]
            except (AttributeError, OSError):
                load = 0.0
    free = max(1, min(n_cores, round(n_cores - load)))
    return free, f"{n_cores} cores, {what} {load:.1f}"


_reason: str | None = None  # why the command line chose the current thread count (None: whoever set it)


def configure(requested: int | None = None, processes: int = 1) -> int:
    """Set torch's intra-op threads for a command-line run on the CPU (``processes``: ranks sharing this machine,
    which split the free cores); returns the count. Libraries calling :func:`engine.run.train` keep theirs."""
    import torch

    global _reason
    n, _reason = choose_threads(requested)
    if not requested and processes > 1:
        n, _reason = max(1, n // processes), f"{_reason}, shared by {processes} processes"
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def configured(requested: int | None = None, processes: int = 1) -> Iterator[int]:
    """:func:`configure` for the length of one command; the caller's thread count comes back after, so a command
    run in-process (a test, a sweep job) leaves the process's numerics as it found them."""
    import torch

    global _reason
    saved, saved_reason = torch.get_num_threads(), _reason
    try:
        yield configure(requested, processes)
    finally:
        torch.set_num_threads(saved)
        _reason = saved_reason


def describe() -> str:
    """One line for run.log: the thread count, why, and the OpenMP wait policy."""
    import torch

    if "OMP_WAIT_POLICY" in os.environ:
        policy = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY'] or '(empty)'}"
    elif "GOMP_SPINCOUNT" in os.environ:
        policy = f"spin {os.environ['GOMP_SPINCOUNT']} iterations, then sleep (GOMP_SPINCOUNT)"
    else:
        policy = "default (spinning)"
    return f"CPU threads: {torch.get_num_threads()} ({_reason or 'as set by the caller'}); OpenMP wait policy {policy}"
