"""What README.md and docs/*.md tell a user to type works (issue 27): every command line of the project they show.

Read from the fenced code blocks (continuation lines joined, comments dropped) and the inline code spans of every
document. Checked without running anything heavy: the module of ``python -m X`` / ``torchrun ... -m X`` /
``accelerate launch ... -m X`` (and the console scripts ``atesd-*``) exists; every ``--flag`` exists in that
command's parser, built by the function its CLI builds it with (``build_parser()``; ``engine.train``:
``engine.invocation.build_parser``), flags that a command hands on (``engine.sweep`` after ``--``,
``engine.reproduce``'s other flags) in ``engine.train``'s, and none of those the command reserves for itself; every
value given is one its parser accepts (choices, numbers; ``engine.train``'s by the option's own declaration);
``--model`` presets, ``--task`` / ``--data`` / ``--benchmarks`` / ``--eval-benchmarks`` names, ``--exposure``
specs and ``--task-option`` keys exist; ``make`` targets are the Makefile's; a file of the repository that a
command names (a script, a test file, an input) exists; ``pip install`` of this project names existing extras and
does not isolate the build (which cannot build the native kernel). Placeholders (``DIR``, ``RUN``, ``N``,
``<dir>``, ``...``, a user's own file such as ``my.jsonl``) are skipped: their values are the reader's to choose.
Every ``--flag`` named anywhere in a code span, prose included, is one of those command lines' or another tool's
(:data:`OTHER_TOOLS_FLAGS`). ``test_the_checks_fail_on_wrong_lines`` shows each check failing on a wrong line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PROJECT_PACKAGES = ("engine", "controller", "kernels", "benchmarks", "atesd")
# a word of a value that stands for the reader's own choice (`--resume DIR`, `RUN/checkpoints/step-N`)
PLACEHOLDER_WORDS = {"N", "S", "A", "F", "M", "T", "K", "J", "X", "DIR", "RUN", "FILE", "YAML", "PATH", "KEY",
                     "VALUE", "MODULE", "ATTR", "ATTRIBUTE", "NAME", "SPEC", "OUT", "TASK", "PORT"}
OUTPUT_FLAGS = {"--out", "--output-dir", "--output_dir", "--markdown"}  # paths a command creates
SEPARATORS = {"&&", "||", ";", "|"}
# not the project's: the repository's directories that hold neither sources nor documents
NOT_SOURCES = {".git", ".venv", "build", "runs", "dist", "_skbuild"}


@dataclass
class Command:
    where: str  # document:line
    text: str  # as the document shows it
    tokens: list[str]  # its shell words, from the launcher on


# --------------------------------------------------------------------------------------------------- reading
def _code_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every fenced block's logical line and every inline code span of a markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[tuple[int, str]] = []
    fence: str | None = None
    pending: tuple[int, str] | None = None
    paragraph: list[tuple[int, str]] = []

    def flush_paragraph() -> None:
        if not paragraph:
            return
        text = "\n".join(line for _, line in paragraph)
        starts = [0]
        for _, line in paragraph:
            starts.append(starts[-1] + len(line) + 1)
        for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, flags=re.S):
            line_no = paragraph[max(i for i, s in enumerate(starts[:-1]) if s <= m.start())][0]
            out.append((line_no, " ".join(m.group(2).split())))
        paragraph.clear()

    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        marker = re.match(r"(```+|~~~+)", stripped)
        if fence is None and marker:
            flush_paragraph()
            fence = marker.group(1)
            continue
        if fence is not None:
            if stripped.startswith(fence) and not stripped[len(fence):].strip():
                fence, pending = None, None
                continue
            if pending is not None:
                number, stripped = pending[0], pending[1] + " " + stripped
                pending = None
            if stripped.endswith("\\"):
                pending = (number, stripped[:-1].rstrip())
                continue
            out.append((number, stripped[2:] if stripped.startswith("$ ") else stripped))
            continue
        if stripped:
            paragraph.append((number, line))
        else:
            flush_paragraph()
    flush_paragraph()
    return out


def _split(text: str) -> list[list[str]]:
    """The shell words of ``text`` (comments dropped), cut into the commands ``&&``, ``;`` and ``|`` join."""
    text = re.sub(r"\$\([^()]*\)", "SUBST", text)  # a command substitution is one word
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: plain words are enough to find a command
        words = text.split()
    segments: list[list[str]] = [[]]
    for word in words:
        if word in SEPARATORS:
            segments.append([])
        elif word.endswith(";"):
            segments[-1].append(word[:-1])
            segments.append([])
        else:
            segments[-1].append(word)
    return [s for s in segments if s]


def _is_python(word: str) -> bool:
    return re.fullmatch(r"python[0-9.]*", Path(word).name) is not None


def _unbracket(word: str) -> str:
    """``[--limit`` / ``N]`` of an optional part (``[--limit N]``) without the brackets; ``.[dev]`` stays."""
    word = word.removeprefix("[")
    return word[:-1] if word.endswith("]") and "[" not in word else word


def commands(documents: list[Path] = DOCUMENTS) -> list[Command]:
    """Every command line of the documents that runs the project: ``python -m`` / launcher ``-m`` of a project
    module, a console script, ``make``, ``python``/``bash`` of a repository file, ``pytest`` on its files."""
    found = []
    for path in documents:
        for line, text in _code_texts(path):
            for words in _split(text):
                words = [_unbracket(w) for w in words]
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value prefixes
                    words = words[1:]
                if not words:
                    continue
                head = words[0]
                launcher = _is_python(head) or head in ("torchrun", "accelerate")
                if (launcher and "-m" in words[:-1]) or head in ("make", "pip", "pip3") or head.startswith("atesd-") \
                        or (_is_python(head) and len(words) > 1 and words[1].endswith(".py")) \
                        or (head == "bash" and len(words) > 1):
                    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                    found.append(Command(f"{where}:{line}", text, words))
    return found


# ------------------------------------------------------------------------------------------------- checking
def is_placeholder(value: str) -> bool:
    if any(s in value for s in ("<", ">", "...", "{", "$", "*")):
        return True
    return any(word in PLACEHOLDER_WORDS for word in re.split(r"[/=,:.\-\s]+", value))


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)\s*:(?!=)", text, flags=re.M)}


def _console_scripts() -> dict[str, str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def _module_name(name: str) -> str:
    """``engine.train`` (a checkout) and ``atesd.engine.train`` (installed) are one module."""
    return name if name.startswith(("atesd.", "benchmarks.")) or name == "atesd" else "atesd." + name


_PARSERS: dict[str, argparse.ArgumentParser | str] = {}


def parser_of(module: str) -> argparse.ArgumentParser | str:
    """The parser the module's CLI parses with, or why there is none."""
    if module not in _PARSERS:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            found = None
        if found is None:
            _PARSERS[module] = f"no module {module}"
        elif module == "atesd.engine.train":  # its main parses with the invocation's parser
            from atesd.engine.invocation import build_parser

            _PARSERS[module] = build_parser()
        else:
            mod = importlib.import_module(module)
            build = getattr(mod, "build_parser", None)
            _PARSERS[module] = build() if build else (
                f"{module} has no build_parser(): its main builds the parser, which this test cannot read")
    return _PARSERS[module]


