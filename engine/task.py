"""Tasks: what the engine trains and evaluates on, plugged in by name or by a ``module:attr`` spec.

A :class:`Task` bundles everything task-specific the engine needs:

- ``templates``: the student and teacher prompts (:class:`PromptTemplates`), their thinking switches and
  the transition instruction;
- ``verify(completion, answer) -> bool`` for evaluation (None: last-``\\boxed{}`` extraction graded by
  math-verify in worker processes);
- ``eval``: the evaluation protocol (:class:`EvalProtocol`) used unless a flag overrides it;
- ``dataset(split, size, seed, **options) -> rows`` when the task generates its own problems (rows with
  ``problem``, ``solution``, ``answer`` and optionally ``level``; ``size`` None: the task's own training amount);
  None for tasks trained on a dataset;
- ``options``: a dataclass declaring the task's own options, each in one line as the engine's options are
  (``engine/options.py``: ``size: int = option(2000, "training problems", check=at_least(1))``). A run sets them
  with ``--task-option size=500`` (or a ``task_options:`` mapping in its YAML file), typed and checked by these
  declarations, and the engine passes them to ``dataset`` as keywords (:func:`task_options`);
- ``models``: model presets the task ships (name -> local directory).

The engine's core never imports a task's module: ``get_task`` resolves a registered name, a name listed in
:data:`PLUGINS` (``name -> "module:attr"``, imported by string on first use), or a ``"module:attr"`` spec
given by the user. The embedded lab is one such plug-in (``lab`` -> ``atesd.engine.lab.recipe:TASK``); a
user's task plugs in the same way (``--task mypkg.tasks:MY_TASK``) or with :func:`register_task`.
:data:`MATH` is the built-in task: OPSD's prompts and the paper's evaluation protocol.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PLACEHOLDERS = ("problem", "reference", "instruction")
_PLACEHOLDER_RE = re.compile(r"\{(problem|reference|instruction)\}")


def fill(template: str, **values: str) -> str:
    """Substitute ``{problem}``, ``{reference}``, ``{instruction}`` in one pass; every other character,
    braces included (``\\boxed{}``), is kept verbatim, and substituted text is never scanned again."""
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class PromptTemplates:
    """Chat user messages of both roles. ``student`` holds ``{problem}``; ``teacher`` holds ``{problem}``,
    ``{reference}`` (the exposed reference: a prefix of the reasoning plus the final answer, always) and
    optionally ``{instruction}`` (replaced by ``instruction``). ``*_thinking`` is the chat template's
    ``enable_thinking`` for that role (Qwen3: off writes an empty think block). ``evaluation`` is the prompt the
    evaluated model gets (``{problem}``; None: the student's); its thinking switch is the evaluation protocol's."""

    student: str
    teacher: str
    instruction: str = ""
    student_thinking: bool = False
    teacher_thinking: bool = True
    evaluation: str | None = None

    def __post_init__(self) -> None:
        for role, text in (("student", self.student), ("evaluation", self.evaluation)):
            if text is not None and text.count("{problem}") != 1:
                raise ValueError(f"the {role} template must contain {{problem}} exactly once")
            if text is not None and "{reference}" in text:
                raise ValueError(f"the {role} template must not contain {{reference}}")
        for name in ("problem", "reference"):
            if self.teacher.count("{" + name + "}") != 1:
                raise ValueError(f"the teacher template must contain {{{name}}} exactly once")

    def student_messages(self, problem: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": fill(self.student, problem=problem)}]

    def evaluation_messages(self, problem: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": fill(self.evaluation or self.student, problem=problem)}]

    def teacher_messages(self, problem: str, reference: str, instruction: str | None = None) -> list[dict]:
        text = fill(self.teacher, problem=problem, reference=reference,
                    instruction=self.instruction if instruction is None else instruction)
        return [{"role": "user", "content": text}]

    def replace(self, **changes: Any) -> PromptTemplates:
        """A copy with the given fields replaced (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class EvalProtocol:
    """Sampling protocol of evaluation: accuracy is Average@n_samples (greedy when temperature == 0: one
    sample). top_k = 0 is off."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    n_samples: int
    thinking: bool

    def replace(self, **changes: Any) -> EvalProtocol:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Task:
    name: str
    templates: PromptTemplates
    eval: EvalProtocol
    verify: Callable[[str, str], bool] | None = None
    dataset: Callable[..., list[dict]] | None = None
    models: Mapping[str, str] = field(default_factory=dict)
    options: type | None = None  # a dataclass of the task's own options (engine/options.py), None: none


def task_options(task: Task, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options ``task`` declares, each as ``given`` has it, else at its declared default (what the engine
    passes to ``task.dataset`` as keywords; an option the task does not declare is left out)."""
    if task.options is None:
        return {}
    given = given or {}
    return {f.name: given.get(f.name, f.default) for f in dataclasses.fields(task.options)}


# OPSD's released prompts (data_collator.py of the OPSD repository, as preserved in public forks; see
# docs/fidelity.md): student thinking off, teacher thinking on.
OPSD_STUDENT = "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
OPSD_INSTRUCTION = (
    "After reading the reference solution above, make sure you truly understand the reasoning behind each "
    "step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the "
    "same final answer to the problem above. Think step by step, explore different approaches, and don't be "
    "afraid to backtrack or reconsider if something doesn't work out:"
)
OPSD_TEACHER = (
    "Problem: {problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
    "{reference}\n=== Reference Solution End ===\n\n\n{instruction}\n\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)
# OPSD's evaluation prompt (eval/evaluate_math.py of the OPSD repository): the problem without "Problem: ".
OPSD_EVALUATION = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
OPSD_TEMPLATES = PromptTemplates(OPSD_STUDENT, OPSD_TEACHER, OPSD_INSTRUCTION, student_thinking=False,
                                 teacher_thinking=True, evaluation=OPSD_EVALUATION)
# The paper's (OPSD's) evaluation: thinking on, T=1.0, top-p 0.95, no top-k, 38912 new tokens, Average@12.
PAPER_EVAL = EvalProtocol(temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=38912, n_samples=12, thinking=True)

MATH = Task(name="math", templates=OPSD_TEMPLATES, eval=PAPER_EVAL)

# Plug-ins shipped in this repository, imported by string on first use (the core never imports them).
PLUGINS: dict[str, str] = {"lab": "atesd.engine.lab.recipe:TASK", "lab-val": "atesd.engine.lab.recipe:VAL_TASK"}

_TASKS: dict[str, Task] = {"math": MATH}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Make ``task`` reachable by ``task.name`` (``--task <name>``)."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}")
    if task.name in _TASKS and _TASKS[task.name] is not task and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered (pass replace=True)")
    _TASKS[task.name] = task
    return task


def _import_spec(spec: str) -> Task:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"task spec {spec!r}: expected 'package.module:ATTRIBUTE'")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"could not load task {spec!r}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Task):
        raise ValueError(f"task spec {spec!r} names a {type(obj).__name__}, not an atesd.engine.task.Task")
    return obj


def get_task(name: str) -> Task:
    """A registered task, a shipped plug-in (:data:`PLUGINS`) or a ``module:attr`` spec."""
    if name in _TASKS:
        return _TASKS[name]
    if name in PLUGINS:
        task = _import_spec(PLUGINS[name])
        return _TASKS.setdefault(name, task)
    if ":" in name:
        task = _import_spec(name)
        return _TASKS.setdefault(name, task)
    raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}, or give 'module:ATTRIBUTE'")


