"""Non-learning baselines: uniform-random exposure held for K steps, and progress-driven schedules."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

from atesd.controller.base import ExposurePolicy, check_stats
from atesd.controller.presets import resolve


class RandomExposure(ExposurePolicy):
    """alpha ~ Uniform[low, high], one draw held for `hold` steps. hold=None takes the adaptive controller's K
    for the same `preset`, `total_steps` and `decisions` (controller.presets.resolve), so the comparison isolates
    learning. Seeded, checkpointable."""

    def __init__(self, low: float = 0.0, high: float = 1.0, hold: int | None = None, seed: int = 0,
                 total_steps: int | None = None, preset: str | None = None, decisions: int | None = None) -> None:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
        if hold is None:
            hold = resolve(preset, total_steps, decisions=decisions)["hold"]
        if hold < 1:
            raise ValueError(f"hold must be >= 1, got {hold}")
        self.low, self.high, self.hold = float(low), float(high), int(hold)
        self._rng = random.Random(seed)
        self._alpha: float | None = None
        self._in_window = 0
        self._last = math.nan  # the latest alpha handed out, for metrics() (which must not sample)

    def exposure(self) -> float:
        if self._alpha is None:
            self._alpha = self._rng.uniform(self.low, self.high)
            self._in_window = 0
        self._last = self._alpha
        return self._alpha

    def observe(self, stats: Mapping[str, float]) -> None:
        self.exposure()
        self._in_window += 1
        if self._in_window >= self.hold:
            self._alpha = None

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()  # plain lists: storable without pickle
        return {"rng": [version, list(internal), gauss], "alpha": self._alpha, "in_window": self._in_window,
                "last": self._last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rng.setstate(_as_rng_state(state["rng"]))
        self._alpha = None if state["alpha"] is None else float(state["alpha"])
        self._in_window = int(state["in_window"])
        self._last = float(state["last"])

    def metrics(self) -> dict[str, float]:
        return {"alpha": self._last}


class ScheduledExposure(ExposurePolicy):
    """alpha = start + (end - start) * f(p), p = the latest `progress` passed to observe (0 before the first
    step), f(p) = p ('linear') or (1 - cos(pi p)) / 2 ('cosine'). Reading progress instead of counting
    steps means the schedule needs no total_steps and survives resume / changed budgets; the cost is a
    one-step lag (step t uses progress of step t-1)."""

    KINDS = ("linear", "cosine")

    def __init__(self, start: float = 1.0, end: float = 0.5, kind: str = "linear") -> None:
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            raise ValueError(f"start and end must be in [0, 1], got start={start}, end={end}")
        if kind not in self.KINDS:
            raise ValueError(f"schedule kind must be one of {self.KINDS}, got {kind!r}")
        self.start, self.end, self.kind = float(start), float(end), kind
        self._progress = 0.0

    def exposure(self) -> float:
        p = self._progress
        f = p if self.kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * p))
        return min(1.0, max(0.0, self.start + (self.end - self.start) * f))

    def observe(self, stats: Mapping[str, float]) -> None:
        p = check_stats(stats, keys=("progress",))["progress"]
        if math.isfinite(p):  # a bad progress value keeps the previous one
            self._progress = min(1.0, max(0.0, p))

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self._progress}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._progress = float(state["progress"])

    def metrics(self) -> dict[str, float]:
        return {"alpha": self.exposure()}


def _as_rng_state(s: Any) -> tuple:
    """random.Random state after a torch.save/load or JSON round trip (lists instead of tuples)."""
    version, internal, gauss = s
    return (int(version), tuple(int(x) for x in internal), gauss)
