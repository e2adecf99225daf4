"""One invocation of the trainer: its flags and YAML file (or the run it resumes) into a validated :class:`Config`.

:func:`parse` (and :func:`parse_invocation`, which also says what changed on ``--resume``) read the flags
(``python -m engine.train --help``: one per ``Config`` field, generated from its declaration) and the optional
``--config`` YAML file, typed by each option's declaration (``engine/options.py``); bad input is a one-line
:class:`UsageError` before anything is loaded or written.

``--resume`` continues a run with the run's own ``config.yaml``. A flag (or YAML key) given with it must agree with
the run, except fields whose ``on_resume`` is ``"change"`` (may change; recorded in run.log: ``--steps`` to extend a
run, ``--save-every``, ``--device``, ``--rollout``, ``--report-to``) or ``"invocation"`` (belongs to this
invocation, not to the run, never written to config.yaml: ``--progress``, ``--stop-after``, ``--output-dir``).
A ``config.yaml`` written before tasks declared their own options (``lab_size``, ``lab_levels``) is read with
those keys as the task options ``size`` and ``levels``.

TRL / Hugging Face users' spellings are accepted: every flag with its underscores (``--max_new_tokens``) and
the names in :data:`ALIASES` (``--learning_rate``, ``--max_steps``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any

import yaml

from atesd.engine.config import (
    FIELDS,
    OPTIONS,
    RECIPE_FIELDS,
    Config,
    resolve_task_options,
    run_tasks,
    typed_task_options,
)
from atesd.engine.errors import UsageError
from atesd.engine.options import Given, GivenBool, OneLineParser, declared, flag, show
from atesd.engine.task import get_task, task_names

# TRL / transformers.TrainingArguments names that mean exactly what an option here means
ALIASES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "save_steps": "save_every",
    "model_name_or_path": "model",
    "dataset_name": "data",
    "num_generations": "num_samples",
}
# TRL names with no one-to-one counterpart: an error that points to what to use instead
NOT_FLAGS = {
    "per_device_train_batch_size": "--micro-batch (problems per scoring pass) and --batch-size (problems per "
    "optimizer step)",
    "gradient_accumulation_steps": "--batch-size and --micro-batch (gradients accumulate over a step's "
    "micro-batches)",
    "num_train_epochs": "--steps (the data stream reshuffles at every epoch)",
    "temperature": "--rollout-temperature (sampling) or --kl-temperature (the distillation softmax)",
}
# config.yaml keys of runs written before tasks declared their own options: now these task options
LEGACY_TASK_OPTIONS = {"lab_size": "size", "lab_levels": "levels"}


# ------------------------------------------------------------------------------------------------ parsing
class _TaskOption(argparse.Action):
    """``--task-option KEY=VALUE``, repeatable: ``({key: value, ...}, the option string typed)``."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, eq, value = values.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"{option_string} {values!r}: expected KEY=VALUE (e.g. size=500)")
        given = getattr(namespace, self.dest, (None, None))[0] or {}
        setattr(namespace, self.dest, ({**given, key.strip(): value}, option_string))


class _TrainParser(OneLineParser):
    def format_help(self) -> str:
        return super().format_help() + tasks_help()


