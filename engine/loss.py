"""The distillation loss, routed through one function: the fused op, or its plain-torch reference where the
fused op is not available for these tensors (same signature and meaning; see kernels.reference)."""

from __future__ import annotations

import torch

from atesd import kernels
from atesd.kernels import reference

_fused_ok = True  # flips to False after the fused op reports it cannot serve this build


def distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    temperature: float = 1.1,
    clip: float | None = 0.05,
    beta: float = 0.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
):
    """Clipped teacher/student KL over the LM head: (loss, stats of [N] fp32 tensors: kl, clipped_kl,
    top1_agree, student_max_prob, student_entropy). student_hidden / teacher_hidden [N, H], weight [V, H]."""
    global _fused_ok
    kwargs = dict(
        temperature=temperature, clip=clip, beta=beta, mask=mask, reduction=reduction, return_stats=True
    )
    if _fused_ok:
        try:
            return kernels.fused_linear_kl(student_hidden, teacher_hidden, weight, **kwargs)
        except (NotImplementedError, AttributeError):
            _fused_ok = False
    return reference.linear_kl(student_hidden, teacher_hidden, weight, **kwargs)


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 512
) -> torch.Tensor:
    """log p(targets[n] | hidden[n]) under the LM head, fp32 [N]; logits built ``chunk`` rows at a time."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        logits = (hidden[i : i + chunk] @ weight.T).float()
        out.append(logits.log_softmax(-1).gather(-1, targets[i : i + chunk, None]).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
