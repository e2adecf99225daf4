"""Fused teacher/student clipped-KL over an LM head, without materialising vocabulary-sized tensors.

    from atesd.kernels import fused_linear_kl
    loss, stats = fused_linear_kl(student_hidden, teacher_hidden, lm_head.weight,
                                  temperature=1.1, clip=0.05, labels=labels, return_stats=True)

``atesd.kernels.reference.linear_kl`` is the plain-torch meaning (materialises logits); see its docstring for the math.
For a served teacher that ships only its top-k log-probabilities per token, ``fused_linear_kl_topk`` (meaning:
``atesd.kernels.reference.linear_kl_topk``).
"""

if __name__ == "kernels":  # found by its bare name through a checkout on sys.path: not ours (atesd/__init__.py)
    import sys

    import atesd

    atesd.defer_top_level(sys.modules[__name__])
else:
    from atesd.kernels import reference
    from atesd.kernels._ops import backend_for, describe_backend, native_cpu_available
    from atesd.kernels.linear_kl import FusedLinearKL, fused_linear_kl
    from atesd.kernels.linear_kl_topk import FusedLinearKLTopK, fused_linear_kl_topk

__all__ = ["fused_linear_kl", "FusedLinearKL", "fused_linear_kl_topk", "FusedLinearKLTopK", "reference", "backend_for",
           "describe_backend", "native_cpu_available"]
