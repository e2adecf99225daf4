"""Teacher exposure: how much of the reference reasoning the teacher sees, and the prompts both roles get.

A reference solution splits into reasoning (every line before the one holding the last ``\\boxed{}``) and
the answer block (that line onward). For exposure ``alpha`` in [0, 1] the teacher sees

    tokens mode:  the first floor(alpha * m) of the m tokens of the reasoning
    lines  mode:  the first floor(alpha * L) of the L reasoning lines

followed by the answer block, which is always kept, inside the teacher template's ``{reference}`` slot
(OPSD's: between begin/end markers, then the transition instruction). alpha = 1 is OPSD's full-reference
teacher, alpha = 0 shows the answer only.

**Prompts are text first** (DESIGN 4.2d). The cut is made on the reasoning's own tokens (``tokenizer(reasoning)``)
or lines, turned back into text (the characters those tokens cover; a cut inside a line is closed with a newline
so the answer line stands on its own line, as in the full reference), placed in the template, rendered by the
chat template, and the whole text is tokenized once: the ids the model sees are exactly
``tokenizer(rendered_text, add_special_tokens=False)`` (the chat template writes every special token itself;
for Qwen3 this equals ``tokenizer(rendered_text)``). Piecewise ids would differ: BPE merges across newlines and
punctuation (Qwen's ``.\\n\\n`` is one token). A reply teacher-forced after a prompt (the credit branch, the
probe NLL) is the continuation of the whole text ``prompt + reply``, so it too is what the tokenizer produces.
``python -m engine.prompts`` prints the texts and ids of both roles.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from dataclasses import dataclass, field

from atesd.engine.task import OPSD_TEMPLATES, PromptTemplates

DEFAULT_INSTRUCTION = OPSD_TEMPLATES.instruction
log = logging.getLogger("engine")


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


# The engine's plain chat template, for a tokenizer that has none (base models): every message as a line
# "role: text", then "assistant: " when a reply is to follow. Training and evaluation both render with it (the same
# text the engine wrote before templates were chosen up front); it has no thinking switch.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ message['role'] + ': ' + message['content'] + '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}"
)


def chat_template_problem(path: str) -> str | None:
    """Why file ``path`` is not a usable Jinja chat template (``--chat-template``), or None: it must be UTF-8
    text that renders a user message (checked by rendering one, with transformers' sandboxed renderer)."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return "no such file (a Jinja chat template)"
    except IsADirectoryError:
        return "is a directory, not a Jinja chat template file"
    except UnicodeDecodeError as e:
        return f"is not UTF-8 text ({e.reason} at byte {e.start})"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not text.strip():
        return "is empty"
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered = render_jinja_template([[{"role": "user", "content": "1+1?"}]], chat_template=text,
                                         add_generation_prompt=True)[0][0]
    except Exception as e:  # jinja2's syntax and runtime errors, raise_exception() in the template
        line = getattr(e, "lineno", None)
        return (f"is not a usable Jinja chat template{f' (line {line})' if line else ''}: {type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0]}")
    if "1+1?" not in rendered:
        return "never writes the messages' content (a chat template renders each message['content'])"
    return None


def read_chat_template(path: str) -> str:
    """The Jinja chat template in file ``path``; a one-line ValueError naming ``--chat-template`` and the problem
    (:func:`chat_template_problem`)."""
    problem = chat_template_problem(path)
    if problem:
        raise ValueError(f"--chat-template {path!r}: {problem}")
    with open(os.path.expanduser(path), encoding="utf-8") as fh:
        return fh.read()


def use_chat_template(tokenizer, path: str | None = None, *, owner: str = "the tokenizer") -> str:
    """Decide, once and before any weights load, the chat template every prompt is rendered with, and set it on
    ``tokenizer``: the file ``path`` (``--chat-template``) when given, else the tokenizer's own, else
    :data:`PLAIN_CHAT_TEMPLATE`. Logged (a warning for the plain template); returns the one-line description.
    ``owner`` names the tokenizer in the message (``"the tokenizer of model 'x'"``)."""
    if path:
        tokenizer.chat_template = read_chat_template(path)
        note = f"chat template: {path} (--chat-template), replacing that of {owner}"
    elif getattr(tokenizer, "chat_template", None) == PLAIN_CHAT_TEMPLATE:
        note = (f"chat template: the engine's plain one ('role: text' lines), which {owner} carries (its model has "
                "none); --chat-template FILE gives another")
    elif getattr(tokenizer, "chat_template", None):
        note = f"chat template: that of {owner}"
    else:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        note = (f"{owner} has no chat template: training and evaluation prompts use the engine's plain one "
                "('role: text' lines, then 'assistant: '; no thinking switch); give one with --chat-template FILE")
        log.warning("%s", note)
        return note
    log.info("%s", note)
    return note


def render(tokenizer, messages: list[dict], thinking: bool | None = None, **chat_kwargs) -> str:
    """The chat text of ``messages`` with the generation prompt: the one function every prompt of training and
    evaluation is rendered by. ``thinking`` is the template's ``enable_thinking`` (Qwen3's switch; None: not
    passed); ``chat_kwargs`` go to the template too. A tokenizer without a chat template gets the plain one first
    (:func:`use_chat_template`, logged)."""
    if not getattr(tokenizer, "chat_template", None):
        use_chat_template(tokenizer)
    if thinking is not None:
        chat_kwargs = {"enable_thinking": thinking, **chat_kwargs}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **chat_kwargs)


