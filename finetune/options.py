"""Config dataclasses as command lines: one ``--flag`` per field, its help the field's docstring.

``add_arguments`` / ``from_args`` turn a dataclass into argparse options and back, ``to_json`` records a
config in a run's files, and ``flag`` names a field as its flag in error messages.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin


class FlagError(ValueError):
    """A flag's value that only the data or the checkpoint shows to be wrong (found before training starts)."""


def flag(name: str) -> str:
    """``max_minutes`` -> ``--max-minutes`` (for error messages)."""
    return "--" + name.replace("_", "-")


C = TypeVar("C")


def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right after ``name: type = default``) of a class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per dataclass field, typed, with the attribute docstring as help."""
    docs = _attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _strip_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"help": docs.get(f.name, ""), "default": default, "dest": f.name}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is tuple:
            kwargs.update(action="append", type=get_args(tp)[0], default=None)
            kwargs["help"] += f" (default: {' '.join(map(str, default or ())) or 'none'})"
        elif get_origin(tp) is Literal:
            kwargs.update(choices=get_args(tp))
        else:
            kwargs["type"] = tp
        parser.add_argument(flag(f.name), **kwargs)


def from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """Build the config from parsed flags; unset repeatable flags keep the dataclass default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f.name, None)
        if value is None:
            continue
        values[f.name] = tuple(value) if isinstance(value, list) else value
    values.update(overrides)
    return cls(**values)


def to_json(cfg: Any) -> dict[str, Any]:
    """JSON-friendly dict of a config (tuples as lists, paths as strings)."""
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(cfg).items():
        out[key] = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
    return out
