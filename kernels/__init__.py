"""Fused teacher/student clipped-KL over an LM head, without materialising vocabulary-sized tensors.

    loss, stats = kernels.fused_linear_kl(student_hidden, teacher_hidden, lm_head.weight,
                                          temperature=1.1, clip=0.05, mask=mask, return_stats=True)

``kernels.reference.linear_kl`` is the plain-torch meaning (materialises logits); see its docstring for the math.
"""

from . import reference
from ._ops import backend_for, native_cpu_available
from .linear_kl import FusedLinearKL, fused_linear_kl

__all__ = ["fused_linear_kl", "FusedLinearKL", "reference", "backend_for", "native_cpu_available"]
