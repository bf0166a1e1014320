"""The train state of a run about to take its first step, built by the trainer's own builders:
what `hybrid convert from-hf` saves beside imported weights so `hybrid train` resumes at step 0
exactly as a new run would start."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from hybrid.checkpoint.rng import capture_rng_state, restore_rng_state
from hybrid.recipe.recipe import Recipe


def seeded_rng_state(seed: int) -> dict[str, Any]:
    """The RNG state a run seeded with `seed` starts from (the caller's RNG is left as it was)."""
    before = capture_rng_state()
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return capture_rng_state()
    finally:
        restore_rng_state(before)


def fresh_train_state(recipe: Recipe) -> dict[str, Any]:
    """Step 0's train state (optimizer with no moments, schedule at its start, data position 0,
    seeded RNG), built on the meta device: no weights are allocated."""
    from hybrid.model import build_model
    from hybrid.train.optim import build_optimizer
    from hybrid.train.schedule import build_scheduler

    t = recipe.train
    model = build_model(recipe.model, device="meta")
    device = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    optimizer, _ = build_optimizer(model, t.optimizer, device)
    scheduler = build_scheduler(optimizer, t.schedule, t.steps, t.optimizer.min_lr_ratio)
    return {
        "step": 0,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": seeded_rng_state(t.seed),
        "data": {"consumed_samples": 0, "seed": t.seed},
    }
