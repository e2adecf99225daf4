"""Exposure policies for adaptive-teacher-exposure self-distillation. Depends on torch only."""

from .base import ExposurePolicy, FixedExposure


def build(spec: str) -> ExposurePolicy:
    """Parse an exposure spec: 'full' (alpha=1, OPSD) or 'fixed:<alpha>'. More kinds land with the controller."""
    spec = spec.strip().lower()
    if spec == "full":
        return FixedExposure(1.0)
    if spec.startswith("fixed:"):
        return FixedExposure(float(spec.split(":", 1)[1]))
    raise ValueError(f"unknown exposure spec {spec!r}")


__all__ = ["ExposurePolicy", "FixedExposure", "build"]
