"""Our side of a conversion: read one of our checkpoints in canonical form, write a new one.

Reading goes through `hybrid.checkpoint.store.load_checkpoint` (a run directory or a step
directory; canonical names, tensors on CPU). Writing uses `save_checkpoint`, so a converted
checkpoint has exactly the layout of a training run's: `RUN_DIR/checkpoints/step-00000000/` with
the model weights, a *fresh* train state (step 0, an AdamW state with no moments, the schedule at
its start, data position 0) that the caller builds with the trainer's own builders
(`hybrid.train.fresh_state`, passed in from the command layer, so convert does not import
train), recipe.yaml and meta.json, plus `RUN_DIR/recipe.yaml`. `hybrid train
RUN_DIR/recipe.yaml` then resumes it at step 0.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from torch import Tensor

from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.recipe import Recipe, recipe_from_dict
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OurCheckpoint:
    """A checkpoint of ours: where it came from, its recipe and canonical model state (CPU)."""

    path: Path
    step: int
    recipe: Recipe
    state: dict[str, Tensor]

    @property
    def model(self) -> ModelConfig:
        return self.recipe.model


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor of `cfg`'s model (built on the meta device)."""
    from hybrid.model import build_model

    model = build_model(cfg, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(state: dict[str, Tensor], cfg: ModelConfig, what: str) -> None:
    """ConfigError unless `state` has exactly the names and shapes of `cfg`'s model."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes))
    wrong = [k for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label} {', '.join(keys[:3])}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("reshaped", wrong))
            if keys
        )
        raise ConfigError(f"{what}: the weights do not fit its model section ({detail})")


def load_ours(path: str | Path) -> OurCheckpoint:
    """A run directory or step directory of ours, checked against its recipe's model."""
    from hybrid.checkpoint.store import load_checkpoint

    ckpt = load_checkpoint(Path(path))
    recipe = recipe_from_dict(ckpt.recipe, file=str(ckpt.path / "recipe.yaml"))
    check_state(ckpt.model_state, recipe.model, f"checkpoint {ckpt.path}")
    return OurCheckpoint(path=ckpt.path, step=ckpt.step, recipe=recipe, state=ckpt.model_state)


def save_ours(
    run_dir: Path, recipe: Recipe, state: dict[str, Tensor], meta: dict, train_state: dict
) -> Path:
    """Write `state` as step 0 of a new run directory with `train_state` (the trainer's fresh
    one: `hybrid.train.fresh_state.fresh_train_state`); refuses a directory holding a run."""
    from hybrid.checkpoint.store import find_latest, list_checkpoints, save_checkpoint

    if run_dir.exists() and (list_checkpoints(run_dir) or find_latest(run_dir) is not None):
        raise ConfigError(
            f"{run_dir} already holds checkpoints; choose a new output directory (nothing was "
            "overwritten)"
        )
    check_state(state, recipe.model, "the converted model")
    order = expected_shapes(recipe.model)
    model_state = {k: state[k] for k in order}
    step_dir = save_checkpoint(
        run_dir,
        0,
        model_state=model_state,
        train_state=train_state,
        recipe=recipe.to_dict(),
        keep=recipe.train.keep_checkpoints,
        meta=meta,
    )
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    log.info("wrote %s", step_dir)
    return step_dir
