"""Options and command lines: how an option is declared, typed and checked, and what every CLI of the engine shares.

An option is one field of a dataclass, declared in one line (the run's :class:`engine.config.Config`, a task's own
options, ``Task.options``)::

    my_knob: float = option(0.5, "what it does", check=in_range(0, 1))

Its annotation is its type (bool, int, float or str, optionally ``| None``; ``dict | None`` for a mapping), and
flags and YAML are both read by it: ``lr: 1e-3`` (a string to YAML 1.1) is the float 0.001, ``steps: 2.5`` or
``lr: fast`` is a one-line error naming the key. Optional keywords of :func:`option`: ``choices``, ``check`` (a
validator from :func:`at_least`, :func:`greater_than`, :func:`in_range` or any ``value -> problem text or None``),
``sep`` (a comma list, also accepted as a YAML list), ``infinite`` (``inf`` is a value, e.g. a clip that is off),
``path`` (compared by where it points), ``mapping`` (a string option that also takes a YAML mapping) and
``on_resume`` (``Config`` only: see ``engine/invocation.py``). :class:`Declared` reads a dataclass's declarations
once and types (:meth:`Declared.coerce`) and checks (:meth:`Declared.check`) values by them.

Every command line of the engine (``engine.train``, ``engine.evaluate``, ``engine.prompts``, ``engine.reproduce``)
parses with :class:`OneLineParser`, checks a device with :func:`device_problem` and ends on bad input with
:func:`fail`: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import typing
from collections.abc import Callable
from typing import Any

from atesd.engine.errors import UsageError

Check = Callable[[Any], "str | None"]
KIND_TEXT = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


# ----------------------------------------------------------------------------------------------- declaring
def option(default: Any, help: str, **kw) -> Any:
    """A dataclass field declaring an option: ``help`` and the optional keywords of the module docstring."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


def greater_than(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo:g}"


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    text = f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(v: float) -> str | None:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else text

    return check


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def show(v: Any) -> str:
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v)


class Declared:
    """The options of one dataclass, read once: each field's base type, whether it may be None, its metadata."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        self.kinds: dict[str, tuple[type, bool]] = {}
        for name in self.fields:
            args = [a for a in typing.get_args(hints[name]) if a is not type(None)]
            kind, optional = (args[0], True) if args else (hints[name], False)
            kind = typing.get_origin(kind) or kind  # dict[str, Any] -> dict
            if kind not in KIND_TEXT:
                raise TypeError(f"{cls.__name__}.{name}: options are bool, int, float, str or dict (or X | None), "
                                f"not {kind}")
            self.kinds[name] = (kind, optional)

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def meta(self, name: str) -> typing.Mapping[str, Any]:
        return self.fields[name].metadata

    def default(self, name: str) -> Any:
        return self.fields[name].default

    def coerce(self, name: str, value: Any, where: str) -> Any:
        """``value`` (a flag's string or a YAML value) as option ``name``'s type; UsageError naming ``where``."""
        kind, optional = self.kinds[name]
        meta = self.meta(name)

        def bad(problem: str) -> UsageError:
            return UsageError(f"{where}: {problem}, got {show(value)}")

        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and optional):
            if optional:
                return None
            raise bad(f"expected {KIND_TEXT[kind]}")
        if kind is dict:
            if not isinstance(value, dict):
                raise bad("expected a mapping of option: value")
            return {str(k): v for k, v in value.items()}
        if isinstance(value, dict) and meta.get("mapping"):
            return value  # e.g. prompts: a YAML mapping of templates, checked where it is used
        if isinstance(value, list) and meta.get("sep") and all(isinstance(x, (str, int, float)) for x in value):
            value = meta["sep"].join(str(x) for x in value)
        if isinstance(value, (list, dict)):
            raise bad(f"expected {KIND_TEXT[kind]}, not a {'list' if isinstance(value, list) else 'mapping'}")
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise bad("expected true or false")
        if kind in (int, float):
            if isinstance(value, bool):
                raise bad(f"expected {KIND_TEXT[kind]}")
            try:
                number = float(value) if isinstance(value, str) else value
                if isinstance(value, str) and kind is int and value.strip().lstrip("+-").isdigit():
                    number = int(value)
            except ValueError:
                raise bad(f"expected {KIND_TEXT[kind]}") from None
            if not isinstance(number, (int, float)) or math.isnan(number):
                raise bad(f"expected {KIND_TEXT[kind]}")
            if kind is float:
                return float(number)
            if isinstance(number, float) and not number.is_integer():
                raise bad("expected an integer")
            return int(number)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a YAML number for a text option (exposure: 'fixed:0.5' needs quotes; levels: 1)
        if not isinstance(value, str):
            raise bad("expected a string")
        return value

    def check(self, name: str, value: Any, where: str) -> None:
        """The option's choices and check on a coerced value (None passes: it means 'default' or 'off')."""
        meta = self.meta(name)
        if value is None:
            return
        if "choices" in meta and value not in meta["choices"]:
            raise UsageError(f"{where}: {show(value)} is not one of {', '.join(meta['choices'])}")
        if isinstance(value, float) and math.isinf(value) and not meta.get("infinite"):
            raise UsageError(f"{where}: must be finite, got {value}")
        problem = meta["check"](value) if "check" in meta else None
        if problem:
            raise UsageError(f"{where}: {problem}, got {show(value)}")


@functools.cache
def declared(cls: type) -> Declared:
    """:class:`Declared` of ``cls``, read once per class."""
    return Declared(cls)


def device_problem(spec: str) -> str | None:
    """Why ``spec`` (auto | cpu | cuda[:i]) cannot be used on this machine, or None."""
    if spec == "auto":
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        return "not a device; use auto, cpu, cuda or cuda:<i>"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"device type {device.type!r} is not supported; use auto, cpu, cuda or cuda:<i>"
    if not torch.cuda.is_available():
        return (
            "CUDA is not available on this machine"
            + (" (this torch is a CPU-only build)" if torch.version.cuda is None else " (no GPU is visible)")
            + "; use --device cpu or auto"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


# ----------------------------------------------------------------------------------------------- command lines
class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors (one line, exit 2, printed by the entry point)."""

    def error(self, message: str):
        if message.startswith("argument "):
            message = message[len("argument ") :]
        raise UsageError(message.replace("/--", " / --"))


class Given(argparse.Action):
    """Stores (value, the option string the user typed), so errors name the flag as typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (values, option_string))


class GivenBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            setattr(namespace, self.dest, (not option_string.startswith("--no-"), option_string))


def one_line(text: Any) -> str:
    """A message's lines joined by '; ' (a CLI prints every error as one line)."""
    return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def fail(message: str, code: int):
    """Print ``message`` on stderr and exit with ``code`` (2: bad input; 1: a failure; 130: interrupted)."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)
