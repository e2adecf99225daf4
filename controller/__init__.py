"""Exposure policies for adaptive-teacher-exposure self-distillation. Depends on torch only."""

import inspect
from typing import Any

from atesd.controller.base import ExposurePolicy, FixedExposure, check_stats
from atesd.controller.baselines import RandomExposure, ScheduledExposure
from atesd.controller.beta import BetaExposureController, OneStepBetaController
from atesd.controller.presets import DEFAULT_SIGNAL, DEFAULTS, PRESETS, SIGNALS, resolve
from atesd.controller.reward import decision_reward

SPECS = ("adaptive", "adaptive-onestep", "full", "fixed:<a>", "random", "random:<lo>:<hi>",
         "linear:<start>:<end>", "cosine:<start>:<end>", "schedule:linear:<start>:<end>")


def build(spec: str, seed: int = 0, strict: bool = True, **kwargs: Any) -> ExposurePolicy:
    """Parse an exposure spec (see SPECS). `seed` goes to the policies that sample; `kwargs` go to the
    constructor (e.g. build('adaptive', total_steps=1000); build('adaptive', preset='paper');
    build('adaptive', hold=8, lookahead=24); build('random', hold=8)). A setting given as None takes the preset's
    value, sized from `total_steps` (controller.presets). With strict=False, settings the chosen policy does not
    take are dropped (the engine passes every controller setting and total_steps whatever the spec: `hold`,
    `preset`, `total_steps` reach RandomExposure; those and `signal` reach FixedExposure, which measures a signal
    named explicitly where the adaptive controller would, for the reward audit). Schedules read training
    progress from observe(), so they need no total_steps."""
    s = spec.strip().lower()
    parts = s.split(":")

    def make(cls: type, *args: Any, **extra: Any) -> ExposurePolicy:
        kw = {**kwargs, **extra}
        if not strict:
            names = set(inspect.signature(cls.__init__).parameters)
            if cls is OneStepBetaController:
                names |= set(inspect.signature(BetaExposureController.__init__).parameters) - {"one_step"}
            kw = {k: v for k, v in kw.items() if k in names}
        return cls(*args, **kw)

    def nums(n: int) -> list[float]:
        if len(parts) != n + 1:
            raise ValueError(f"exposure spec {spec!r}: expected {n} number(s) after {parts[0]!r}")
        try:
            return [float(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"exposure spec {spec!r}: not a number in {parts[1:]}") from None

    if s == "adaptive":
        return make(BetaExposureController, seed=seed)
    if s in ("adaptive-onestep", "adaptive-one-step"):
        return make(OneStepBetaController, seed=seed)
    if s == "full":
        return make(FixedExposure, 1.0)
    if parts[0] == "fixed":
        return make(FixedExposure, *nums(1))
    if parts[0] == "random":
        return make(RandomExposure, *(nums(2) if len(parts) > 1 else ()), seed=seed)
    if parts[0] == "schedule" and len(parts) > 1:
        parts = parts[1:]
    if parts[0] in ScheduledExposure.KINDS:
        start, end = nums(2)
        return make(ScheduledExposure, start, end, kind=parts[0])
    raise ValueError(f"unknown exposure spec {spec!r}; expected one of {', '.join(SPECS)}")


__all__ = [
    "DEFAULTS", "DEFAULT_SIGNAL", "PRESETS", "SIGNALS", "BetaExposureController", "ExposurePolicy", "FixedExposure",
    "OneStepBetaController", "RandomExposure", "ScheduledExposure", "build", "check_stats", "decision_reward",
    "resolve",
]
