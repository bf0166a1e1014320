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

# Settings only the megatron backend reads: {key: its value when unset}.
MEGATRON_ONLY = {
    "tp": 1,
    "pp": 1,
    "sequence_parallel": False,
    "virtual_pp": None,
    "distributed_optimizer": False,
}


@dataclass(kw_only=True)
class ParallelConfig:
    """How training is spread over devices.

    backend: `local` (one process, or DDP under torchrun), `deepspeed` (ZeRO, launched by
    `torchrun` or the `deepspeed` launcher) or `megatron` (megatron-core's tensor, sequence,
    pipeline and expert parallelism, launched by `torchrun`). ep: expert-parallel size; each MoE
    layer's experts are split over groups of `ep` ranks with all-to-all token dispatch
    (deepspeed with ZeRO stage 1 or 2, or megatron; divides the number of experts).
    deepspeed only: zero_stage: 0 (replicated, as DDP), 1 (optimizer states sharded), 2 (and
    gradients), 3 (and parameters). offload_optimizer: optimizer states and update on the CPU
    (stage >= 1); offload_params: parameters on the CPU (stage 3). deepspeed: DeepSpeed config
    keys merged last over the generated config (which is written to
    RUN_DIR/deepspeed_config.json), e.g. `{zero_optimization: {reduce_bucket_size: 2.0e+8}}`;
    keys that a recipe setting owns (DEEPSPEED_OWNED_KEYS) are refused.
    megatron only: tp: tensor-parallel size (divides attention heads, kv heads, Mamba heads and
    groups, the MLP width and the padded vocabulary); pp: pipeline stages (layers split by
    cost); the world size must be a multiple of tp * pp (the rest is data parallel; experts are
    split over ep of the data-parallel ranks). sequence_parallel: split the residual stream along
    the sequence over the TP group (needs tp > 1). virtual_pp: model chunks per pipeline stage
    (the interleaved schedule; needs pp > 1). distributed_optimizer: megatron-core's DDP and
    distributed optimizer (CUDA only).
    """

    backend: Literal["local", "deepspeed", "megatron"] = "local"
    ep: int = 1
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    virtual_pp: int | None = None
    distributed_optimizer: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("ep", "tp", "pp"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        if self.backend != "megatron":
            for key, unset in MEGATRON_ONLY.items():
                check(getattr(self, key) == unset, key, "needs parallel.backend: megatron")
        if self.backend == "megatron":
            self._check_megatron()
        elif self.backend == "deepspeed":
            self._check_deepspeed()
        else:
            check(self.ep == 1, "ep", "needs parallel.backend: deepspeed or megatron")
        if self.backend != "deepspeed":
            for key, unset in (("zero_stage", 0), ("offload_optimizer", False)):
                check(getattr(self, key) == unset, key, "needs parallel.backend: deepspeed")
            check(not self.offload_params, "offload_params", "needs parallel.backend: deepspeed")
            check(not self.deepspeed, "deepspeed", "needs parallel.backend: deepspeed")

    def _check_megatron(self) -> None:
        check(
            not self.sequence_parallel or self.tp > 1, "sequence_parallel", "needs parallel.tp > 1"
        )
        if self.virtual_pp is not None:
            check(self.pp > 1, "virtual_pp", "needs parallel.pp > 1 (the interleaved schedule)")
            check(self.virtual_pp >= 2, "virtual_pp", "must be >= 2 (or null)")

    def _check_deepspeed(self) -> None:
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