def tasks_help() -> str:
    """The tasks reachable by name, their evaluation protocol and their own options (read from each task)."""
    lines = ["", "tasks (--task, --data, --eval-benchmarks by name; their options: --task-option KEY=VALUE):"]
    for name in task_names():
        try:
            task = get_task(name)
        except ValueError as e:
            lines.append(f"  {name}: not available ({e})")
            continue
        p = task.eval
        how = "greedy" if p.temperature == 0 else f"T={p.temperature:g}, top-p {p.top_p:g}" + (
            f", top-k {p.top_k}" if p.top_k else "") + f", Average@{p.n_samples}"
        own = "; generates its problems" if task.dataset is not None else ""
        lines.append(f"  {name}: evaluation {how}, {p.max_new_tokens} new tokens, thinking "
                     f"{'on' if p.thinking else 'off'}{own}")
        for f in dataclasses.fields(task.options) if task.options else ():
            lines.append(f"    {f.name}: {f.metadata['help']} (default: {show(f.default)})")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = _TrainParser(
        prog="python -m engine.train",
        description="On-policy self-distillation with adaptive teacher exposure. "
        "Precedence: built-in defaults < model recipe < --config YAML < flags.",
        epilog="Every flag also takes its underscore spelling (--max_new_tokens); TRL / transformers names: "
        + ", ".join(f"--{a} = {flag(n)}" for a, n in ALIASES.items())
        + ". Bad values are one-line errors (exit code 2); --debug shows tracebacks.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    p.add_argument(
        "--config",
        action=Given,
        metavar="YAML",
        help="YAML file of the options below (keys with underscores); flags override it",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        action=Given,
        metavar="DIR",
        help="continue a run with its own config.yaml: a run directory or one of its checkpoints; bare --resume "
        "takes --output-dir. Other flags must agree with the run, except --steps (extend), --save-every, "
        "--device, --report-to, --progress, --stop-after",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    aliases: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).extend({"--" + alias, flag(alias)})
    for f in dataclasses.fields(Config):
        default = f.default
        shown = "the model recipe" if default is None and f.name in RECIPE_FIELDS else show(default)
        shown = "unset" if default is None and f.name not in RECIPE_FIELDS else shown
        text = f.metadata["help"]
        kw: dict[str, Any] = {"help": text if "(default:" in text else f"{text} (default: {shown})"}
        kind, _ = OPTIONS.kinds[f.name]
        if "choices" in f.metadata:
            kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        kw["action"] = GivenBool if kind is bool else _TaskOption if kind is dict else Given
        names = [flag(f.name)]
        if f.name == "task_options":  # one KEY=VALUE per flag, so the singular reads best
            names, kw["metavar"] = ["--task-option", flag(f.name)], "KEY=VALUE"
        p.add_argument(*names, dest=f.name, **kw)
        hidden = sorted({"--" + n.lstrip("-").replace("-", "_") for n in names} - set(names)
                        | set(aliases.get(f.name, ())))
        if hidden:
            p.add_argument(*hidden, dest=f.name, action=kw["action"], help=argparse.SUPPRESS)
    return p


def canonical_key(key: str) -> str | None:
    """Config field named by a YAML key or flag name (hyphens or underscores, TRL aliases), or None."""
    name = key.lstrip("-").replace("-", "_")
    name = ALIASES.get(name, name)
    return name if name in FIELDS else None


def _unknown(key: str, where: str) -> UsageError:
    bare = key.lstrip("-")
    if bare.replace("-", "_") in NOT_FLAGS:
        return UsageError(f"{where}{key}: not an option here; use {NOT_FLAGS[bare.replace('-', '_')]}")
    if bare.replace("-", "_") in LEGACY_TASK_OPTIONS:
        option = LEGACY_TASK_OPTIONS[bare.replace("-", "_")]
        return UsageError(f"{where}{key}: now an option of the task that declares it: --task-option {option}=VALUE "
                          f"(YAML: task_options: {{{option}: VALUE}})")
    options = [flag(n) for n in FIELDS] + ["--task-option", "--config", "--resume", "--debug"]
    given = "--" + bare.replace("_", "-")
    # a truncated flag (--out) names what it starts; otherwise the nearest spelling (--stepz -> --steps)
    close = sorted(o for o in options if o.startswith(given))[:3] or difflib.get_close_matches(given, options, n=1)
    return UsageError(
        f"{where}unknown {'key' if where else 'flag'} {key}"
        + (f" (did you mean {' or '.join(close)}?)" if close else "") + " (see --help)"
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str, legacy: bool = False) -> dict[str, tuple[Any, str]]:
    """{field: (raw value, 'path: key')} of a YAML options file; every problem is a UsageError naming the file.
    ``legacy``: the keys of :data:`LEGACY_TASK_OPTIONS` are read into ``task_options`` (a run's old config.yaml)."""
    try:
        with open(path, encoding="utf-8") as fh:
            loader = _UniqueKeyLoader(fh)  # yaml.safe_load, refusing duplicate keys
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise UsageError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path!r} is a directory") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"config file {path!r}: not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r}: expected a mapping of option: value, got a {type(data).__name__}")
    out: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        if legacy and key in LEGACY_TASK_OPTIONS:
            old = out.get("task_options", ({}, f"{path}: task_options"))
            out["task_options"] = ({**(old[0] or {}), LEGACY_TASK_OPTIONS[key]: value}, old[1])
            continue
        name = canonical_key(str(key))
        if name is None:
            raise _unknown(str(key), f"config file {path!r}: ")
        if name == "task_options" and name in out and isinstance(value, dict):  # beside legacy keys
            value = {**out[name][0], **value}
        out[name] = (value, f"{path}: {key}")
    return out


