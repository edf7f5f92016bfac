"""Dataclass configs with help text, turned into argparse options.

Each field's ``metadata["help"]`` is its documentation; `add_dataclass_args`
makes ``--field-name`` options from them so the CLI, the Python API and the
JSON reports share one definition of every setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def field(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with help text (and optional ``choices`` and ``metavar`` for its option)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **kw}
        )
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _base_type(tp) -> tuple[type, bool]:
    """(element type, is_list) of a field annotation: ``int | None`` -> (int, False), ``list[str]`` -> (str, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return _base_type(typing.get_args(tp)[0])[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """A ``--field-name`` option on ``parser`` for every field of ``cls`` that has help text.

    ``cls`` is a dataclass, or an instance of one whose values are the options'
    defaults (a script that shares a command's settings but not all its
    defaults). Booleans become ``--x/--no-x``, lists take one or more values.
    Fields named in ``skip`` get no option. ``prefix`` (e.g. ``"timing"``) names
    the options ``--timing-field-name`` (read back with ``from_args(cls, args,
    prefix="timing")``), for a config whose field names clash with another's
    on the same parser.
    """
    instance = None if isinstance(cls, type) else cls
    cls = type(cls) if instance is not None else cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("help"):
            continue
        tp, is_list = _base_type(hints[f.name])
        if instance is not None:
            default = getattr(instance, f.name)
            default = list(default) if is_list else default  # not the instance's own list
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = f"{prefix}_{f.name}" if prefix else f.name
        opt = "--" + name.replace("_", "-")
        shown = " ".join(map(str, default)) if is_list else default
        kwargs: dict[str, Any] = {"dest": name, "default": default, "help": f.metadata["help"]}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            if "metavar" in f.metadata:  # argparse then no longer lists the choices itself
                kwargs["help"] += "; from " + ", ".join(map(str, f.metadata["choices"]))
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        kwargs["help"] += f" (default: {shown})"
        if tp is bool:
            parser.add_argument(opt, action=argparse.BooleanOptionalAction, **kwargs)
        elif is_list:
            parser.add_argument(opt, nargs="+", type=tp, **kwargs)
        else:
            parser.add_argument(opt, type=tp, **kwargs)


def from_args(cls, args: argparse.Namespace, prefix: str = ""):
    """An instance of the dataclass ``cls`` from the parsed options of `add_dataclass_args` (other keys ignored;
    ``prefix`` as given there)."""
    dests = {(f"{prefix}_{f.name}" if prefix else f.name): f.name for f in dataclasses.fields(cls)}
    return cls(**{dests[k]: v for k, v in vars(args).items() if k in dests})
