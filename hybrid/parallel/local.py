"""The local backend: one process (CPU or one GPU), or data parallel (DDP) over the processes
that `torchrun` started (it reads RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hybrid.parallel.activation_checkpoint import apply_activation_checkpointing
from hybrid.parallel.base import Backend
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available; use cpu or auto")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# Distinct compiled variants of the one `Sublayer.forward` code object: one per mixer kind, more
# where a kind graph-breaks (MoE); Dynamo's default limit of 8 left the rest of the layers eager.
RECOMPILE_LIMIT = 64


def compile_sublayers(model: nn.Module) -> None:
    """`torch.compile` each sublayer (the kernels stay custom ops inside the graphs)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    for layer in model.layers:
        layer.compile()
    log.info("compiled %d sublayers with torch.compile", len(model.layers))


class LocalBackend(Backend):
    name = "local"

    def __init__(
        self, *, device: str = "auto", activation_checkpointing: str = "none", compile: bool = False
    ):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile
        self._owns_group = False
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._owns_group = True

    def parallelize(self, model: nn.Module) -> nn.Module:
        apply_activation_checkpointing(model, self.activation_checkpointing)
        if self.compile:
            compile_sublayers(model)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def load_model_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"checkpoint does not fit this model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} (was the recipe's model section changed?)"
            )

    def no_sync(
        self, module: nn.Module, last_micro_step: bool
    ) -> contextlib.AbstractContextManager:
        if isinstance(module, DistributedDataParallel) and not last_micro_step:
            return module.no_sync()
        return contextlib.nullcontext()

    def all_reduce_sum(self, value: Tensor) -> Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