@dataclass
class Invocation:
    """One command line, parsed: the run's Config, the --resume target ('auto' = --output-dir), --debug, and
    (on --resume) the run directory and the fields changed from the run's config.yaml."""

    config: Config
    resume: str | None = None
    debug: bool = False
    run_dir: str | None = None
    changed: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)


def parse_invocation(argv: list[str] | None = None) -> Invocation:
    """Flags (and the optional YAML file), typed and validated; on --resume, the run's own config.yaml with the
    flags that may change applied. Nothing is loaded or written. Bad input raises a one-line UsageError."""
    ns, extra = build_parser().parse_known_args(argv)
    for token in extra:
        if token.startswith("-"):
            raise _unknown(token.split("=", 1)[0], "")
        raise UsageError(f"unexpected argument {token!r} (every option is a --flag; see --help)")
    args = vars(ns)
    debug = bool(args.pop("debug", False))
    given: dict[str, tuple[Any, str]] = {}
    if "config" in args:
        given.update(read_yaml(args.pop("config")[0]))
        for name, (raw, where) in given.items():  # every YAML value is checked, even one a flag overrides
            OPTIONS.check(name, OPTIONS.coerce(name, raw, where), where)
    resume = args.pop("resume", (None, None))[0]
    for name, (value, option) in args.items():
        if name == "task_options" and isinstance(given.get(name, (None,))[0], dict):  # flags override YAML per key
            value = {**given[name][0], **value}
        given[name] = (value, option)
    values = {name: OPTIONS.coerce(name, raw, where) for name, (raw, where) in given.items()}
    labels = {name: where for name, (_, where) in given.items()}
    for name, value in values.items():
        OPTIONS.check(name, value, labels[name])
    if resume is None:
        cfg = Config(**values).resolve()
        cfg.validate(labels)
        return Invocation(cfg, None, debug)
    run_dir, _ = locate_run(resume, values.get("output_dir"))
    cfg, changed = restore(run_dir, values, labels)
    cfg.validate(labels)
    return Invocation(cfg, resume, debug, run_dir, changed)


def parse(argv: list[str] | None = None) -> tuple[Config, str | None]:
    """(validated Config, resume target or None) from flags and the optional YAML file (see parse_invocation)."""
    inv = parse_invocation(argv)
    return inv.config, inv.resume


# ------------------------------------------------------------------------------------------------- resume
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"


def locate_run(resume: str, output_dir: str | None = None) -> tuple[str, str | None]:
    """(run directory, the checkpoint named, or None) for ``--resume`` (``'auto'``: ``--output-dir``). A run
    directory holds config.yaml; a checkpoint is ``<run>/checkpoints/step-*`` holding trainer_state.json. Reads only."""
    if resume == "auto":
        if not output_dir:
            raise UsageError("--resume without a directory needs --output-dir (or give the run: --resume DIR)")
        path, named = output_dir, "--output-dir"
    else:
        path, named = resume, "--resume"
    if not os.path.exists(path):
        raise UsageError(f"{named} {path!r}: no such directory")
    if not os.path.isdir(path):
        raise UsageError(f"{named} {path!r} is a file, not a run directory")
    checkpoint = None
    parent = os.path.dirname(os.path.abspath(path))
    in_checkpoints = os.path.basename(parent) == "checkpoints" and os.path.basename(path).startswith("step-")
    if os.path.exists(os.path.join(path, STATE_FILE)) or in_checkpoints:
        if not in_checkpoints:
            raise UsageError(f"{named} {path!r}: a checkpoint outside a run's checkpoints/ directory")
        checkpoint, path = path, os.path.dirname(parent)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise UsageError(
            f"{named} {path!r} is not a run directory (no {CONFIG_FILE}) nor one of its checkpoints "
            f"(no {STATE_FILE})"
        )
    if resume != "auto" and output_dir and os.path.realpath(output_dir) != os.path.realpath(path):
        raise UsageError(f"--output-dir {output_dir!r} and --resume {resume!r} name different runs")
    return path, checkpoint


