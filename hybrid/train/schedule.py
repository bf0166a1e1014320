"""Learning-rate schedules as pure functions of the step, wrapped in a `LambdaLR`.

`step` is the number of optimizer steps already taken, so `lr_at(s)` is the rate used by the
(s+1)-th optimizer step; this is what `LambdaLR` gives when `scheduler.step()` follows each
`optimizer.step()`. With W warmup steps, T total steps, m = min_lr_ratio and peak lr:

- warmup (all kinds): lr * (s + 1) / W for s < W, so step W-1 runs at the peak;
- cosine: lr * (m + (1 - m) * (1 + cos(pi * p)) / 2) with p = (s - W) / (T - W);
- wsd: the peak until D = max(W, T - round(decay_fraction * T)), then
  lr * (m + (1 - m) * shape(p)) with p = (s - D) / (T - D), shape(p) = 1 - p (linear),
  (1 + cos(pi * p)) / 2 (cosine) or 1 - sqrt(p) (sqrt);
- constant: the peak after warmup.

p is clamped to [0, 1]: the rate reaches lr * m at s = T and stays there.

Resuming: the scheduler's state_dict holds `last_epoch` and `base_lrs` (the lambdas are
closures, stored as None, so the dict is plain data that `torch.load(weights_only=True)` reads);
after `load_state_dict` the next rates are exactly those of the uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hybrid.recipe.train_config import ScheduleConfig

DEFAULT_MIN_LR_RATIO = 0.1


def decay_shape(progress: float, shape: str) -> float:
    """1 -> 0 as `progress` goes 0 -> 1 (clamped), for shape linear / cosine / sqrt."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"unknown decay shape {shape!r}")


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int, min_ratio: float) -> float:
    """The learning rate after `step` optimizer steps, as a fraction of the peak."""
    warmup = cfg.warmup(total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    start = cfg.decay_start(total_steps)
    if step < start:
        return 1.0
    progress = (step - start) / max(1, total_steps - start)
    shape = "cosine" if cfg.kind == "cosine" else cfg.decay_shape
    return min_ratio + (1.0 - min_ratio) * decay_shape(progress, shape)


def lr_at(
    step: int,
    cfg: ScheduleConfig,
    total_steps: int,
    base_lr: float,
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
) -> float:
    """The learning rate after `step` optimizer steps for peak `base_lr` (see module doc)."""
    return base_lr * lr_factor(step, cfg, total_steps, min_lr_ratio)


def _factor_fn(cfg: ScheduleConfig, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return lr_factor(step, cfg, total_steps, min_ratio)

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    total_steps: int,
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` over every parameter group of `optimizer` following `cfg` for a run of
    `total_steps` optimizer steps, ending at min_lr_ratio x each group's initial lr (pass
    `OptimizerConfig.min_lr_ratio`). Call `scheduler.step()` after each `optimizer.step()`."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _factor_fn(cfg, total_steps, min_lr_ratio))
