"""`from-hf`: a Hugging Face model directory of a supported class -> a new run directory of ours.

The model config is derived from config.json by the target whose `model_type` it names. When
the directory holds the `hybrid_recipe.yaml` that `to-hf` wrote and that recipe describes the
same model (its HF config derives the same model config), the recipe is restored whole: the
round trip ours -> HF -> ours is then exact, recipe and weights. Otherwise the recipe is the
derived model plus default data/train sections (tokenizer: the copied tokenizer.json).

The weights are read from the safetensors files, mapped to canonical names, widened to float32
(our master weights) and written with a fresh train state (see `checkpoints.save_ours`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from hybrid.convert._hf import require_transformers
from hybrid.convert.base import ExportSpec, StateReader, Target, target_for_model_type
from hybrid.convert.checkpoints import save_ours
from hybrid.convert.export import RECIPE_FILE
from hybrid.convert.safetensors_io import read_safetensors
from hybrid.convert.tokenizer_files import import_tokenizer
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.recipe import Recipe, load_recipe
from hybrid.recipe.schema import ConfigError, to_dict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ImportResult:
    run_dir: Path
    step_dir: Path
    target: Target
    recipe: Recipe
    state: dict[str, Tensor]
    restored_recipe: bool  # hybrid_recipe.yaml was used


def load_hf_config(hf_dir: Path) -> tuple[Target, Any]:
    """(target, transformers config) of an HF model directory. The remote-code config is built
    with hybrid's own copy of its class, so no code from the directory is executed."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: invalid JSON ({err})") from None
    target = target_for_model_type(str(raw.get("model_type")))
    hf = require_transformers()
    if target.remote_code:
        from hybrid.convert.remote_code.configuration_hybrid_lm import HybridLMConfig

        return target, HybridLMConfig.from_dict(raw)
    return target, hf.AutoConfig.from_pretrained(str(hf_dir))


def _stored_recipe(hf_dir: Path, target: Target, derived: ModelConfig) -> Recipe | None:
    """The recipe `to-hf` stored in hf_dir, if it describes the model there."""
    path = hf_dir / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        recipe = load_recipe(path)
        same = not target.mismatches(recipe.model) and to_dict(
            target.model_config(target.hf_config(recipe.model, ExportSpec()))
        ) == to_dict(derived)
    except ConfigError as err:
        log.warning("ignoring %s: %s", path, err)
        return None
    if not same:
        log.warning("%s does not describe the model in %s; deriving the recipe", path, hf_dir)
        return None
    return recipe


def _widen(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Floating tensors as float32 (tied tensors stay one tensor)."""
    done: dict[int, Tensor] = {}
    out = {}
    for key, t in state.items():
        if id(t) not in done:
            done[id(t)] = t.float().contiguous() if t.is_floating_point() else t
        out[key] = done[id(t)]
    return out


def import_from_hf(
    hf_dir: str | Path,
    run_dir: str | Path,
    *,
    train_state: Callable[[Recipe], dict],
    name: str | None = None,
) -> ImportResult:
    """Convert the HF model in `hf_dir` into step 0 of the new run directory `run_dir`, with the
    train state `train_state(recipe)` gives (`hybrid.train.fresh_state.fresh_train_state`)."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"{hf_dir}: no such directory")
    if (run_dir / "checkpoints").exists():
        raise ConfigError(f"{run_dir} already holds a run; choose a new output directory")
    target, hf_cfg = load_hf_config(hf_dir)
    derived = target.model_config(hf_cfg)
    stored = _stored_recipe(hf_dir, target, derived)
    recipe = stored or Recipe(name=name or hf_dir.resolve().name, model=derived)
    reader = StateReader(read_safetensors(hf_dir), f"HF model {hf_dir}")
    state = _widen(target.from_hf(reader, hf_cfg, recipe.model))
    reader.finish()
    data = recipe.data
    if stored is None or data.tokenizer.kind == "hf":
        tokenizer = import_tokenizer(hf_dir, run_dir / "tokenizer")
        if tokenizer is not None:
            data = dataclasses.replace(data, tokenizer=tokenizer)
    train = dataclasses.replace(recipe.train, run_dir=str(run_dir.resolve()))
    recipe = dataclasses.replace(recipe, name=name or recipe.name, data=data, train=train)
    meta = {"converted_from": str(hf_dir.resolve()), "hf_class": target.architecture}
    step_dir = save_ours(run_dir, recipe, state, meta, train_state(recipe))
    return ImportResult(run_dir, step_dir, target, recipe, state, stored is not None)


__all__ = ["ImportResult", "import_from_hf", "load_hf_config"]