def read_run_config(run_dir: str) -> Config:
    """The run's own config.yaml as a typed Config (not validated against this machine). An old run's
    ``lab_size`` / ``lab_levels`` become the task options they are now, where a task of the run declares them."""
    path = os.path.join(run_dir, CONFIG_FILE)
    raw = read_yaml(path, legacy=True)
    values = {name: OPTIONS.coerce(name, value, where) for name, (value, where) in raw.items()}
    cfg = Config(**{k: v for k, v in values.items() if OPTIONS.meta(k).get("on_resume") != "invocation"})
    with open(path, encoding="utf-8") as fh:
        mapped = {LEGACY_TASK_OPTIONS[k] for k in (yaml.safe_load(fh) or {}) if k in LEGACY_TASK_OPTIONS}
    if mapped:  # the old config wrote them for every run: keep those a task of the run declares
        names = {n for task in run_tasks(cfg) if task.options for n in declared(task.options).fields}
        cfg.task_options = {k: v for k, v in (cfg.task_options or {}).items() if k not in mapped or k in names}
        cfg.task_options = resolve_task_options(cfg)
    return cfg


def same_value(name: str, a: Any, b: Any) -> bool:
    """Equal as settings: paths compare by where they point."""
    if a == b:
        return True
    if OPTIONS.meta(name).get("path") and isinstance(a, str) and isinstance(b, str) and os.path.exists(a):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def restore(
    run_dir: str, values: dict[str, Any], labels: dict[str, str]
) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The run's Config with this invocation's values applied where allowed; returns (config, {field: (old,
    new)} for the fields changed). A given value that would change the run is a UsageError listing them all."""
    stored = read_run_config(run_dir)
    if stored.task and ":" in stored.task and values.get("task") != stored.task:  # a run directory is data
        raise UsageError(f"--resume {run_dir}: its config.yaml names the task {stored.task!r}, a module that would be "
                         f"imported (code); if you trust it, resume with --task {stored.task}")
    conflicts, changed = [], {}
    for name, value in values.items():
        mode = OPTIONS.meta(name).get("on_resume", "run")
        old = getattr(stored, name)
        if name == "task_options":  # the options given must agree with the run's, one by one
            for key, typed in typed_task_options(stored, value or {}, labels[name]).items():
                if typed != (old or {}).get(key):
                    conflicts.append(f"{labels[name]} {key}={show(typed)} (the run has "
                                     f"{show((old or {}).get(key))})")
        elif mode == "run" and not same_value(name, value, old):
            conflicts.append(f"{labels[name]} {show(value)} (the run has {show(old)})")
        elif mode == "change" and value != old:
            changed[name] = (old, value)
    if conflicts:
        raise UsageError(
            f"--resume {run_dir}: {'; '.join(conflicts)}; a resumed run keeps its config.yaml (only "
            f"{', '.join(flag(n) for n in FIELDS if OPTIONS.meta(n).get('on_resume') == 'change')} may change): "
            "start a new run to change the rest"
        )
    cfg = dataclasses.replace(stored)
    for name, value in values.items():
        if OPTIONS.meta(name).get("on_resume") in ("change", "invocation"):
            setattr(cfg, name, value)
    cfg.output_dir = run_dir
    steps = [int(d[5:]) for d in _checkpoint_dirs(run_dir) if d[5:].isdigit()]
    if steps and cfg.steps < max(steps):
        raise UsageError(f"--steps {cfg.steps} is below the run's newest checkpoint, step {max(steps)}")
    return cfg, changed


def _checkpoint_dirs(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    return sorted(d for d in os.listdir(root) if d.startswith("step-")) if os.path.isdir(root) else []


def diff_run(stored: Config, cfg: Config) -> tuple[list[str], dict[str, tuple[Any, Any]]]:
    """Compare a config with the run's stored one: (the run fields that differ, as '--flag value (the run has
    old)'; {field: (old, new)} for the fields that may change on --resume and did)."""
    conflicts, changed = [], {}
    for name in FIELDS:
        mode = OPTIONS.meta(name).get("on_resume", "run")
        old, new = getattr(stored, name), getattr(cfg, name)
        if mode == "run" and not same_value(name, new, old):
            conflicts.append(f"{flag(name)} {show(new)} (the run has {show(old)})")
        elif mode == "change" and new != old:
            changed[name] = (old, new)
    return conflicts, changed
