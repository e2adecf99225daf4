"""``torchrun`` entry point of the distributed tests: ``engine.train``'s CLI plus test-only faults chosen by the
environment (nothing here is reachable from the engine itself):

    ATESD_TEST_KILL="<rank>:<step>"        that rank SIGKILLs itself as it begins that step
    ATESD_TEST_RANK_ARGS="<rank>:<flags>"  that rank gets extra flags (ranks launched with different configs)
"""

import os
import shlex
import signal
import sys

import torch

from atesd.engine import train as train_mod


def main() -> None:
    torch.set_num_threads(1)
    argv, rank = sys.argv[1:], int(os.environ["RANK"])
    if spec := os.environ.get("ATESD_TEST_RANK_ARGS"):
        who, flags = spec.split(":", 1)
        if int(who) == rank:
            argv += shlex.split(flags)
    if spec := os.environ.get("ATESD_TEST_KILL"):
        who, at = map(int, spec.split(":"))
        if who == rank:
            step = train_mod.Trainer.step

            def dying_step(self):
                if self.step_no + 1 == at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return step(self)

            train_mod.Trainer.step = dying_step
    train_mod.main(argv)


if __name__ == "__main__":
    main()
