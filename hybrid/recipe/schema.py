"""Typed config dataclasses <-> plain dicts (the YAML form).

The dataclasses are the schema: `from_dict` walks a class's type hints, converts and checks each
value, rejects unknown keys with a suggestion, and reports every problem as a `ConfigError` naming
the dotted key path (and the recipe file that set it, when known). `to_dict` is the inverse.

Supported field types: bool, int, float, str, Literal[...], X | None, tuple[...], list[X],
dict[str, X], Any, and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A problem with something the user set: a recipe key, a `--set` override, a CLI flag.

    `key` is the dotted path of the offending setting, `file` where it came from.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key
        self.file = file

    def with_context(self, *, prefix: str = "", file: str | None = None) -> ConfigError:
        key = ".".join(p for p in (prefix, self.key or "") if p) or None
        return ConfigError(self.message, key=key, file=self.file or file)

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.key) if p)
        return f"{where}: {self.message}" if where else self.message


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert_number(tp: type, value: Any, path: str) -> int | float:
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value) if tp is float else _int_from_text(value, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"expected {tp.__name__}, got {value!r}", key=path)
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"expected an integer, got {value!r}", key=path)
        return int(value)
    return float(value)


def _int_from_text(text: str, path: str) -> int:
    number = float(text)
    if not math.isfinite(number) or not number.is_integer():
        raise ConfigError(f"expected an integer, got {text!r}", key=path)
    return int(number)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError("must be set (got null)", key=path)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(" or ".join(errors), key=path)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = _suggest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{value!r} is not one of {list(choices)}{hint}", key=path)
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path=path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", key=path)
        return value
    if tp in (int, float):
        return _convert_number(tp, value, path)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. name: 2024
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", key=path)
        return value
    if origin is tuple:
        return _convert_tuple(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", key=path)
        (item,) = get_args(tp)
        return [_convert(item, v, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {value!r}", key=path)
        _, item = get_args(tp)
        return {str(k): _convert(item, v, _join(path, str(k))) for k, v in value.items()}
    raise TypeError(f"schema: unsupported field type {tp!r} at {path}")


def _convert_tuple(tp: Any, value: Any, path: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"expected a list, got {value!r}", key=path)
    args = get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, _join(path, i)) for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"expected a list of {len(args)} values, got {value!r}", key=path)
    return tuple(_convert(a, v, _join(path, i)) for i, (a, v) in enumerate(zip(args, value)))


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def from_dict(cls: type[T], data: Any, *, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types (see module docstring)."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of {cls.__name__} settings, got {data!r}", key=path)
    names = field_names(cls)
    for key in data:
        if key not in names:
            hint = _suggest(str(key), names) or f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key{hint}", key=_join(path, str(key)))
    hints = get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, _join(path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.with_context(prefix=path) from None


def to_dict(obj: Any) -> Any:
    """The plain (YAML/JSON-ready) form of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isinf(obj):
        return obj  # YAML writes .inf; JSON callers must handle it
    return obj


def check(condition: bool, key: str, message: str) -> None:
    """Raise a `ConfigError` on `key` unless `condition` holds (for `__post_init__` checks)."""
    if not condition:
        raise ConfigError(message, key=key)


def is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


__all__ = [
    "ConfigError",
    "check",
    "field_names",
    "from_dict",
    "to_dict",
    "is_optional",
]
