"""`train:` section of a recipe: batch, steps, precision, cadence, optimizer and LR schedule.

`TrainConfig()` is valid for a small CPU debug run. Batch sizes count sequences of `seq_len`
tokens. The global batch is `global_batch` (sequences) or `global_batch_tokens` (at most one of
the two); with neither it is one micro-batch per data-parallel rank (no accumulation).
`grad_accum_steps(world_size)` turns it into micro-batches per rank per optimizer step and
explains a divisibility problem as a `ConfigError`.

Schedules are clamped to the run rather than rejected: a warmup longer than `steps` (say a debug
`--set train.steps=10` on a recipe with `warmup_steps: 20`) ends at the last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hybrid.recipe.schema import ConfigError, check


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW (see `hybrid.train.optim` for which parameters are decayed).

    min_lr_ratio: where the schedule ends, as a fraction of `lr`. grad_clip: maximum global
    gradient L2 norm (0 or null: no clipping; the norm is still measured). fused: torch's fused
    AdamW kernel (null: on CUDA yes, elsewhere the multi-tensor `foreach` implementation).
    """

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    fused: bool | None = None

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be positive")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(all(0 <= b < 1 for b in self.betas), "betas", "each must be in [0, 1)")
        check(self.eps > 0, "eps", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        clip = self.grad_clip
        check(clip is None or clip >= 0, "grad_clip", "must be >= 0 (0 or null = off)")

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    @property
    def clip_enabled(self) -> bool:
        return self.grad_clip is not None and self.grad_clip > 0


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule; formulas in `hybrid.train.schedule`.

    kind: `cosine` (linear warmup, cosine decay to lr * min_lr_ratio at the last step), `wsd`
    (warmup-stable-decay: warmup, the peak, then decay over the last `decay_fraction` of the
    steps with `decay_shape`), `constant` (warmup, then the peak).
    warmup: `warmup_steps` when set, else `warmup_fraction` of the steps (default 2%).
    decay_shape (wsd): `linear`, `cosine`, or `sqrt` = 1 - sqrt(progress) (Hägele et al. 2024,
    "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", found it best).
    """

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int | None = None
    warmup_fraction: float = 0.02
    decay_fraction: float = 0.2
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"

    def __post_init__(self) -> None:
        if self.warmup_steps is not None:
            check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
        check(0 < self.decay_fraction <= 1, "decay_fraction", "must be in (0, 1]")

    def warmup(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of `total_steps` (at most the run)."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_fraction * total_steps)

    def decay_start(self, total_steps: int) -> int:
        """First step of the final decay: after warmup for cosine; for wsd the last
        `decay_fraction` of the run (never before warmup ends); `total_steps` for constant."""
        warmup = self.warmup(total_steps)
        if self.kind == "cosine":
            return warmup
        if self.kind == "wsd":
            decay_steps = max(1, round(self.decay_fraction * total_steps))
            return max(warmup, total_steps - decay_steps)
        return total_steps


@dataclass(kw_only=True)
class TrainConfig:
    """Everything about a training run except the model, the data and the parallel layout.

    precision: `auto` = bf16 autocast with fp32 master weights on CUDA, fp32 on CPU.
    activation_checkpointing: `none`, `selective` (recompute the cheap, memory-heavy parts of
    each sublayer), or `full` (recompute whole sublayers). run_dir: `{name}` becomes the recipe
    name. log_every / eval_every / save_every count optimizer steps (eval and save: 0 = off);
    keep_checkpoints: how many of the latest checkpoints to keep.
    """

    seq_len: int = 512
    micro_batch_size: int = 8
    global_batch: int | None = None
    global_batch_tokens: int | None = None
    steps: int = 1000
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_dir: str = "runs/{name}"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 3
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size", "steps", "log_every", "keep_checkpoints"):
            check(getattr(self, name) > 0, name, "must be positive")
        for name in ("eval_every", "eval_batches", "save_every"):
            check(getattr(self, name) >= 0, name, "must be >= 0 (0 = off)")
        check(
            self.global_batch is None or self.global_batch_tokens is None,
            "global_batch",
            "set global_batch (sequences) or global_batch_tokens, not both",
        )
        check(
            self.global_batch is None or self.global_batch > 0, "global_batch", "must be positive"
        )
        if self.global_batch_tokens is not None:
            tokens = self.global_batch_tokens
            check(tokens > 0, "global_batch_tokens", "must be positive")
            n = max(1, round(tokens / self.seq_len))
            check(
                tokens % self.seq_len == 0,
                "global_batch_tokens",
                f"{tokens} is not a multiple of seq_len={self.seq_len}; the nearest whole "
                f"number of sequences is {n} x {self.seq_len} = {n * self.seq_len} tokens",
            )

    def global_batch_sequences(self, world_size: int = 1) -> int:
        """Sequences per optimizer step, all data-parallel ranks together."""
        if self.global_batch is not None:
            return self.global_batch
        if self.global_batch_tokens is not None:
            return self.global_batch_tokens // self.seq_len
        return self.micro_batch_size * world_size

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens per optimizer step (sequences x seq_len, padding included)."""
        return self.global_batch_sequences(world_size) * self.seq_len

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per rank per optimizer step for `world_size` data-parallel ranks.

        Raises `ConfigError` (key `train.global_batch` or `train.global_batch_tokens`) when the
        global batch is not a multiple of micro_batch_size x world_size.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        total = self.global_batch_sequences(world_size)
        per_pass = self.micro_batch_size * world_size
        if total % per_pass == 0:
            return total // per_pass
        if self.global_batch_tokens is None:
            key, given = "train.global_batch", f"global_batch={total} sequences"
        else:
            key = "train.global_batch_tokens"
            given = f"global_batch_tokens={self.global_batch_tokens} ({total} sequences)"
        below = total // per_pass * per_pass
        options = f"{below} or {below + per_pass}" if below else f"{per_pass}"
        raise ConfigError(
            f"{given} is not divisible by micro_batch_size={self.micro_batch_size} x "
            f"{world_size} data-parallel rank(s) = {per_pass} sequences; use a multiple of "
            f"{per_pass} sequences (e.g. {options}) or another micro_batch_size",
            key=key,
        )
