"""`Recipe`: the whole of what a user writes (model, data, training, parallelism)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hybrid.recipe.cluster_config import ClusterConfig
from hybrid.recipe.data_config import DataConfig
from hybrid.recipe.loader import apply_overrides, load_recipe_dict, source_of
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError, check, from_dict, to_dict
from hybrid.recipe.train_config import TrainConfig

# DeepSpeed config keys that other recipe settings own: {key path: the setting to use instead}.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch and train.micro_batch_size",
    "gradient_clipping": "train.optimizer.grad_clip",
    "managed_gradient_accumulation": "train.global_batch (the trainer owns accumulation)",
    "optimizer": "train.optimizer",
    "scheduler": "train.schedule",
    "bf16": "train.precision",
    "fp16": "train.precision (fp16 is not supported; use bf16)",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer": "parallel.offload_optimizer",
    "zero_optimization.offload_param": "parallel.offload_params",
}


@dataclass(kw_only=True)
class ParallelConfig:
    """How training is spread over devices.

    backend: `local` (one process, or DDP under torchrun) or `deepspeed` (ZeRO, launched by
    `torchrun` or the `deepspeed` launcher). ep: expert-parallel size; each MoE layer's experts
    are split over groups of `ep` ranks with all-to-all token dispatch (deepspeed backend, ZeRO
    stage 1 or 2; divides the world size and the number of experts). zero_stage: 0 (replicated,
    as DDP), 1 (optimizer states sharded), 2 (and gradients), 3 (and parameters).
    offload_optimizer: optimizer states and update on the CPU (stage >= 1); offload_params:
    parameters on the CPU (stage 3). deepspeed: DeepSpeed config keys merged last over the
    generated config (which is written to RUN_DIR/deepspeed_config.json), e.g.
    `{zero_optimization: {reduce_bucket_size: 2.0e+8}}`; keys that a recipe setting owns
    (DEEPSPEED_OWNED_KEYS) are refused.
    """

    backend: Literal["local", "deepspeed"] = "local"
    ep: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.ep >= 1, "ep", "must be >= 1")
        if self.backend != "deepspeed":
            for key, unset in (("ep", 1), ("zero_stage", 0), ("offload_optimizer", False)):
                check(getattr(self, key) == unset, key, "needs parallel.backend: deepspeed")
            check(not self.offload_params, "offload_params", "needs parallel.backend: deepspeed")
            check(not self.deepspeed, "deepspeed", "needs parallel.backend: deepspeed")
            return
        check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "offload_optimizer",
            "needs zero_stage 1, 2 or 3 (stage 0 keeps no optimizer partition to offload)",
        )
        check(
            not self.offload_params or self.zero_stage == 3, "offload_params", "needs zero_stage 3"
        )
        check(
            self.ep == 1 or self.zero_stage in (1, 2),
            "ep",
            "expert parallelism needs zero_stage 1 or 2 (DeepSpeed has no MoE under ZeRO-3, and "
            "its stage-0 gradient clipping is not exact for sharded experts)",
        )
        for path, owner in DEEPSPEED_OWNED_KEYS.items():
            head, _, leaf = path.partition(".")
            block = self.deepspeed.get(head) if leaf else self.deepspeed
            if isinstance(block, dict) and (leaf or head) in block:
                raise ConfigError(f"set {owner} instead", key=f"deepspeed.{path}")


@dataclass(kw_only=True)
class Recipe:
    name: str = "unnamed"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

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
