"""CPU threads on a machine other jobs share (engine.train, engine.evaluate, engine.sweep, engine.reproduce).

Two things made CPU runs several times slower than one thread whenever other processes were busy:

- torch takes one thread per core whatever the load. :func:`choose_threads` takes the free cores instead:
  ``max(1, round(cores - load))`` with ``load`` the cores other processes keep busy, sampled from /proc/stat over
  0.3 s when the command starts (the 1-minute load average trails a load that just started or ended by a minute:
  right after another job ended it made an idle 2-core machine look half busy).
- OpenMP's default wait policy spins: a torch thread that waits for its siblings burns its core (libgomp spins
  300000 iterations before it sleeps), so with more threads than free cores the spinning threads take the cores the
  working ones need. Spinning is also what makes 2 threads fast on an idle machine, and sleeping at once
  (``OMP_WAIT_POLICY=PASSIVE``) or soon (``GOMP_SPINCOUNT``) costs more there than it saves under load; on the main
  job at 2 threads (20 steps, 100 evaluation problems; idle / under two competing matmul processes; RESULTS
  section 16): default spin 19.9 / 225 s, spin 10000 22.0 / 163 s, spin 1000 23.4 / 74 s, passive 40.5 / 81 s,
  one thread 21.3 / 66 s; on the full main job spin 1000 took 85 s idle against 48 s (default) and 66 s (one
  thread). So the policy stays torch's, and the thread count follows the load instead: :class:`LoadFollower`,
  called between training steps, measures the cores other processes keep busy (the machine's busy time from
  /proc/stat minus this process's own CPU time) and moves the count to the free cores when two samples in a row
  agree (logged in run.log).

``--threads N`` (or ``OMP_NUM_THREADS``) overrides the choice and fixes the count; the choice and its reason go to
``run.log``. The command lines (engine.train, engine.evaluate, engine.reproduce) apply it; code calling the library
keeps its own. A count that changes mid-run changes the order of floating-point sums: a run that must repeat bit for
bit (an exact resume) fixes it with ``--threads``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator


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


class LoadFollower:
    """Between steps: the thread count moves to the free cores while the load changes (a command-line run that chose
    its threads itself; ``--threads``/``OMP_NUM_THREADS`` fix the count). A sample spans at least ``interval``
    seconds; the count changes when two samples in a row want the same new one."""

    def __init__(self, processes: int = 1, interval: float = 5.0):
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = set(range(os.cpu_count() or 1))
        self.processes, self.interval = processes, interval
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last, self.wanted = self._sample(), None

    def _sample(self) -> tuple[float, float, float] | None:
        """(wall s, machine busy CPU s over our cores, this process's CPU s)."""
        times = _cpu_times(self.cpus)
        if times is None:
            return None
        own = os.times()
        return time.monotonic(), times[0] / self.tick, own.user + own.system

    def want(self, others: float) -> int:
        """The thread count for ``others`` cores kept busy by other processes."""
        n_cores = len(self.cpus)
        return max(1, max(1, min(n_cores, round(n_cores - others))) // self.processes)

    def __call__(self) -> str | None:
        """Check the load (cheap when the last sample is recent); returns the log line when the count changed."""
        import torch

        if self.last is None:
            return None
        now = self._sample()
        if now is None or now[0] - self.last[0] < self.interval:
            return None
        wall = now[0] - self.last[0]
        others = max(0.0, (now[1] - self.last[1]) / wall - (now[2] - self.last[2]) / wall)
        self.last = now
        n, current = self.want(others), torch.get_num_threads()
        if n == current:
            self.wanted = None
            return None
        if self.wanted != n:  # one sample is not a trend
            self.wanted = n
            return None
        global _reason
        torch.set_num_threads(n)
        self.wanted = None
        _reason = f"following the load: other processes keep {others:.1f} of {len(self.cpus)} cores busy"
        return f"CPU threads {current} -> {n} ({_reason})"


_follower: LoadFollower | None = None  # set while a command line's own thread choice is in force


def follow_load() -> str | None:
    """Called between training steps: :class:`LoadFollower` when the command line chose the threads, else nothing."""
    return _follower() if _follower is not None else None


def configure(requested: int | None = None, processes: int = 1, follow: bool = False) -> int:
    """Set torch's intra-op threads for a command-line run on the CPU (``processes``: ranks sharing this machine,
    which split the free cores); returns the count. ``follow``: a training run, whose count then follows the load
    between steps (:func:`follow_load`). Libraries calling :func:`engine.run.train` keep theirs."""
    import torch

    global _reason, _follower
    n, _reason = choose_threads(requested)
    if not requested and processes > 1:
        n, _reason = max(1, n // processes), f"{_reason}, shared by {processes} processes"
    torch.set_num_threads(n)
    chosen_here = not requested and _reason is not None and not _reason.startswith("OMP_NUM_THREADS")
    _follower = LoadFollower(processes) if follow and chosen_here else None
    return n


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """The caller's thread count (and this module's choice and follower) come back on exit: a command run in-process
    (a test, a sweep job) leaves the process's numerics as it found them."""
    import torch

    global _reason, _follower
    saved = torch.get_num_threads(), _reason, _follower
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        _reason, _follower = saved[1], saved[2]


@contextlib.contextmanager
def configured(requested: int | None = None, processes: int = 1, follow: bool = False) -> Iterator[int]:
    """:func:`configure` for the length of one command (:func:`kept`)."""
    with kept():
        yield configure(requested, processes, follow)


def describe() -> str:
    """One line for run.log: the thread count, why, and the OpenMP wait policy."""
    import torch

    if "OMP_WAIT_POLICY" in os.environ:
        policy = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY'] or '(empty)'}"
    elif "GOMP_SPINCOUNT" in os.environ:
        policy = f"spin {os.environ['GOMP_SPINCOUNT']} iterations, then sleep (GOMP_SPINCOUNT)"
    else:
        policy = "torch's default (waiting threads spin)"
    if _follower is not None:
        policy += "; the count follows the load between steps"
    return f"CPU threads: {torch.get_num_threads()} ({_reason or 'as set by the caller'}); OpenMP wait policy {policy}"
