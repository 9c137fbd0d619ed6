"""Typed dataclasses from plain mappings (YAML, overrides, checkpoints): unknown keys and wrong types are refused
with one line naming the key and what is allowed; `Section` is the base of a section whose values have rules. The
sections themselves are `pretrain.config`'s."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


RANGES: dict[str, Callable[[Any], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    "in [0, 1)": lambda v: 0.0 <= v < 1.0,
    "in (0, 1]": lambda v: 0.0 < v <= 1.0,
}
"""The ranges a section's `check` asks for by name; the name is also the message (`train.steps=0 must be > 0`)."""


def in_range(section: object, name: str, rule: str, *fields: str) -> None:
    """Raise ConfigError `name.field=value must be RULE` for the first of `fields` outside `RANGES[rule]`."""
    for f in fields:
        value = getattr(section, f)
        if not RANGES[rule](value):
            raise ConfigError(f"{name}.{f}={value} must be {rule}")


class Section:
    """Base of a config section: types are checked as it is built (`build_dataclass`); the rules on its values
    live in its own `check`, next to the fields they are about. `pretrain.config.Config` runs every section's
    `check` with the section's name when it is built, so an invalid config is never handed to a run."""

    def check(self, name: str) -> None:
        """Raise ConfigError naming `name.field` for a value its rules refuse (a section without rules has none)."""


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; {where} accepts: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key` and the allowed type or values."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args or type(value) is not type(args[args.index(value)]):
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} numbers")
        return tuple(coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported type {tp}")  # a programming error in a config dataclass


def plain(obj: Any) -> Any:
    """`obj` with tuples as lists, recursively (what YAML and JSON write)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return [plain(v) for v in obj] if isinstance(obj, list | tuple) else obj
