"""``torchrun`` entry point of the distributed tests: ``engine.train``'s CLI plus test-only faults chosen by the
environment (nothing here is reachable from the engine itself):

    ATESD_TEST_KILL="<rank>:<step>"        that rank SIGKILLs itself as it begins that step
    ATESD_TEST_SIGTERM="<rank>:<step>"     that rank gets SIGTERM as it saves that step (after the step's stop check)
    ATESD_TEST_SLOW_SAVE="<rank>:<step>"   that rank's save of that step lasts until it gets SIGTERM (a slow disk)
    ATESD_TEST_RANK_ARGS="<rank>:<flags>"  that rank gets extra flags (ranks launched with different configs)
"""

import os
import shlex
import signal
import sys
import time

import torch

from atesd.engine import train as train_mod


def _fault_step(name: str, rank: int) -> int | None:
    """The step of the fault ``name="<rank>:<step>"`` if it targets this rank."""
    spec = os.environ.get(name)
    if not spec:
        return None
    who, at = map(int, spec.split(":"))
    return at if who == rank else None


def _around_save(at: int, before=None, after=None) -> None:
    """Trainer.save runs ``before()`` / ``after()`` around itself when it saves step ``at``."""
    save = train_mod.Trainer.save

    def wrapped(self):
        if self.step_no == at and before:
            before()
        path = save(self)
        if self.step_no == at and after:
            after()
        return path

    train_mod.Trainer.save = wrapped


def _wait_for_sigterm(limit_s: float = 60.0) -> None:
    """A save that lasts until SIGTERM arrives (a slow disk while the launcher stops the rank): the handler in
    force (the training loop's) runs as usual, then the save returns."""
    handler, seen = signal.getsignal(signal.SIGTERM), []

    def note(signum, frame):
        seen.append(signum)
        if callable(handler):
            handler(signum, frame)

    signal.signal(signal.SIGTERM, note)
    deadline = time.monotonic() + limit_s
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    torch.set_num_threads(1)
    argv, rank = sys.argv[1:], int(os.environ["RANK"])
    if spec := os.environ.get("ATESD_TEST_RANK_ARGS"):
        who, flags = spec.split(":", 1)
        if int(who) == rank:
            argv += shlex.split(flags)
    if (kill_at := _fault_step("ATESD_TEST_KILL", rank)) is not None:
        step = train_mod.Trainer.step

        def dying_step(self):
            if self.step_no + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self)

        train_mod.Trainer.step = dying_step
    if (term_at := _fault_step("ATESD_TEST_SIGTERM", rank)) is not None:
        _around_save(term_at, before=lambda: os.kill(os.getpid(), signal.SIGTERM))
    if (slow_at := _fault_step("ATESD_TEST_SLOW_SAVE", rank)) is not None:
        _around_save(slow_at, after=_wait_for_sigterm)
    train_mod.main(argv)


if __name__ == "__main__":
    main()
