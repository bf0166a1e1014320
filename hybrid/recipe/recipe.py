"""`Recipe`: the whole of what a user writes (model, data, training, parallelism)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from hybrid.recipe.data_config import DataConfig
from hybrid.recipe.loader import apply_overrides, load_recipe_dict, source_of
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError, from_dict, to_dict
from hybrid.recipe.train_config import TrainConfig


@dataclass(kw_only=True)
class ParallelConfig:
    """How training is spread over devices. `local`: one process, or DDP under torchrun."""

    backend: Literal["local"] = "local"


@dataclass(kw_only=True)
class Recipe:
    name: str = "unnamed"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def recipe_from_dict(
    data: dict, *, provenance: dict | None = None, file: str | None = None
) -> Recipe:
    """Typed recipe from a merged dict; errors name the key path and the file that set it."""
    try:
        return from_dict(Recipe, data)
    except ConfigError as err:
        raise err.with_context(file=source_of(err.key, provenance or {}, file)) from None


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe file (with its `base:` chain) and apply `--set key=value` overrides."""
    data, provenance = load_recipe_dict(path)
    data = apply_overrides(data, overrides, provenance)
    data.setdefault("name", Path(path).stem)
    return recipe_from_dict(data, provenance=provenance, file=str(path))
