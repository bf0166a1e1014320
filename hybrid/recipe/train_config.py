"""`train:` section of a recipe: batch, steps, precision, optimizer and LR schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hybrid.recipe.schema import ConfigError, check


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW. Weight decay applies to matrices only (not norms, biases, embeddings, Mamba's
    A_log / D / dt_bias). `grad_clip: 0` turns clipping off. `fused: null` = fused on CUDA."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    fused: bool | None = None

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be positive")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(all(0 <= b < 1 for b in self.betas), "betas", "each must be in [0, 1)")
        check(self.eps > 0, "eps", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then `cosine` decay to lr*min_lr_ratio, `wsd`
    (warmup-stable-decay: constant, then decay over the last `decay_fraction` of steps with
    `decay_shape`), or `constant`. Warmup is `warmup_steps`, else `warmup_fraction` of steps."""

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
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_fraction * total_steps)


@dataclass(kw_only=True)
class TrainConfig:
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
        if self.global_batch_tokens is not None:
            check(
                self.global_batch_tokens % self.seq_len == 0,
                "global_batch_tokens",
                f"must be a multiple of seq_len={self.seq_len}",
            )

    def global_batch_sequences(self, world_size: int = 1) -> int:
        if self.global_batch is not None:
            return self.global_batch
        if self.global_batch_tokens is not None:
            return self.global_batch_tokens // self.seq_len
        return self.micro_batch_size * world_size

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank."""
        total = self.global_batch_sequences(world_size)
        per_step = self.micro_batch_size * world_size
        if total % per_step:
            raise ConfigError(
                f"global batch of {total} sequences is not divisible by micro_batch_size "
                f"({self.micro_batch_size}) x {world_size} ranks",
                key="train.global_batch",
            )
        return total // per_step

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.global_batch_sequences(world_size) * self.seq_len
