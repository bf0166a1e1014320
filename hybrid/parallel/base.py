"""The interface the trainer talks to; one implementation per engine (local, deepspeed, megatron).

A backend owns the process group and the device, parallelizes the single-device model from the
outside (`parallelize`), runs backward / optimizer steps, and reads and writes the canonical
(unsharded, single-device names) model state for checkpoints.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class Backend(ABC):
    name: str = "base"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Wrap the single-device model for training (checkpointing, compile, data parallel);
        the returned module is what forward/backward run on."""

    @abstractmethod
    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Canonical state dict (single-device names, full tensors) on CPU."""

    @abstractmethod
    def load_model_state(self, model: nn.Module, state: dict[str, Tensor]) -> None: ...

    def no_sync(
        self, module: nn.Module, last_micro_step: bool
    ) -> contextlib.AbstractContextManager:
        """Context for a micro-step: skip gradient synchronisation unless it is the last."""
        return contextlib.nullcontext()

    def all_reduce_sum(self, value: Tensor) -> Tensor:
        return value

    def barrier(self) -> None:
        return None

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def close(self) -> None:
        return None

    def describe(self) -> str:
        return f"{self.name} backend, rank {self.rank}/{self.world_size}, device {self.device}"


def iter_sublayers(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError("expected a HybridLM with a .layers ModuleList")
    yield from enumerate(layers)
