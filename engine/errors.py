"""The engine's user-facing errors: a problem with what the user gave (a flag, a file, a model, a run directory).

The command-line entry points print these as one line, ``error: <message>``, and exit with code 2; anything
else is a bug and keeps its traceback (shown with ``--debug``, always written to the run's ``run.log``).
A message names the flag or the file and says what is wrong with it.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


class DataError(UsageError):
    """A data file or dataset that yields no usable row (or cannot be read); names the file and the counts."""


class RankLost(RuntimeError):
    """Under torchrun, another rank died or stalled during a collective: printed as one line, exit code 1 (not a
    bug of this rank; the launcher's summary names the rank that failed)."""
