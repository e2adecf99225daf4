"""Argument handling of the top-k op, shared by its reference and the fused op (one meaning, one wording).

Everything the top-k op has in common with the full op - the student's hidden states, the head and its bias (a
DTensor head gathered), temperature, clip, beta, the mask / labels / ignore_index row weights, the reduction and
num_items_in_batch - goes through :func:`atesd.kernels._checks.prepare`, with a zero-stride stand-in for the teacher
hidden states it expects (the teacher here is its log-probabilities). Only the teacher's ids and log-probs are
checked here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atesd.kernels._checks import FLOAT_DTYPES, prepare

_LOGPROB_DTYPES = FLOAT_DTYPES + (torch.float64,)


@dataclass
class PreparedTopK:
    """Flattened, validated inputs: hs [N, H] (in w's dtype), w [V, H], bs [V] or None, weights [N] fp32 or None,
    ``lead`` the leading shape; ids [N, K] int64, distinct and in [0, V) on every row (rows that do not count, and
    invalid rows under torch.compile, hold 0..K-1); logprobs [N, K] fp32 (non-finite values and invalid rows NaN,
    rows that do not count 0); ``live`` [N] bool, the rows that count (None: all)."""

    hs: torch.Tensor
    w: torch.Tensor
    bs: torch.Tensor | None
    weights: torch.Tensor | None
    lead: torch.Size
    ids: torch.Tensor
    logprobs: torch.Tensor
    live: torch.Tensor | None


def _position(flat: int, lead: torch.Size) -> str:
    """The index in the leading shape of flattened row ``flat``: '(1, 7)' for lead (2, 10)."""
    index = []
    for size in reversed(lead):
        index.append(flat % size)
        flat //= size
    return "(" + ", ".join(str(i) for i in reversed(index)) + ("," if len(lead) == 1 else "") + ")"


def _refuse_bad_ids(ids: torch.Tensor, bad_rows: torch.Tensor, out_of_range: torch.Tensor, duplicate: torch.Tensor,
                    v: int, lead: torch.Size) -> None:
    """One line naming the first counted position whose ids are out of range or repeated (host reads on the
    error path only)."""
    row = int(bad_rows.nonzero()[0, 0])
    where = _position(row, lead)
    if bool(out_of_range[row].any()):
        col = int(out_of_range[row].nonzero()[0, 0])
        raise ValueError(f"teacher_ids must be token ids in [0, V) = [0, {v}): position {where} holds "
                         f"{int(ids[row, col])}")
    sorted_ids = ids[row].sort().values
    repeated = int(sorted_ids[1:][duplicate[row]][0])
    raise ValueError(f"teacher_ids must be distinct at each position: position {where} lists token id {repeated} "
                     "more than once")


def prepare_topk(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    clip: float | None,
    beta: float,
    tail: bool,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    num_items_in_batch,
) -> PreparedTopK:
    """Validate (ValueError/TypeError naming the first problem) and normalise the arguments of linear_kl_topk.

    One host read checks the ids of the counted rows (skipped while torch.compile traces: an invalid row's
    log-probs become NaN instead, so its loss is NaN)."""
    if isinstance(student_hidden, torch.Tensor) and student_hidden.dim() < 1:
        raise ValueError(f"student_hidden must be [..., H], got shape {tuple(student_hidden.shape)}")
    stand_in = student_hidden
    if isinstance(student_hidden, torch.Tensor):
        # the full op's teacher hidden states, as a zero-stride view: no memory, no cast, never read
        ok = isinstance(weight, torch.Tensor) and weight.dtype in FLOAT_DTYPES
        dtype = weight.dtype if ok else torch.float32
        stand_in = torch.zeros((), dtype=dtype, device=student_hidden.device).expand(student_hidden.shape)
    p = prepare(student_hidden, stand_in, weight, None, bias, None, temperature, clip, beta, mask, labels,
                ignore_index, reduction, num_items_in_batch)
    v = p.w.shape[0]
    if not isinstance(tail, bool):
        raise TypeError(f"tail must be True or False, got {tail!r}")
    if not isinstance(teacher_ids, torch.Tensor) or teacher_ids.is_floating_point() or teacher_ids.is_complex() \
            or teacher_ids.dtype == torch.bool:
        got = teacher_ids.dtype if isinstance(teacher_ids, torch.Tensor) else type(teacher_ids).__name__
        raise TypeError(f"teacher_ids must be an integer tensor of token ids, got {got}")
    if not isinstance(teacher_logprobs, torch.Tensor) or teacher_logprobs.dtype not in _LOGPROB_DTYPES:
        got = teacher_logprobs.dtype if isinstance(teacher_logprobs, torch.Tensor) else type(teacher_logprobs).__name__
        raise TypeError(f"teacher_logprobs must be a float tensor of log-probabilities, got {got}")
    if teacher_ids.dim() != len(p.lead) + 1 or teacher_ids.shape[:-1] != p.lead or teacher_ids.shape[-1] < 1:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} must be [..., K] with K >= 1 and the hidden states' "
                         f"leading shape {tuple(p.lead)}")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs {tuple(teacher_logprobs.shape)} must have teacher_ids' shape "
                         f"{tuple(teacher_ids.shape)}")
    devices = {teacher_ids.device, teacher_logprobs.device, p.hs.device}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    k = teacher_ids.shape[-1]
    if k > v:
        raise ValueError(f"teacher_ids has K={k} entries per position, more than the vocabulary (V={v})")
    if tail and k == v:
        raise ValueError(f"tail=True needs K < V: with all V={v} entries in the top-k there is no tail bucket "
                         "(pass tail=False)")

    ids = teacher_ids.reshape(-1, k).long()
    t = teacher_logprobs.detach().reshape(-1, k).to(torch.float32)  # the teacher never gets a gradient
    live = None if p.weights is None else p.weights != 0
    out_of_range = (ids < 0) | (ids >= v)
    sorted_ids = ids.sort(dim=-1).values
    duplicate = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    invalid = out_of_range.any(-1) | duplicate.any(-1)
    counted_invalid = invalid if live is None else invalid & live
    if not torch.compiler.is_compiling() and ids.shape[0] and bool(counted_invalid.any()):
        _refuse_bad_ids(ids, counted_invalid, out_of_range, duplicate, v, p.lead)
    # Every row the kernels see holds valid ids: rows that do not count (and, under torch.compile, invalid rows)
    # get 0..K-1. An invalid counted row's log-probs are NaN (its loss is NaN); rows that do not count get 0s.
    unused = invalid if live is None else invalid | ~live
    ids = torch.where(unused[:, None], torch.arange(k, device=ids.device), ids)
    nan = torch.full((), float("nan"), device=t.device)
    t = torch.where(torch.isfinite(t) & ~invalid[:, None], t, nan)
    if live is not None:
        t = torch.where(live[:, None], t, torch.zeros((), device=t.device))
    return PreparedTopK(p.hs, p.w, p.bs, p.weights, p.lead, ids, t, live)
