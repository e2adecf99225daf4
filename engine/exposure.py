"""Teacher exposure: how much of the reference reasoning the teacher sees, and the prompts both roles get.

A reference solution splits into reasoning (every line before the one holding the last ``\\boxed{}``) and
the answer block (that line onward). For exposure ``alpha`` in [0, 1] the teacher sees

    tokens mode:  the first floor(alpha * m) of the m reasoning tokens
    lines  mode:  the first floor(alpha * L) of the L reasoning lines

followed by the answer block, which is always kept, inside the teacher template's ``{reference}`` slot
(OPSD's: between begin/end markers, then the transition instruction). alpha = 1 is OPSD's full-reference
teacher, alpha = 0 shows the answer only. The prompts come from the task's templates
(``engine.task.PromptTemplates``). Everything is built from token ids, so the teacher sequence is the exact
concatenation [head ; revealed reasoning ; answer ; tail] that the prefix-sharing tree uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from atesd.engine.task import OPSD_TEMPLATES, PromptTemplates

DEFAULT_INSTRUCTION = OPSD_TEMPLATES.instruction
_PLACEHOLDER = "\u2063EXPOSED-REFERENCE\u2063"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def split_reference(solution: str) -> tuple[list[str], str]:
    """(reasoning lines, each with its trailing newline; answer block from the last boxed line on)."""
    box = solution.rfind("\\boxed{")
    if box < 0:
        raise ValueError("reference solution has no \\boxed{} answer")
    cut = solution.rfind("\n", 0, box) + 1  # 0 when the boxed answer is on the first line
    reasoning, answer = solution[:cut], solution[cut:]
    return reasoning.splitlines(keepends=True), answer


def render(tokenizer, messages: list[dict], thinking: bool) -> str:
    """Chat-template text with the generation prompt; Qwen3's thinking switch via ``enable_thinking``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@dataclass
class Example:
    """One problem, tokenized once: student prompt, teacher head/tail and the reference split for exposure."""

    problem: str
    answer: str
    student_prompt: list[int]
    teacher_head: list[int]  # chat prefix + the teacher template up to {reference}
    teacher_tail: list[int]  # the template after {reference} (markers, instruction) + the assistant turn
    reasoning: list[list[int]]  # reasoning token ids, one list per line
    answer_ids: list[int]  # the answer block, always revealed

    @property
    def reasoning_ids(self) -> list[int]:
        return [t for line in self.reasoning for t in line]

    def revealed(self, alpha: float, mode: str = "tokens") -> int:
        """Number of reasoning tokens the teacher sees at exposure ``alpha``."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"exposure alpha must be in [0, 1], got {alpha!r}")
        if mode == "tokens":
            # the epsilon guards against alpha*m landing a hair under an integer (e.g. 0.7 * 10)
            return math.floor(alpha * sum(map(len, self.reasoning)) + 1e-9)
        if mode == "lines":
            n = math.floor(alpha * len(self.reasoning) + 1e-9)
            return sum(len(line) for line in self.reasoning[:n])
        raise ValueError(f"exposure mode must be 'tokens' or 'lines', got {mode!r}")

    def teacher_prompt(self, k: int) -> list[int]:
        """Teacher prompt ids with k reasoning tokens revealed (the tree's root + answer segments)."""
        return self.teacher_head + self.reasoning_ids[:k] + self.answer_ids + self.teacher_tail


def make_example(
    tokenizer,
    problem: str,
    solution: str,
    answer: str | None = None,
    *,
    templates: PromptTemplates = OPSD_TEMPLATES,
    instruction: str | None = None,
    teacher_thinking: bool | None = None,
) -> Example:
    """Tokenize one row with the task's templates (default: OPSD's); ``instruction`` and
    ``teacher_thinking`` override the templates' own. Raises ValueError when the solution has no boxed
    answer."""
    templates = templates.replace(instruction=instruction, teacher_thinking=teacher_thinking)
    lines, answer_block = split_reference(solution)
    answer = answer if answer is not None else last_boxed(solution)
    student = render(tokenizer, templates.student_messages(problem), thinking=templates.student_thinking)
    teacher = render(
        tokenizer, templates.teacher_messages(problem, _PLACEHOLDER), thinking=templates.teacher_thinking
    )
    if teacher.count(_PLACEHOLDER) != 1:
        raise ValueError("the teacher prompt template must contain the exposed reference exactly once")
    head, tail = teacher.split(_PLACEHOLDER)
    return Example(
        problem=problem,
        answer=str(answer),
        student_prompt=encode(tokenizer, student),
        teacher_head=encode(tokenizer, head),
        teacher_tail=encode(tokenizer, tail),
        reasoning=[encode(tokenizer, line) for line in lines],
        answer_ids=encode(tokenizer, answer_block),
    )
