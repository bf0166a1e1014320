"""Sweeps: `--sweep key=v1,v2,...` (repeatable) -> one run per combination, a Slurm job array.

Values are YAML-typed like `--set` values (`0.5` a float, `M*M*` a string). Several `--sweep`
flags make the Cartesian product, in the order given (the last key varies fastest). Each run gets
its own run directory `ROOT/INDEX-KEY=VALUE...` (characters other than letters, digits and
`._+=-` become `_`), so runs never share checkpoints.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hybrid.recipe.schema import ConfigError

# Keys that are the same for every task of one job, or that the sweep itself sets.
_NOT_SWEEPABLE = ("cluster", "train.run_dir")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+", re.ASCII)
MAX_DIR_NAME = 96


@dataclass(frozen=True)
class SweepAxis:
    """One `--sweep` flag: a dotted recipe key and its values as written (YAML text)."""

    key: str
    values: tuple[str, ...]


def parse_sweep(text: str) -> SweepAxis:
    """`train.optimizer.lr=1e-3,3e-3` -> SweepAxis('train.optimizer.lr', ('1e-3', '3e-3'))."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--sweep expects key.path=v1,v2,..., got {text!r}")
    if any(key == k or key.startswith(k + ".") for k in _NOT_SWEEPABLE):
        raise ConfigError(
            f"--sweep {key}: cannot differ between the runs of one job array "
            "(submit separate jobs, or use --set for one value)"
        )
    values = tuple(v.strip() for v in raw.split(","))
    if not raw.strip() or any(v == "" for v in values):
        raise ConfigError(f"--sweep {key}: empty value in {raw!r}; give v1,v2,... (no blanks)")
    if len(set(values)) != len(values):
        raise ConfigError(f"--sweep {key}: a value is repeated in {raw!r}")
    return SweepAxis(key, values)


def expand(axes: Sequence[SweepAxis]) -> list[tuple[tuple[str, str], ...]]:
    """Every combination as ((key, value), ...); [()] when there is no axis (a single run)."""
    keys = [a.key for a in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"--sweep {repeated[0]} is given twice; list all values in one flag")
    return [tuple(zip(keys, combo)) for combo in itertools.product(*(a.values for a in axes))]


def overrides_of(combo: tuple[tuple[str, str], ...]) -> list[str]:
    """The `--set` form of one combination."""
    return [f"{key}={value}" for key, value in combo]


def run_dir_name(index: int, combo: tuple[tuple[str, str], ...]) -> str:
    """`3-lr=3e-3-pattern=M_M_`: the task index keeps names unique after sanitising."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in combo]
    name = _UNSAFE.sub("_", "-".join([str(index), *parts]))
    return name[:MAX_DIR_NAME]
