"""The lab's prompt formats (the ones the shipped tiny model was pre-trained on) and text-level exposure.

Student: the problem alone. Teacher: the problem, an exposed prefix of the reference solution and a
transition instruction, as one user message::

    {problem}\\n\\nReference solution:\\n{reference}\\n\\n{instruction}

Both roles with thinking off (the tiny model's chat template has no thinking mode). These belong to the lab's
recipe only (``engine/lab/recipe.py``); real models get OPSD's templates (``engine.task.OPSD_TEMPLATES``).

The exposed reference keeps the first ``floor(alpha * m)`` of the ``m`` reasoning lines (or characters, in
``"chars"`` mode) and always the final ``\\boxed{}`` line, so ``alpha=1`` is the full reference (OPSD) and
``alpha=0`` the answer alone. The engine exposes token ids instead (``engine.exposure``); this text form is
what pre-training and the lab report use.
"""

from __future__ import annotations

import math

from atesd.engine.task import PromptTemplates

DEFAULT_INSTRUCTION = (
    "Now solve the problem yourself, step by step, ending with the final answer in \\boxed{}."
)

TEMPLATES = PromptTemplates(
    student="{problem}",
    teacher="{problem}\n\nReference solution:\n{reference}\n\n{instruction}",
    instruction=DEFAULT_INSTRUCTION,
    student_thinking=False,
    teacher_thinking=False,
)


def student_messages(problem: str) -> list[dict]:
    """Chat messages of the student prompt: ``[{"role": "user", "content": problem}]``."""
    return TEMPLATES.student_messages(problem)


def teacher_messages(
    problem: str, exposed_reference: str, instruction: str = DEFAULT_INSTRUCTION
) -> list[dict]:
    """Chat messages of the teacher prompt (format in the module docstring)."""
    return TEMPLATES.teacher_messages(problem, exposed_reference, instruction)


def split_solution(solution: str) -> tuple[list[str], str]:
    """``(reasoning lines, final line)``; the final line is the last one (it holds the ``\\boxed{}``)."""
    lines = [ln for ln in solution.strip().split("\n")]
    if not lines or not lines[-1].strip():
        raise ValueError("empty solution")
    return lines[:-1], lines[-1]


def expose_reference(solution: str, alpha: float, mode: str = "lines") -> str:
    """Reasoning prefix of fraction ``alpha`` (``floor(alpha*m)`` lines or chars) plus the final line."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    reasoning, final = split_solution(solution)
    if mode == "lines":
        kept = reasoning[: math.floor(alpha * len(reasoning))]
        return "\n".join(kept + [final])
    if mode == "chars":
        text = "\n".join(reasoning)
        prefix = text[: math.floor(alpha * len(text))].rstrip("\n")
        return f"{prefix}\n{final}" if prefix else final
    raise ValueError(f"mode must be 'lines' or 'chars', got {mode!r}")
