"""Exposure policies for adaptive-teacher-exposure self-distillation. Depends on torch only."""

from typing import Any

from atesd.controller.base import ExposurePolicy, FixedExposure, check_stats
from atesd.controller.baselines import RandomExposure, ScheduledExposure
from atesd.controller.beta import BetaExposureController, OneStepBetaController
from atesd.controller.reward import decision_reward

SPECS = ("adaptive", "adaptive-onestep", "full", "fixed:<a>", "random", "random:<lo>:<hi>",
         "linear:<start>:<end>", "cosine:<start>:<end>", "schedule:linear:<start>:<end>")


def build(spec: str, seed: int = 0, **kwargs: Any) -> ExposurePolicy:
    """Parse an exposure spec (see SPECS). `seed` goes to the policies that sample; `kwargs` go to the
    constructor (e.g. build('adaptive', hold=8, lookahead=24); build('random', hold=8)). Schedules read
    training progress from observe(), so they need no total_steps."""
    s = spec.strip().lower()
    parts = s.split(":")

    def nums(n: int) -> list[float]:
        if len(parts) != n + 1:
            raise ValueError(f"exposure spec {spec!r}: expected {n} number(s) after {parts[0]!r}")
        try:
            return [float(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"exposure spec {spec!r}: not a number in {parts[1:]}") from None

    if s == "adaptive":
        return BetaExposureController(seed=seed, **kwargs)
    if s in ("adaptive-onestep", "adaptive-one-step"):
        return OneStepBetaController(seed=seed, **kwargs)
    if s == "full":
        return FixedExposure(1.0, **kwargs)
    if parts[0] == "fixed":
        return FixedExposure(*nums(1), **kwargs)
    if parts[0] == "random":
        return RandomExposure(*(nums(2) if len(parts) > 1 else ()), seed=seed, **kwargs)
    if parts[0] == "schedule" and len(parts) > 1:
        parts = parts[1:]
    if parts[0] in ScheduledExposure.KINDS:
        start, end = nums(2)
        return ScheduledExposure(start, end, kind=parts[0], **kwargs)
    raise ValueError(f"unknown exposure spec {spec!r}; expected one of {', '.join(SPECS)}")


__all__ = [
    "BetaExposureController", "ExposurePolicy", "FixedExposure", "OneStepBetaController", "RandomExposure",
    "ScheduledExposure", "build", "check_stats", "decision_reward",
]