def _flag_values(parser: argparse.ArgumentParser, label: str, words: list[str], problems: list[str],
                 handed_on: list[str] | None = None):
    """(option string, action, value or None) of every flag in ``words``, and the words after ``--``. An unknown
    flag is a problem, or with ``handed_on`` goes there with its value (a command that hands it on); an
    unexpected positional word is a problem."""
    found, positional, rest = [], [], []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            rest = words[i:]
            break
        if word in ("...", "") or (is_placeholder(word) and not word.startswith("-")):
            positional.append(word)
            continue
        if word.startswith("-") and not re.fullmatch(r"-[0-9.e]+", word):
            name, eq, inline = word.partition("=")
            action = parser._option_string_actions.get(name)
            if action is None and handed_on is not None:
                handed_on.append(word)
                if not eq and i < len(words) and not words[i].startswith("-"):
                    handed_on.append(words[i])
                    i += 1
                continue
            if action is None:
                problems.append(f"{name}: no such flag ({label})")
                continue
            value = None
            if eq:
                value = inline
            elif action.nargs == "?":
                if i < len(words) and not words[i].startswith("-"):
                    value, i = words[i], i + 1
            elif action.nargs != 0:
                if i < len(words):
                    value, i = words[i], i + 1
                else:
                    problems.append(f"{name}: no value")
            found.append((name, action, value))
            continue
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subparsers and not positional and word in subparsers[0].choices:
            sub_found, rest = _flag_values(subparsers[0].choices[word], f"{label} {word}", words[i:], problems,
                                           handed_on)
            return found + sub_found, rest
        positional.append(word)
    wanted = [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    real = [w for w in positional if w not in ("...", "")]
    if real and not wanted:
        problems.append(f"{real[0]!r}: {label} takes no positional argument")
    return found, rest


def _check_value(module: str, name: str, action: argparse.Action, value: str) -> str | None:
    """Why ``value`` is not one the command accepts for ``name``, or None."""
    from atesd import controller
    from atesd.engine import models, task
    from atesd.engine.benchmarks import BENCHMARKS
    from atesd.engine.config import OPTIONS
    from atesd.engine.errors import UsageError
    from atesd.engine.options import declared

    dest = action.dest
    try:
        if dest == "task_options":
            pass  # KEY=VALUE: checked by the declaring task below
        elif module == "atesd.engine.train" and dest in OPTIONS:
            OPTIONS.check(dest, OPTIONS.coerce(dest, value, name), name)
        elif action.choices is not None and value not in action.choices:
            return f"{name} {value!r}: not one of {', '.join(map(str, action.choices))}"
        elif action.type in (int, float):
            action.type(value)
    except (UsageError, ValueError) as e:
        return str(e)
    if dest == "model" and not models.looks_like_path(value) and "/" not in value:
        if value not in models.RECIPES and task.find_model(value) is None:
            return f"--model {value!r}: no such preset ({', '.join(models.RECIPES)})"
    if dest == "task" and ":" not in value and value not in task.task_names():
        return f"--task {value!r}: no such task ({', '.join(task.task_names())})"
    if dest == "data" and "/" not in value and "." not in value and value not in task.task_names():
        return f"--data {value!r}: neither a task ({', '.join(task.task_names())}) nor a file or hub id"
    if dest in ("eval_benchmarks", "benchmarks"):
        for item in filter(None, (b.strip() for b in value.split(","))):
            if item not in task.task_names() and item not in BENCHMARKS and not item.endswith(".jsonl"):
                return f"{name}: no benchmark {item!r} ({', '.join(sorted(BENCHMARKS))}, a task, or a .jsonl)"
    specs = [value] if dest == "exposure" else []
    if module == "atesd.engine.sweep" and dest == "methods":
        specs = value.split(",")
    for spec in specs:
        try:
            controller.build(spec.strip(), seed=0, strict=False)
        except ValueError as e:
            return f"{name} {spec!r}: {e}"
    if dest == "task_options":
        key, _, raw = value.partition("=")
        for name_ in task.task_names():
            options = task.get_task(name_).options
            if options is not None and key in declared(options).fields:
                try:
                    declared(options).check(key, declared(options).coerce(key, raw, key), key)
                except UsageError as e:
                    return f"--task-option {value}: {e}"
                return None
        return f"--task-option {key!r}: no task declares it"
    return None


def check_arguments(module: str, words: list[str], problems: list[str]) -> None:
    """The flags and values of ``python -m module words...``."""
    parser = parser_of(module)
    if isinstance(parser, str):
        problems.append(parser)
        return
    handed_on: list[str] = []  # engine.reproduce hands its other flags to both runs' engine.train
    reproduce = module == "atesd.engine.reproduce"
    found, rest = _flag_values(parser, module, words, problems, handed_on if reproduce else None)
    if module == "atesd.engine.sweep":
        from atesd.engine.sweep import AUDIT_FLAGS, RESERVED

        reserved = RESERVED + (tuple(AUDIT_FLAGS[::2]) if any(n == "--audit" for n, _, _ in found) else ())
        handed_on = rest
        problems.extend(f"{w}: engine.sweep sets it itself" for w in rest if w.split("=")[0] in reserved)
    elif rest:
        problems.append(f"'--' {' '.join(rest)}: {module} takes nothing after '--'")
    if reproduce:
        from atesd.engine.reproduce import OWNED

        problems.extend(f"{w}: engine.reproduce sets it for each run" for w in handed_on if w.split("=")[0] in OWNED)
    for name, action, value in found:
        if value is not None and not is_placeholder(value):
            problem = _check_value(module, name, action, value)
            if problem:
                problems.append(problem)
    if handed_on:
        check_arguments("atesd.engine.train", handed_on, problems)


def check(command: Command) -> list[str]:
    """What is wrong with one documented command line (empty: nothing)."""
    words, problems = command.tokens, []
    head = words[0]
    if head == "make":
        targets = _makefile_targets()
        problems += [f"make {w}: no such target in the Makefile" for w in words[1:]
                     if not w.startswith("-") and "=" not in w and w not in targets]
        return problems
    module = words[words.index("-m") + 1] if "-m" in words[:-1] else None
    if head in ("pip", "pip3") or module == "pip":
        _check_install(words, problems)
        return problems
    if head.startswith("atesd-"):
        scripts = _console_scripts()
        if head not in scripts:
            return problems + [f"{head}: no such console script in pyproject.toml ({', '.join(scripts)})"]
        check_arguments(scripts[head], words[1:], problems)
    elif module is not None:
        args = words[words.index("-m") + 2:]
        if module.split(".")[0] in PROJECT_PACKAGES and not is_placeholder(module):
            check_arguments(_module_name(module), args, problems)
    _check_paths(words, problems)
    return problems


def _check_install(words: list[str], problems: list[str]) -> None:
    """``pip install`` of this project: its extras exist, and the build is not isolated (the native kernel builds
    against the torch already installed; an isolated build has none, and CMakeLists.txt stops)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for word in words:
        spec = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", word)
        if not spec:
            continue
        if "--no-build-isolation" not in words:
            problems.append(f"{' '.join(words)}: without --no-build-isolation the native kernel cannot build")
        unknown = [e for e in (spec.group(1) or "").split(",") if e and e not in extras]
        if unknown:
            problems.append(f"{word}: no such extra in pyproject.toml ({', '.join(extras)})")


def _check_paths(words: list[str], problems: list[str]) -> None:
    """A file of the repository the command names (a script, a test file, an input) exists."""
    sources = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in NOT_SOURCES}
    for i, word in enumerate(words):
        if i and words[i - 1].split("=")[0] in OUTPUT_FLAGS or word.split("=")[0] in OUTPUT_FLAGS:
            continue
        path = word.split("=", 1)[-1].split("::")[0]
        if "/" in path and path.split("/")[0] in sources and not is_placeholder(path) \
                and not (ROOT / path).exists():
            problems.append(f"{path}: no such file in the repository")


# flags the documents name that belong to other tools (a new one: add it under its tool)
OTHER_TOOLS_FLAGS = {
    "pytest": {"--benchmark", "--durations"},  # --benchmark: this repository's conftest.py, for benchmarks/
    "torchrun": {"--nproc_per_node", "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                 "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--rdzv-conf", "--standalone"},
    "accelerate launch": {"--multi_gpu", "--num_processes", "--cpu"},
    "pip": {"--no-build-isolation"},
    "cmake": {"--build"},
    "huggingface-cli download": {"--local-dir"},
    "tools/check_coexistence.sh": {"--quick"},
    # OPSD's scripts and TRL / transformers names that docs/fidelity.md and the README compare with ours
    "OPSD, TRL, transformers": {"--jsd_token_clip", "--lmbda", "--fixed_teacher", "--max_length",
                                "--per_device_train_batch_size", "--gradient_accumulation_steps", "--no-x"},
}


def mentioned_flags(documents: list[Path] = DOCUMENTS) -> list[tuple[str, str]]:
    """(document:line, --flag) of every flag named in a code span or block (``--[no-]x`` as ``--x``; ``--eval-*`` and
    ``--controller-<name>``, families, skipped)."""
    found = []
    for path in documents:
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        for line, text in _code_texts(path):
            for m in re.finditer(r"(?<![\w-])--(?:\[no-\])?([a-z][\w-]*[a-z0-9])(?![\w<*-])", text):
                found.append((f"{where}:{line}", "--" + m.group(1)))
    return found


DOCUMENTED = commands()


def known_flags() -> set[str]:
    """Every flag of the project's command lines the documents run (and of the examples), and of OTHER_TOOLS_FLAGS."""
    known = set().union(*OTHER_TOOLS_FLAGS.values())
    modules = {"atesd.engine.train"}
    for c in DOCUMENTED:
        module = c.tokens[c.tokens.index("-m") + 1] if "-m" in c.tokens[:-1] else ""
        if module.split(".")[0] in PROJECT_PACKAGES and not is_placeholder(module):
            modules.add(_module_name(module))
    for module in modules:
        parser = parser_of(module)
        assert not isinstance(parser, str), parser
        for action in parser._actions:
            known |= set(action.option_strings)
            for sub in (action.choices.values() if isinstance(action, argparse._SubParsersAction) else ()):
                known |= set(sub._option_string_actions)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples.common import parser as examples_parser  # `python examples/<name>.py --tiny --steps 2`

    return known | set(examples_parser("")._option_string_actions)


# ---------------------------------------------------------------------------------------------------- tests


def test_the_documents_show_the_commands_a_user_types():
    # the reading itself: the commands this test exists for are found where the documents show them
    heads = {" ".join(c.tokens[:3]) for c in DOCUMENTED}
    for expected in ("make run", "make test", "python -m engine.train", "python -m engine.evaluate",
                     "python -m engine.sweep", "python -m engine.reproduce", "python -m engine.prompts"):
        assert any(h.startswith(expected) for h in heads), expected
    assert any(c.tokens[0] == "torchrun" for c in DOCUMENTED)
    assert len(DOCUMENTED) >= 60, len(DOCUMENTED)


@pytest.mark.parametrize("command", DOCUMENTED, ids=[c.where for c in DOCUMENTED])
def test_documented_command(command: Command):
    problems = check(command)
    assert not problems, f"{command.where}: {command.text}\n  " + "\n  ".join(problems)


def test_the_checks_fail_on_wrong_lines(tmp_path):
    # each line is wrong in one way the documents could go stale; every one must be caught
    wrong = {
        "python -m engine.train --no-such-flag 3": "no such flag",
        "python -m engine.train --model qwen3-7b": "no such preset",
        "python -m engine.train --rollout warp": "not one of",
        "python -m engine.train --steps 2.5": "integer",
        "python -m engine.evaluate --benchmarks aime23": "no benchmark",
        "python -m engine.evaluate --model tiny --decoder fast": "not one of",
        "python -m engine.train --task-option colour=red": "no task declares",
        "python -m engine.train --exposure fixed:2": "--exposure",
        "python -m engine.sweep --jobs 2 -- --lr 5e-4 --seed 3": "sets it itself",
        "python -m engine.sweep -- --no-such-flag": "no such flag",
        "python -m engine.reproduce --exposure full": "sets it for each run",
        "python -m engine.reproduce --no-such-flag": "no such flag",
        "python -m engine.nothing --steps 1": "no module",
        "torchrun --nproc_per_node 2 -m engine.train --fsdp half": "not one of",
        "python -m engine.prompts --task nothing": "no such task",
        "python -m engine.checkpoint convert --trusted runs/x": "no such flag",
        "make deploy": "no such target",
        "bash benchmarks/no_such_script.sh": "no such file",
        "atesd-fly --steps 1": "no such console script",
        "pip install -e '.[bench]'": "--no-build-isolation",
        "pip install --no-build-isolation -e '.[gpus]'": "no such extra",
    }
    doc = tmp_path / "wrong.md"
    doc.write_text("```bash\n" + "\n".join(wrong) + "\n```\n\nInline: `python -m engine.evaluate --no-such 1`.\n")
    found = commands([doc])
    assert [c.text for c in found] == [*wrong, "python -m engine.evaluate --no-such 1"]
    for command, expected in zip(found, [*wrong.values(), "no such flag"]):
        problems = check(command)
        assert any(expected in p for p in problems), (command.text, problems)
    prose = tmp_path / "prose.md"
    prose.write_text("`--eval-temprature` and `--[no-]eval-thinking`, every `--controller-<name>`\n")
    assert [f for _, f in mentioned_flags([prose])] == ["--eval-temprature", "--eval-thinking"]
    assert "--eval-thinking" in known_flags() and "--eval-temprature" not in known_flags()
    right = tmp_path / "right.md"
    right.write_text("`python -m engine.train --steps 2 --model tiny --eval-benchmarks lab,aime24 --resume` and\n"
                     "`python -m engine.evaluate --adapter RUN/checkpoints/step-N --n N`\n")
    assert [check(c) for c in commands([right])] == [[], []]


def test_every_flag_the_documents_name_exists():
    # prose too ("`--eval-temperature` etc. override ..."): each flag is one of a project command line's, or a flag
    # of another tool the documents show
    known = known_flags()
    unknown = [f"{where}: {flag}" for where, flag in mentioned_flags() if flag not in known]
    assert not unknown, "flags no command line has:\n  " + "\n  ".join(unknown)
