"""Argument handling shared by the reference and the fused op: one place, one meaning, one wording for every error.

:func:`prepare` validates the arguments of ``linear_kl`` and turns them into what both implementations compute on:

- DTensor weights and biases (FSDP2's sharded parameters) are gathered with ``full_tensor`` (differentiable; the
  gradient comes back as a ``Partial("avg")`` contribution, i.e. reduce-scattered and averaged over the ranks like
  every other FSDP2 gradient). Hidden states must be plain (local) tensors.
- The teacher head may have its own width (``teacher_weight [Vt, Ht]``, ``teacher_hidden [..., Ht]``) and a
  vocabulary padded beyond the student's (``Vt >= V``): its first V rows are the shared vocabulary and the padded
  rows are dropped, so the teacher's softmax runs over the student's V entries.
- Dtypes are cast internally: the student's hidden states to the student head's dtype, the teacher's to the teacher
  head's (a [N, H] copy at most; the [V, H] heads are never copied).
- ``mask`` (bool, 0/1 integers or float weights) and ``labels`` (Liger's / HF's convention: ``ignore_index``
  marks the rows that do not count) combine into one per-row weight vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    from torch.distributed.tensor import DTensor, Partial
except ImportError:  # pragma: no cover  (torch built without distributed)
    DTensor = Partial = None


@dataclass
class Prepared:
    """Flattened, validated inputs: hs [N, H], ht [N, Ht], w [V, H], wt [V, Ht] or None, biases [V] or None,
    weights [N] fp32 or None (None: every row counts with weight 1), ``lead`` the leading shape."""

    hs: torch.Tensor
    ht: torch.Tensor
    w: torch.Tensor
    wt: torch.Tensor | None
    bs: torch.Tensor | None
    bt: torch.Tensor | None
    weights: torch.Tensor | None
    lead: torch.Size


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def gather_dtensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's full value as a plain tensor (all-gather); its gradient is each rank's contribution, averaged
    over the ranks by a reduce-scatter (as FSDP2 averages gradients). Anything else is returned as is."""
    if not _is_dtensor(t):
        return t
    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _row_weights(mask, labels, ignore_index: int, lead: torch.Size) -> torch.Tensor | None:
    """[N] fp32 weights from the mask and the labels, or None when neither is given."""
    weights = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the hidden states' leading shape "
                             f"{tuple(lead)}")
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            # an integer mask is most often token ids passed by mistake (mask=labels): it must hold 0/1 only.
            # One host read (a sync on GPU); pass a bool or float mask to avoid it. Not checkable while tracing.
            if not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("an integer mask must hold only 0 and 1; for token labels with -100 at the "
                                 "positions that do not count, pass labels= (and ignore_index=) instead")
        if mask.is_floating_point() and mask.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool((mask < 0).any()):  # no host sync on CPU; elsewhere reduce_loss makes such a row NaN
                raise ValueError("mask weights must be >= 0 (a negative weight would reverse that token's "
                                 "gradient)")
        weights = mask.reshape(-1).to(torch.float32)
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"labels must be an integer tensor of token ids, got {got}")
        if labels.shape != lead:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal the hidden states' leading shape "
                             f"{tuple(lead)} (shift them yourself: hidden[..., :-1, :] with labels[..., 1:])")
        counted = (labels.reshape(-1) != ignore_index).to(torch.float32)
        weights = counted if weights is None else weights * counted
    return weights


