"""Config fields that are command-line options, declared once (peft-style field metadata).

A field made with `option(...)` carries its help text, its choices (a module's constant) and, where
it differs from the field's name, its flag. The CLI builds every option from these fields and the
configs check their choices from them, so a default, a choice list or a help text is written in
one place; a field without help is a library setting, not an option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from p2d import P2DError


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[str] | None = None,
           flag: str | None = None) -> Any:
    """A dataclass field that is also an option of the commands that expose its config (no default: required)."""
    meta = {"help": help} | ({"choices": tuple(choices)} if choices is not None else {}) | ({"flag": flag} if flag else {})
    return dataclasses.field(default=default, metadata=meta)


def option_fields(config) -> list[dataclasses.Field]:
    """The fields of a config (class or instance) that are options, in declaration order."""
    return [f for f in dataclasses.fields(config) if "help" in f.metadata]


def flag(config, name: str) -> str:
    """The flag of field `name`, as errors name it: its declared flag, else --name-with-dashes."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def check_choices(config) -> None:
    """Every field with declared choices holds one of them (a config made in Python, or read from a file)."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is not None and value is not None and value not in choices:  # None: an option left unset
            raise P2DError(f"{flag(config, f.name)} must be one of {', '.join(choices)}, got {value!r}")
