"""See exactly what the student and the teacher see: ``python -m engine.prompts``.

    python -m engine.prompts --model qwen3-1.7b --data rows.jsonl --alpha 0.5 --limit 2
    python -m engine.prompts --data lab --alpha 1 --limit 1          # the embedded default (tiny model, lab)

prints one JSON object per usable row, with exactly the keys ``student_text`` and ``teacher_text`` (the full
rendered chat prompts) and ``student_ids`` and ``teacher_ids`` (the token ids the engine feeds the model: the
rendered texts tokenized whole, ``engine.exposure``). The teacher's is at exposure ``--alpha`` (``--exposure-mode``
tokens or lines), with the task's templates (``--task``, ``--prompts``, ``--instruction``,
``--[no-]teacher-thinking``) and chat template (``--chat-template``) resolved as ``engine.train`` resolves them.
Only the tokenizer is loaded, never the weights. Rows training would skip (no boxed answer, missing fields) are
skipped here too and counted on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from atesd.engine.data import clean_rows, load_rows, source_problem
from atesd.engine.errors import UsageError
from atesd.engine.exposure import chat_template_problem, make_example, use_chat_template
from atesd.engine.models import DEFAULT_DATASET, load_tokenizer, model_problem, recipe_for
from atesd.engine.options import OneLineParser, fail
from atesd.engine.task import get_task, is_task, resolve_templates

KEYS = ("student_text", "teacher_text", "student_ids", "teacher_ids")


def prompt_rows(
    tokenizer,
    rows: list[dict],
    templates,
    alpha: float,
    mode: str = "tokens",
) -> Iterator[dict]:
    """One ``{student_text, teacher_text, student_ids, teacher_ids}`` per row (``problem``, ``solution``,
    ``answer``) at exposure ``alpha``."""
    for r in rows:
        ex = make_example(tokenizer, r["problem"], r["solution"], r["answer"], templates=templates)
        cut = ex.cut(alpha, mode)
        yield dict(zip(KEYS, (ex.student_text, ex.teacher_text(cut), ex.student_prompt, ex.teacher_prompt(cut))))


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m engine.prompts", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset, hub id or local directory whose tokenizer and chat "
                    "template are used (default: tiny, the embedded default)")
    ap.add_argument("--data", default=None, help="a task that generates its problems, a local "
                    f".json/.jsonl/.parquet or a hub dataset id (default: the model recipe's; {DEFAULT_DATASET} "
                    "but for tiny)")
    ap.add_argument("--task", default=None, help="task whose templates are used: a registered name (math: "
                    "OPSD's) or module:ATTRIBUTE (default: the --data task if it names one, else math)")
    ap.add_argument("--alpha", type=float, default=1.0, help="teacher exposure in [0, 1] (default 1: OPSD's)")
    ap.add_argument("--exposure-mode", default="tokens", choices=("tokens", "lines"))
    ap.add_argument("--limit", type=int, default=5, help="rows to print (default 5)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--problem-column", default="problem")
    ap.add_argument("--solution-column", default="solution")
    ap.add_argument("--answer-column", default="answer")
    ap.add_argument("--prompts", default=None, help="YAML/JSON file overriding the task's templates")
    ap.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template file instead of the "
                    "tokenizer's (default: the tokenizer's; one without gets the engine's plain template, as "
                    "engine.train)")
    ap.add_argument("--instruction", default=None, help="transition instruction (default: the task's)")
    ap.add_argument("--teacher-thinking", action=argparse.BooleanOptionalAction, default=None,
                    help="thinking mode of the teacher prompt (default: the task's)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Prints the rows; returns how many. Bad input: one line on stderr, exit code 2."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except UsageError as e:
        fail(f"error: {e}", 2)


def _main(args) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha: must be in [0, 1], got {args.alpha!r}")
    if args.limit < 1:
        raise UsageError(f"--limit: must be >= 1, got {args.limit!r}")
    data = args.data or recipe_for(args.model).data
    for flag, problem in (("--model", model_problem(args.model)), ("--data", source_problem(data)),
                          ("--chat-template", args.chat_template and chat_template_problem(args.chat_template))):
        if problem:
            raise UsageError(f"{flag}: {problem}")
    try:
        task = get_task(args.task or (data if is_task(data) else "math"))
        templates = resolve_templates(task, args.prompts, instruction=args.instruction,
                                      teacher_thinking=args.teacher_thinking)
    except ValueError as e:
        raise UsageError(str(e)) from None
    raw = load_rows(data, split=args.split, problem_column=args.problem_column,
                    solution_column=args.solution_column, answer_column=args.answer_column, size=args.limit)
    rows, skipped = clean_rows(raw)
    tokenizer = load_tokenizer(args.model)
    use_chat_template(tokenizer, args.chat_template, owner=f"the tokenizer of model {args.model!r}")
    n = 0
    for obj in prompt_rows(tokenizer, rows[: args.limit], templates, args.alpha, args.exposure_mode):
        print(json.dumps(obj, ensure_ascii=False), flush=True)
        n += 1
    if skipped:
        print(f"skipped rows: {dict(skipped)}", file=sys.stderr)
    return n


if __name__ == "__main__":
    main()
