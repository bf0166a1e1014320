"""Learning-rate schedules as pure functions of the step, wrapped in a LambdaLR.

`lr_factor(step)` multiplies the base LR. Step s is the number of optimizer steps already taken
(the LR used by step s+1). Warmup is linear from lr/warmup to lr.
"""

from __future__ import annotations

import functools
import math

import torch

from hybrid.recipe.train_config import ScheduleConfig


def _decay(progress: float, shape: str) -> float:
    """1 -> 0 as progress goes 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if shape == "sqrt":
        return 1 - math.sqrt(progress)
    return 1 - progress


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int, min_ratio: float) -> float:
    warmup = cfg.warmup(total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * _decay(progress, "cosine")
    decay_steps = max(1, int(round(cfg.decay_fraction * total_steps)))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / decay_steps
    return min_ratio + (1 - min_ratio) * _decay(progress, cfg.decay_shape)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    total_steps: int,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    fn = functools.partial(lr_factor, cfg=cfg, total_steps=total_steps, min_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
