"""Backends by name (`parallel.backend` in a recipe): each entry builds a `Backend` for a recipe.

An engine that is an optional dependency (DeepSpeed) is imported only when its backend is built.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch

from hybrid.parallel.base import Backend
from hybrid.recipe.recipe import Recipe
from hybrid.recipe.schema import ConfigError

BackendFactory = Callable[[Recipe, Path], Backend]
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    def wrap(factory: BackendFactory) -> BackendFactory:
        BACKENDS[name] = factory
        return factory

    return wrap


@register_backend("local")
def _local(recipe: Recipe, run_dir: Path) -> Backend:
    from hybrid.parallel.local import LocalBackend

    t = recipe.train
    return LocalBackend(
        device=t.device, activation_checkpointing=t.activation_checkpointing, compile=t.compile
    )


@register_backend("deepspeed")
def _deepspeed(recipe: Recipe, run_dir: Path) -> Backend:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "parallel.backend is deepspeed but DeepSpeed is not installed; "
            "pip install 'hybrid[deepspeed]' (or deepspeed) and try again",
            key="parallel.backend",
        )
    if recipe.train.device == "cpu" or not torch.cuda.is_available():
        # DeepSpeed picks its accelerator when imported; a CPU run must not take a GPU's
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from hybrid.parallel.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend.from_recipe(recipe, run_dir)


@register_backend("megatron")
def _megatron(recipe: Recipe, run_dir: Path) -> Backend:
    from hybrid.parallel.megatron_backend import MegatronBackend

    return MegatronBackend.from_recipe(recipe)


def build_backend(recipe: Recipe, run_dir: Path) -> Backend:
    """The backend `recipe.parallel.backend` names, set up for this process."""
    factory = BACKENDS.get(recipe.parallel.backend)
    if factory is None:
        raise ConfigError(
            f"unknown backend {recipe.parallel.backend!r}; known: {sorted(BACKENDS)}",
            key="parallel.backend",
        )
    return factory(recipe, run_dir)