def encode(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` tokenized whole (the chat template already wrote the special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def continuation(tokenizer, prompt_text: str, prompt_ids: list[int], reply: str) -> list[int]:
    """Ids of ``reply`` as the tokenizer reads it after ``prompt_text``: the tail of the whole text's ids. When
    the two merge across the boundary (the prompt's ids are not a prefix), the reply is tokenized alone."""
    whole = encode(tokenizer, prompt_text + reply)
    if whole[: len(prompt_ids)] == prompt_ids:
        return whole[len(prompt_ids):]
    log.debug("reply merges with its prompt at the boundary; tokenized alone")
    return encode(tokenizer, reply)


def char_ends(tokenizer, text: str, ids: list[int]) -> list[int]:
    """End offset in ``text`` (characters) of each token of ``ids = encode(tokenizer, text)``: from the fast
    tokenizer's offsets, else from decoded prefixes (slow tokenizers; quadratic, short texts only)."""
    if not ids:
        return []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [end for _, end in enc["offset_mapping"]]
    else:
        ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    # byte-level pieces of one character share its offsets; keep the ends monotone and within the text
    out, top = [], 0
    for end in ends:
        top = min(max(top, end), len(text))
        out.append(top)
    return out


@dataclass
class Example:
    """One problem: the student prompt (text and ids), the reference split for exposure, and the texts and ids the
    teacher sees at any cut. A *cut* is the number of reasoning characters revealed (``cut(alpha, mode)``)."""

    problem: str
    answer: str
    templates: PromptTemplates
    tokenizer: object = field(repr=False)
    reasoning: str  # the reasoning text, every line before the answer block
    answer_block: str  # from the last boxed line on, always revealed
    student_text: str  # the rendered student prompt
    student_prompt: list[int]  # encode(student_text)
    reasoning_ids: list[int]  # encode(reasoning): the unit of the tokens mode
    token_ends: list[int]  # character end of each reasoning token
    line_ends: list[int]  # character end of each reasoning line
    student_reply_ids: list[int] = field(default_factory=list)  # the whole reference as the student's reply
    teacher_reply_ids: list[int] = field(default_factory=list)  # ... and as the teacher's (the credit branch)

    def cut(self, alpha: float, mode: str = "tokens") -> int:
        """Reasoning characters revealed at exposure ``alpha``: the end of token floor(alpha*m) or of line
        floor(alpha*L)."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"exposure alpha must be in [0, 1], got {alpha!r}")
        ends = {"tokens": self.token_ends, "lines": self.line_ends}.get(mode)
        if ends is None:
            raise ValueError(f"exposure mode must be 'tokens' or 'lines', got {mode!r}")
        n = math.floor(alpha * len(ends) + 1e-9)  # the epsilon guards alpha*m a hair under an integer (0.7 * 10)
        return ends[n - 1] if n else 0

    def revealed_tokens(self, cut: int) -> int:
        """Reasoning tokens wholly inside the first ``cut`` characters."""
        return bisect.bisect_right(self.token_ends, cut)

    def exposed_reference(self, cut: int) -> str:
        """The reference the teacher sees: the revealed reasoning, then the answer block on a line of its own."""
        shown = self.reasoning[:cut]
        if shown and not shown.endswith("\n"):
            shown += "\n"
        return shown + self.answer_block

    def teacher_text(self, cut: int) -> str:
        """The teacher's rendered chat prompt with ``cut`` reasoning characters revealed."""
        messages = self.templates.teacher_messages(self.problem, self.exposed_reference(cut))
        return render(self.tokenizer, messages, thinking=self.templates.teacher_thinking)

    def teacher_prompt(self, cut: int) -> list[int]:
        """``encode(teacher_text(cut))``: the root of the teacher's prefix-sharing tree."""
        return encode(self.tokenizer, self.teacher_text(cut))


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
    """Render and tokenize one row with the task's templates (default: OPSD's); ``instruction`` and
    ``teacher_thinking`` override the templates' own. Raises ValueError when the solution has no boxed
    answer."""
    templates = templates.replace(instruction=instruction, teacher_thinking=teacher_thinking)
    lines, answer_block = split_reference(solution)
    reasoning = "".join(lines)
    answer = answer if answer is not None else last_boxed(solution)
    student_text = render(tokenizer, templates.student_messages(problem), thinking=templates.student_thinking)
    student_prompt = encode(tokenizer, student_text)
    reasoning_ids = encode(tokenizer, reasoning)
    line_ends = [sum(map(len, lines[: i + 1])) for i in range(len(lines))]
    ex = Example(
        problem=problem,
        answer=str(answer),
        templates=templates,
        tokenizer=tokenizer,
        reasoning=reasoning,
        answer_block=answer_block,
        student_text=student_text,
        student_prompt=student_prompt,
        reasoning_ids=reasoning_ids,
        token_ends=char_ends(tokenizer, reasoning, reasoning_ids),
        line_ends=line_ends,
    )
    full = ex.teacher_text(len(reasoning))  # its end (the assistant turn) is the same at every cut
    ex.student_reply_ids = continuation(tokenizer, student_text, student_prompt, solution)
    ex.teacher_reply_ids = continuation(tokenizer, full, encode(tokenizer, full), solution)
    return ex
