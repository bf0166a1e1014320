"""Recipe files -> merged plain dict -> typed `Recipe`.

A recipe may name `base: other.yaml` (relative to itself); the base is loaded first (recursively,
cycles rejected) and the recipe deep-merged over it: mappings merge key by key, anything else
replaces. `--set key.path=value` overrides are applied last; values are parsed as YAML scalars
(`3` -> int, `true` -> bool, `[1, 2]` -> list), anything unparsable stays a string. Every key
remembers the file (or `--set`) that set it, so errors name where to fix them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from hybrid.recipe.schema import ConfigError

SET_SOURCE = "--set"


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with YAML 1.2 scalars: `1:7` is a string (not base-60 67) and only
    true/false are booleans (not yes/no/on/off)."""


RecipeLoader.yaml_implicit_resolvers = {
    key: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"),
    list("-+0123456789"),
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9][0-9_]*(?:[eE][-+]?[0-9]+)"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError("recipe file not found", file=str(path))
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"invalid YAML{where}: {problem}", file=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("a recipe must be a mapping of keys to values", file=str(path))
    return data


def _record(data: Any, prefix: str, source: str, provenance: dict[str, str]) -> None:
    if prefix:
        provenance[prefix] = source
    if isinstance(data, Mapping):
        for key, value in data.items():
            _record(value, f"{prefix}.{key}" if prefix else str(key), source, provenance)


def deep_merge(base: dict, over: Mapping) -> dict:
    """A copy of `base` with `over` merged in (mappings recursively, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe_dict(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """Load a recipe file with its `base:` chain; returns (merged dict, key -> source file)."""
    path = Path(path).resolve() if not _chain else Path(path)
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"base: cycle {cycle}", file=str(_chain[-1]))
    data = _read_yaml(path)
    base_name = data.pop("base", None)
    provenance: dict[str, str] = {}
    merged: dict = {}
    if base_name is not None:
        if not isinstance(base_name, str):
            raise ConfigError("base must be a file path", key="base", file=str(path))
        base_path = (path.parent / base_name).resolve()
        if not base_path.is_file():
            raise ConfigError(
                f"base recipe {base_name!r} not found (looked in {path.parent})",
                key="base",
                file=str(path),
            )
        merged, provenance = load_recipe_dict(base_path, (*_chain, path))
    _record(data, "", str(path), provenance)
    return deep_merge(merged, data), provenance


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    return key.split("."), _parse_value(raw.strip())


def _parse_value(raw: str) -> Any:
    try:
        value = load_yaml(raw) if raw else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, (list, dict)) and not raw.startswith(("[", "{")):
        return raw  # e.g. "-" or "a: b" meant as plain text
    return value


def apply_overrides(data: dict, overrides: Iterable[str], provenance: dict[str, str]) -> dict:
    """A copy of `data` with each `key.path=value` set (creating mappings as needed)."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"cannot set {'.'.join(parts)}: {where} is not a mapping",
                    key=where,
                    file=SET_SOURCE,
                )
            node = child
        node[parts[-1]] = value
        _record(value, ".".join(parts), SET_SOURCE, provenance)
    return out


def source_of(key: str | None, provenance: Mapping[str, str], default: str | None) -> str | None:
    """The file that set `key` (or its nearest parent key)."""
    while key:
        if key in provenance:
            return provenance[key]
        key = key.rpartition(".")[0].split("[")[0] if "." in key else ""
    return default
