"""The interface every exposure policy implements; the engine calls exactly these methods.

    alpha = policy.exposure()   # float in [0, 1] for the next student step (idempotent until observe)
    policy.observe(stats)       # after every student step; stats: loss, mismatch, confidence, progress
                                # (floats); credit, probe_nll, probe_accuracy optional (see `uses_credit`,
                                # `wants`)
    policy.wants(key)           # whether the step needs `probe_accuracy` / `probe_nll` measured
    policy.finish()             # end of training: score/flush whatever is still pending
    policy.state_dict() / policy.load_state_dict(d)
    policy.metrics()            # latest diagnostics for logging

A policy that holds decisions returns the same alpha for K consecutive steps (one `exposure()` +
`observe()` pair per step), then samples a new one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from atesd.controller.presets import LEGACY, SIGNALS, resolve, wants_measurement

REQUIRED_KEYS = ("loss", "mismatch", "confidence", "progress")
OPTIONAL_KEYS = ("credit", "probe_nll", "probe_accuracy")


def check_stats(stats: Mapping[str, Any], keys: tuple[str, ...] = REQUIRED_KEYS) -> dict[str, float]:
    """Validate one step's stats. Missing keys or non-numbers raise ValueError; non-finite values are kept
    as float('nan') so the caller can skip them. `progress` must lie in [0, 1]. Returns a plain float dict
    holding `keys` plus any optional key present."""
    if not isinstance(stats, Mapping):
        raise ValueError(f"stats must be a mapping of floats, got {type(stats).__name__}")
    missing = [k for k in keys if k not in stats]
    if missing:
        raise ValueError(f"stats is missing required key(s) {missing}; got keys {sorted(stats)}")
    out: dict[str, float] = {}
    for k in (*keys, *(k for k in OPTIONAL_KEYS if k not in keys)):
        if k not in stats or stats[k] is None:
            continue
        v = stats[k]
        try:
            v = float(v)  # also accepts 0-d tensors / numpy scalars
        except (TypeError, ValueError):
            raise ValueError(f"stats[{k!r}] must be a float, got {type(v).__name__}: {v!r}") from None
        out[k] = v if math.isfinite(v) else math.nan
    p = out.get("progress")
    if p is not None and math.isfinite(p) and not -1e-6 <= p <= 1 + 1e-6:
        raise ValueError(f"stats['progress'] must be in [0, 1], got {p}")
    return out


class ExposurePolicy:
    """Base class: a policy that decides how much reference reasoning the teacher sees.

    `uses_credit`: whether observe() needs the teacher-grounded credit (the engine computes it only then,
    since it costs a teacher pass over every reference solution)."""

    uses_credit = False

    def exposure(self) -> float:
        raise NotImplementedError

    def wants(self, key: str) -> bool:
        """Whether the next observe() needs the optional stat ``key``: ``probe_accuracy`` (the verified accuracy on
        a fixed probe set, measured before this step's update; costs the engine a decode) or ``probe_nll`` (the
        student's NLL of fixed reference solutions, measured after this step's update; one forward pass). Asked
        once per step, before the step's observe()."""
        return False

    def observe(self, stats: Mapping[str, float]) -> None:
        pass

    def finish(self) -> None:
        """End of training: learning policies score and use every decision still pending."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


class FixedExposure(ExposurePolicy):
    """Always the same alpha; FixedExposure(1.0) is OPSD's full-reference teacher.

    Given a ``signal`` explicitly ('accuracy' or 'probe_nll'), it also asks (:meth:`wants`) for that measurement
    where an adaptive controller with the same signal, ``preset``, ``total_steps``, ``decisions``, ``hold`` and
    ``probe_points`` would (``presets.wants_measurement``), and never acts on it: its run can then be scored
    afterwards as that controller would score its decisions (``engine.reward_audit``). Measuring does not change
    training."""

    def __init__(self, alpha: float = 1.0, signal: str | None = None, hold: int | None = None,
                 total_steps: int | None = None, preset: str | None = None, decisions: int | None = None,
                 probe_points: int | None = None) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if signal is not None and signal not in SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(map(repr, SIGNALS))}, got {signal!r}")
        self.alpha = float(alpha)
        r = resolve(preset, total_steps, decisions=decisions, hold=hold, probe_points=probe_points)
        self.hold, points = int(r["hold"]), int(r["probe_points"])
        if self.hold < 1 or points < 1:
            raise ValueError(f"hold and probe_points must be >= 1, got {self.hold}, {points}")
        # the engine builds the accuracy probe for 'accuracy'
        self.config = {"signal": signal, "hold": self.hold, "probe_points": points}
        self._steps = 0  # steps observed: the next step's place in its K-step window is _steps % K

    def exposure(self) -> float:
        return self.alpha

    def wants(self, key: str) -> bool:
        return wants_measurement(key, self.config["signal"], self._steps % self.hold, self.hold,
                                 self.config["probe_points"])

    def observe(self, stats: Mapping[str, float]) -> None:
        self._steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "steps": self._steps, "hold": self.hold,
                "probe_points": self.config["probe_points"]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` left off, on its measuring schedule: its hold (budget-sized K may differ after
        --steps changed) and probe points (a state written before they existed measured once per decision)."""
        self.alpha = float(state["alpha"])
        self._steps = int(state.get("steps", 0))  # states written before measuring: nothing to align
        self.hold = int(state.get("hold", self.hold))
        self.config = {**self.config, "hold": self.hold,
                       "probe_points": int(state.get("probe_points", LEGACY["probe_points"]))}

    def metrics(self) -> dict[str, float]:
        return {"alpha": self.alpha}
