"""Click options built from config fields (p2d.config.option): default, type, choices and help come from
the dataclass, so the CLI and the library cannot disagree on them."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable

import click

from p2d.config import flag, option_fields

REPEAT_HELP = " Repeat it for several sources (one pool)."


def _default(config, f: dataclasses.Field):
    if not isinstance(config, type):
        return getattr(config, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _kind(hint) -> tuple[type, bool]:
    """(click's scalar type, repeatable) for a field's annotation: `int | None` is an int, `str | list[str]` a
    repeatable str."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    repeatable = any(typing.get_origin(a) is list for a in args)
    scalar = next((a for a in args if a in (bool, int, float, str)), str)
    return scalar, repeatable


def field_option(config, name: str, param: str | None = None, *aliases: str, **overrides) -> Callable:
    """The click option of field `name` of `config` (a dataclass, or an instance whose values are the
    defaults). `param` names the function argument (default: the field's name); `overrides` replace
    anything derived."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    # a param named otherwise than the field (p2d run's --proxy-steps, --mine-max-length) is its own flag
    decl = flag(config, name) if param in (None, name) else "--" + param.replace("_", "-")
    param = param or name
    scalar, repeatable = _kind(typing.get_type_hints(config if isinstance(config, type) else type(config))[name])
    default, help_text = _default(config, f), f.metadata["help"]
    kw: dict = {"help": help_text}
    if scalar is bool:
        decl = f"{decl}/--no-{decl[2:]}" if default else decl  # a flag on by default can be switched off
        kw |= {"is_flag": True, "default": bool(default)}
    else:
        kw["type"] = click.Choice(f.metadata["choices"]) if "choices" in f.metadata else scalar
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = [default] if repeatable and isinstance(default, str) else default
        if repeatable:
            kw |= {"multiple": True, "help": help_text + REPEAT_HELP}
    return click.option(decl, *aliases, param, **(kw | overrides))


def field_options(config, skip: Iterable[str] = (), only: Iterable[str] | None = None,
                   overrides: dict[str, dict] | None = None) -> Callable:
    """Every option field of `config` (declaration order), less `skip`, or just `only`."""
    overrides = overrides or {}
    names = [f.name for f in option_fields(config) if f.name not in set(skip) and (only is None or f.name in only)]

    def apply(fn: Callable) -> Callable:
        for n in reversed(names):
            fn = field_option(config, n, **overrides.get(n, {}))(fn)
        return fn

    return apply


def split(kw: dict, config) -> dict:
    """The arguments in `kw` that are fields of `config`, removed from `kw`."""
    names = {f.name for f in dataclasses.fields(config)}
    return {k: kw.pop(k) for k in list(kw) if k in names}

