"""Input validation shared by the reference and the fused op: one place, one wording for every error."""

from __future__ import annotations

import math

import torch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    temperature: float,
    clip: float | None,
    beta: float,
    mask: torch.Tensor | None,
    reduction: str,
) -> None:
    """Raise ValueError/TypeError naming the first problem found in the arguments of linear_kl."""
    hs, ht, w = student_hidden, teacher_hidden, weight
    for name, t in (("student_hidden", hs), ("teacher_hidden", ht), ("weight", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if hs.dim() < 1 or hs.shape != ht.shape:
        raise ValueError(
            f"student_hidden {tuple(hs.shape)} and teacher_hidden {tuple(ht.shape)} must have the same shape [..., H]"
        )
    if w.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(w.shape)}")
    if w.shape[1] != hs.shape[-1]:
        raise ValueError(f"hidden size mismatch: hidden states have H={hs.shape[-1]}, weight is {tuple(w.shape)}")
    if w.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V=0)")
    if teacher_weight is not None:
        if teacher_weight.shape != w.shape:
            raise ValueError(
                f"teacher_weight {tuple(teacher_weight.shape)} must have the same [V, H] as weight {tuple(w.shape)}"
            )
        if teacher_weight.dtype != w.dtype:
            raise TypeError(f"teacher_weight dtype {teacher_weight.dtype} differs from weight dtype {w.dtype}")
    if hs.dtype != ht.dtype or hs.dtype != w.dtype:
        raise TypeError(
            f"dtypes must match: student_hidden {hs.dtype}, teacher_hidden {ht.dtype}, weight {w.dtype}"
        )
    for name, b in (("bias", bias), ("teacher_bias", teacher_bias)):
        if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0]):
            raise ValueError(f"{name} must be [V]=[{w.shape[0]}], got {tuple(b.shape)}")
    devices = {t.device for t in (hs, ht, w, teacher_weight, bias, teacher_bias, mask) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if mask is not None and mask.shape != hs.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the hidden states' leading shape {tuple(hs.shape[:-1])}"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0 and not math.isnan(clip)):
        raise ValueError(f"clip must be None (no clipping) or a number > 0, got {clip!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
