"""The distillation loss: always the fused op (``atesd.kernels.fused_linear_kl``), never a silent fallback.

Every device has a fused backend that never materialises N x V logits (Triton on CUDA, the native C++ kernel or the
tiled torch path on CPU, the tiled torch path elsewhere); :func:`describe_loss_backend` names the one that serves
a run, with the reason for any fallback, and the trainer writes it into ``run.log`` once. An error inside the op is
raised, not answered by the materialising reference (at Qwen3 scale that is an out-of-memory error far from its
cause).
"""

from __future__ import annotations

import torch

from atesd import kernels


def describe_loss_backend(device: torch.device | str) -> str:
    """One line for the run's log: which backend computes the loss on ``device``, and why if it is a fallback."""
    return kernels.describe_backend(device)


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
    return kernels.fused_linear_kl(student_hidden, teacher_hidden, weight, temperature=temperature, clip=clip,
                                   beta=beta, mask=mask, reduction=reduction, return_stats=True)


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 512
) -> torch.Tensor:
    """log p(targets[n] | hidden[n]) under the LM head, fp32 [N]; logits built ``chunk`` rows at a time."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        logits = (hidden[i : i + chunk] @ weight.T).float()
        out.append(logits.log_softmax(-1).gather(-1, targets[i : i + chunk, None]).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
