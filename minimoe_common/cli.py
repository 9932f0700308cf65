"""Command-line flags and JSON config files from a typed config dataclass (one docstring per field), and the
entry points' error handling (`command`).

Shared by `python -m data_prep build` (BuildConfig), `minimoe-distill` (DistillConfig) and
`minimoe-finetune` (FinetuneConfig), so that the stages spell flags, help texts and type checks the same
way; and the one-line input errors (InputError) every command prints.
"""
from __future__ import annotations

import argparse
import ast
import functools
import inspect
import json
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

T = typing.TypeVar("T")


class InputError(ValueError):
    """Bad input or settings (a flag, a config file, a data file): every entry point prints
    `error: <message>` (one line naming the flag, file or line) and exits with status 2."""


def command(main: Callable[..., None]) -> Callable[..., int]:
    """A console entry point from `main`: exit status 0 when it returns; `error: <message>` on stderr and 2 for
    bad input (InputError or any ValueError, a missing file), 1 for a diverged run (FloatingPointError: a NaN/Inf
    loss or metric, from optim.check_finite)."""
    @functools.wraps(main)
    def entry_point(*args: Any, **kwargs: Any) -> int:
        try:
            main(*args, **kwargs)
        except (ValueError, FileNotFoundError, FloatingPointError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1 if isinstance(error, FloatingPointError) else 2
        return 0

    return entry_point


def refuse_invalid(config: Any, checks: dict[str, tuple[bool, str]]) -> None:
    """InputError for the first field whose check is False: `--field-name <message> (got <value>)`."""
    for name, (ok, message) in checks.items():
        if not ok:
            raise InputError(f"--{name.replace('_', '-')} {message} (got {getattr(config, name)!r})")


def check_output_dir(path: str, flag: str) -> None:
    """Refuse an output dir that cannot be created or written (an existing file, a file on the way, a
    read-only or foreign dir) before any work, not with a traceback at the first write. Creates nothing."""
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == target else f"cannot be created: {existing} is a file"
        raise InputError(f"{flag} {path}: {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {existing} is not writable")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, config_file: bool = False,
                         exclude: tuple[str, ...] = ()) -> None:
    """One --flag per field of `cls` but `exclude` (help: the field's docstring), plus --config FILE if
    `config_file`.

    Defaults stay out of the namespace (SUPPRESS) so that `config_from_args` can tell a flag that was
    given from one that was not: defaults < file < flags.
    """
    if config_file:
        parser.add_argument("--config", help="JSON file of the fields below (snake_case keys)")
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in (f for f in fields(cls) if f.name not in exclude):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        shown = default not in (MISSING, None, "")  # "" and None mean "see the docstring"
        helptext = (docs[f.name] + (f" (default: {_shown(default)})" if shown else "")).replace("%", "%%")
        parser.add_argument("--" + f.name.replace("_", "-"), help=helptext, default=argparse.SUPPRESS,
                            required=default is MISSING, **_argparse_type(hints[f.name]), **f.metadata)


def _shown(default: Any) -> str:
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)


def config_from_args(cls: type[T], args: argparse.Namespace, **fixed: Any) -> T:
    """`cls` from `fixed` over the parsed flags over the --config file (if any) over the field defaults."""
    flags = dict(vars(args))
    file = flags.pop("config", None)
    values = read_config_file(Path(file), cls) if file else {}
    return cls(**(values | flags | fixed))


def changed_fields(old: dict[str, Any], new: dict[str, Any], paths: tuple[str, ...] = (),
                   keep: tuple[str, ...] = ()) -> list[str]:
    """"--name old -> new" for each field of `new` but `keep` whose value differs from `old`'s: what a rerun
    over an earlier run's output changed. Fields in `paths` are compared as real paths (the same dir given
    relative or absolute, from another working directory, is no change)."""
    def real(name: str, value: Any) -> Any:
        return os.path.realpath(value) if name in paths and value else value

    return [f"--{name.replace('_', '-')} {old.get(name)!r} -> {value!r}" for name, value in new.items()
            if name not in keep and real(name, old.get(name)) != real(name, value)]


def read_config_file(path: Path, cls: type) -> dict[str, Any]:
    """The JSON object in `path`, its keys checked against the fields of `cls`: unknown or mistyped keys
    are errors naming the file and the field, not a silently ignored setting."""
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the config: {e}") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: the config must be a JSON object of fields, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in fields(cls))
    for key, value in values.items():
        if key not in known:
            raise InputError(f"{path}: unknown field {key!r}; known: {known}")
        if not _json_value_fits(value, hints[key]):
            raise InputError(f"{path}: field {key!r} must be {_unwrap_optional(hints[key])[0].__name__}, got {value!r}")
    return values


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (Python keeps none at run time, so read the source)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: " ".join(doc.value.value.split())
            for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed): `int | None` -> (int, True)."""
    rest = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and len(rest) == 1:
        return rest[0], True
    return hint, False


def _argparse_type(hint: Any) -> dict[str, Any]:
    """add_argument keywords for a field type: list[X] takes one or more values; bool gets --flag and
    --no-flag (so a file's true can be turned off again on the command line)."""
    kind = _unwrap_optional(hint)[0]
    if typing.get_origin(kind) is list:
        return {"nargs": "+", "type": typing.get_args(kind)[0]}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": kind}


def _json_value_fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the field's type (JSON has no int/float split, so 3 fits a float)."""
    kind, optional = _unwrap_optional(hint)
    if value is None:
        return optional
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(_json_value_fits(v, typing.get_args(kind)[0]) for v in value)
    if isinstance(value, bool):  # a bool is an int in Python, but not a number in a config
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))
