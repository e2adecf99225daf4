"""The interface every exposure policy implements; the engine calls exactly these methods.

    alpha = policy.exposure()   # float in [0, 1] for the next student step
    policy.observe(stats)       # after every student step; stats: loss, mismatch, confidence, credit, progress
                                # (floats), probe_nll optional
    policy.state_dict() / policy.load_state_dict(d)
    policy.metrics()            # latest diagnostics for logging
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ExposurePolicy:
    """Base class: a policy that decides how much reference reasoning the teacher sees."""

    def exposure(self) -> float:
        raise NotImplementedError

    def observe(self, stats: Mapping[str, float]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


class FixedExposure(ExposurePolicy):
    """Always the same alpha; FixedExposure(1.0) is OPSD's full-reference teacher."""

    def __init__(self, alpha: float = 1.0) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def exposure(self) -> float:
        return self.alpha

    def metrics(self) -> dict[str, float]:
        return {"alpha": self.alpha}