def prepare(
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
    labels: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    num_items_in_batch,
) -> Prepared:
    """Validate (ValueError/TypeError naming the first problem) and normalise the arguments of linear_kl."""
    for name, t in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if _is_dtensor(t):
            raise TypeError(f"{name} is a DTensor: pass this rank's local tensor (.to_local()); only the head "
                            "(weight, teacher_weight, biases) may be a DTensor, and it is gathered")
    weight, teacher_weight = gather_dtensor(weight), gather_dtensor(teacher_weight)
    bias, teacher_bias = gather_dtensor(bias), gather_dtensor(teacher_bias)
    hs, ht, w = student_hidden, teacher_hidden, weight
    for name, t in (("student_hidden", hs), ("teacher_hidden", ht), ("weight", w)):
        _check_tensor(name, t)
    if hs.dim() < 1 or ht.dim() < 1 or hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(hs.shape)} and teacher_hidden {tuple(ht.shape)} must be [..., H] "
                         "and [..., Ht] with the same leading shape")
    if w.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(w.shape)}")
    if w.shape[1] != hs.shape[-1]:
        raise ValueError(f"hidden size mismatch: student_hidden has H={hs.shape[-1]}, weight is {tuple(w.shape)}")
    if w.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V=0)")
    V = w.shape[0]
    if teacher_weight is None:
        if ht.shape[-1] != hs.shape[-1]:
            raise ValueError(f"teacher_hidden has width {ht.shape[-1]} but shares the student's head (H="
                             f"{hs.shape[-1]}): pass the teacher's own head as teacher_weight [Vt, Ht]")
    else:
        _check_tensor("teacher_weight", teacher_weight)
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != ht.shape[-1]:
            raise ValueError(f"teacher_weight {tuple(teacher_weight.shape)} must be [Vt, Ht] with Ht="
                             f"{ht.shape[-1]} (teacher_hidden's width)")
        if teacher_weight.shape[0] < V:
            raise ValueError(f"teacher_weight has Vt={teacher_weight.shape[0]} rows, fewer than the student's "
                             f"V={V}: the teacher's vocabulary must cover the student's (Vt >= V)")
    bias_len = {"bias": V, "teacher_bias": V if teacher_weight is None else teacher_weight.shape[0]}
    for name, b in (("bias", bias), ("teacher_bias", teacher_bias)):
        if b is not None:
            _check_tensor(name, b)
            if b.dim() != 1 or b.shape[0] != bias_len[name]:
                raise ValueError(f"{name} must be [{'V' if bias_len[name] == V else 'Vt'}]=[{bias_len[name]}], "
                                 f"got {tuple(b.shape)}")
    tensors = (hs, ht, w, teacher_weight, bias, teacher_bias, mask, labels)
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0 and not math.isnan(clip)):
        raise ValueError(f"clip must be None (no clipping) or a number > 0, got {clip!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f"num_items_in_batch replaces the 'mean' denominator; it cannot be used with "
                             f"reduction={reduction!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)) or not (
            num_items_in_batch >= 0
        ):
            raise ValueError(f"num_items_in_batch must be a number >= 0 or a tensor, got {num_items_in_batch!r}")

    lead = hs.shape[:-1]
    weights = _row_weights(mask, labels, ignore_index, lead)
    wt, bt = teacher_weight, teacher_bias
    if wt is not None and wt.shape[0] > V:  # padded teacher vocabulary: keep the shared first V rows (views)
        wt = wt[:V]
        bt = None if bt is None else bt[:V]
    hs = hs.reshape(-1, hs.shape[-1])
    ht = ht.reshape(-1, ht.shape[-1])
    hs = hs if hs.dtype == w.dtype else hs.to(w.dtype)  # differentiable cast: the gradient returns in hs's dtype
    teacher_dtype = (w if wt is None else wt).dtype
    ht = ht if ht.dtype == teacher_dtype else ht.to(teacher_dtype)
    return Prepared(hs, ht, w, wt, bias, bt, weights, lead)


def reduce_loss(token_loss: torch.Tensor, weights: torch.Tensor | None, reduction: str, num_items_in_batch,
                lead: torch.Size) -> torch.Tensor:
    """The documented reduction of per-row losses [N] fp32: rows of weight 0 are excluded (exactly 0, even when
    their loss is NaN), a negative weight makes its row NaN (bad input, never a reversed gradient), 'mean' divides
    by sum(weights) (or num_items_in_batch): 0 / 0 is 0 (nothing counted), a nonzero sum over a zero denominator
    is NaN (a denominator that counts nothing while tokens count)."""
    if weights is None:
        weighted = token_loss
    else:
        zero = torch.zeros((), device=token_loss.device)
        weighted = torch.where(weights != 0, token_loss * weights, zero)
        weighted = torch.where(weights < 0, torch.full((), float("nan"), device=token_loss.device), weighted)
    if reduction == "none":
        return weighted.reshape(lead)
    total = weighted.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=total.device).reshape(()).to(torch.float32)
    elif weights is None:
        denominator = torch.tensor(float(token_loss.numel()), device=total.device)
    else:
        denominator = weights.sum()
    # 0 / 0 is 0 (nothing counted), x / 0 is NaN; a NaN weight makes the denominator NaN and the loss NaN
    safe = torch.where(denominator == 0, torch.ones((), device=total.device), denominator)
    at_zero = torch.where(total == 0, torch.zeros((), device=total.device),
                          torch.full((), float("nan"), device=total.device))
    return torch.where(denominator == 0, at_zero, total / safe)