def is_task(name: str | None) -> bool:
    """True when ``name`` is a registered or shipped task name (not a spec, a file or a hub id)."""
    return isinstance(name, str) and (name in _TASKS or name in PLUGINS)


def task_names() -> list[str]:
    return sorted(set(_TASKS) | set(PLUGINS))


def find_model(name: str) -> str | None:
    """The local directory of a model preset shipped by a task (e.g. the lab's 'tiny'), or None."""
    for task_name in task_names():
        try:
            task = get_task(task_name)
        except ValueError:  # a shipped plug-in missing from this checkout
            continue
        if name in task.models:
            return task.models[name]
    return None


def load_templates(source: str | Mapping[str, Any]) -> dict[str, Any]:
    """Template overrides from a mapping (the YAML config's ``prompts:``) or a .yaml/.yml/.json file:
    any of student, teacher, instruction, evaluation (strings), student_thinking, teacher_thinking (booleans)."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        if not os.path.isfile(source):
            raise ValueError(f"--prompts {source!r}: no such file (a .yaml or .json with student/teacher keys)")
        with open(source) as fh:
            if source.endswith(".json"):
                data = json.load(fh)
            else:
                import yaml

                data = yaml.safe_load(fh) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"--prompts {source!r}: expected a mapping of template fields")
    known = {f.name for f in dataclasses.fields(PromptTemplates)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"prompt templates: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return dict(data)


def resolve_templates(
    task: Task,
    prompts: str | Mapping[str, Any] | None = None,
    *,
    instruction: str | None = None,
    teacher_thinking: bool | None = None,
    student_thinking: bool | None = None,
) -> PromptTemplates:
    """The task's templates, then the user's template overrides, then the single-field flags."""
    base = task.templates
    if prompts:
        try:
            base = base.replace(**load_templates(prompts))
        except ValueError as e:
            raise ValueError(f"prompt templates: {e}") from None
    return base.replace(instruction=instruction, teacher_thinking=teacher_thinking,
                        student_thinking=student_thinking)
