"""The interface the trainer talks to; one implementation per engine (local, deepspeed, megatron).

A backend owns the process group and the device, parallelizes the single-device model from the
outside (`parallelize`), takes the optimizer into its engine (`attach_optimizer`), runs
backward and optimizer steps, and reads and writes the *canonical* training state: the model
state with single-device names and full tensors, and the optimizer state in the layout
`torch.optim.AdamW.state_dict()` has for the single-device model. Whatever a backend shards,
a checkpoint of it can be resumed by any other backend or world size from that canonical form;
engine-owned files (`save_shards`) may restore faster when the layout is unchanged.

The order of one training step, as `hybrid.train.step` drives it::

    for i, batch in enumerate(micro_batches):
        with backend.no_sync(module, last_micro_step=...), backend.autocast(precision):
            loss = ...forward...
            backend.backward(module, loss)
    grad_norm = backend.optimizer_step(module, optimizer, grad_clip)
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hybrid.model.lm import IGNORE_INDEX
from hybrid.recipe.schema import ConfigError


class Backend(ABC):
    name: str = "base"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different data (the world size unless model-parallel)."""
        return self.world_size

    @property
    def data_parallel_rank(self) -> int:
        return self.rank

    # -- building ------------------------------------------------------------------------------
    @abstractmethod
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Wrap the single-device model for training (checkpointing, compile, data parallel);
        the returned module is what forward/backward run on."""

    def attach_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Hand the optimizer (built over the parallelized model) to the engine, before the LR
        scheduler is built over its parameter groups; returns the module to run. Default:
        nothing to do."""
        return module

    # -- one step ------------------------------------------------------------------------------
    def forward_backward(
        self,
        module: nn.Module,
        batches: list[dict[str, Tensor]],
        *,
        precision: str,
        total_tokens: float,
    ) -> tuple[Tensor, Tensor, dict]:
        """Forward and backward over this rank's micro-batches (already on the device). Each
        micro-batch loss is scaled so the summed gradient is the mean over the `total_tokens`
        label tokens of the global batch; MoE aux losses are averaged over micro-batches.
        Returns (sum of token losses, mean aux loss, per-MoE-layer stats averaged over
        micro-batches) for this rank. A pipeline backend replaces the loop by its schedule."""
        n_micro = len(batches)
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        moe: dict = {}
        for i, batch in enumerate(batches):
            last = i == n_micro - 1
            with self.no_sync(module, last_micro_step=last), self.autocast(precision):
                out = module(
                    batch["input_ids"],
                    labels=batch["labels"],
                    seq_idx=batch.get("seq_idx"),
                    return_logits=False,
                )
                n_valid = float((batch["labels"] != IGNORE_INDEX).sum())
                # DDP averages gradients over ranks: scale up by the world size
                loss = out.loss * (n_valid * self.data_parallel_size / total_tokens)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss / n_micro
                    aux_sum += out.aux_loss.detach() / n_micro
                    merge_moe_stats(moe, out.moe, n_micro)
                self.backward(module, loss)
            loss_sum += out.loss.detach() * n_valid
        return loss_sum, aux_sum, moe

    def no_sync(
        self, module: nn.Module, last_micro_step: bool
    ) -> contextlib.AbstractContextManager:
        """Context for a micro-step: skip gradient synchronisation unless it is the last."""
        return contextlib.nullcontext()

    def backward(self, module: nn.Module, loss: Tensor) -> None:
        """Accumulate the gradients of `loss` (already scaled for the global token mean)."""
        loss.backward()

    def optimizer_step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None
    ) -> float:
        """Clip to `grad_clip` (None or 0: measure only), step, zero the gradients; returns the
        global gradient L2 norm before clipping."""
        params = [p for p in module.parameters() if p.grad is not None]
        max_norm = grad_clip if grad_clip else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # -- canonical state (checkpoints) ---------------------------------------------------------
    @abstractmethod
    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Canonical state dict (single-device names, full tensors) on CPU. Every rank calls it
        (it may be collective); rank 0's result is complete."""

    @abstractmethod
    def load_model_state(self, model: nn.Module, state: dict[str, Tensor]) -> None: ...

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Canonical optimizer state (the single-device AdamW `state_dict()` layout). Every rank
        calls it; rank 0's result is complete."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError) as err:
            raise ConfigError(
                f"the checkpoint's optimizer state does not fit this run: {err}"
            ) from None

    def topology(self) -> dict[str, Any]:
        """How this run is laid out; stored in checkpoints to decide how to restore them."""
        return {"backend": self.name, "world_size": self.world_size}

    def save_shards(self, module: nn.Module, directory: Path) -> None:
        """Write engine-owned checkpoint files into `directory` (the save's temporary directory,
        the same on every rank). Every rank calls it. Default: none."""
        return None

    def load_shards(self, module: nn.Module, step_dir: Path, saved: dict[str, Any] | None) -> bool:
        """Restore the model and optimizer from the engine-owned files of `step_dir` when they
        fit this run (`saved` is the `topology()` recorded at save time); False otherwise."""
        return False

    def restore_state(
        self,
        model: nn.Module,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        step_dir: Path,
        model_state: dict[str, Tensor],
        optimizer_state: dict,
        saved_topology: dict[str, Any] | None,
    ) -> str:
        """Restore weights and optimizer state of a checkpoint; returns how it was done."""
        if self.load_shards(module, step_dir, saved_topology):
            return f"{self.name} shards"
        self.load_model_state(model, model_state)
        self.load_optimizer_state(optimizer, optimizer_state)
        return "canonical state"

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, value: Tensor) -> Tensor:
        """Sum of a per-replica value over the data-parallel ranks (the whole world unless the
        backend is model-parallel; model-parallel ranks of one replica hold the same value)."""
        return value

    def barrier(self) -> None:
        return None

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable objects)."""
        return obj

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


def merge_moe_stats(acc: dict, moe: dict, n_micro: int) -> None:
    """Accumulate one micro-batch's MoE stats (load, router entropy, dropped) into `acc`."""
    for idx, stats in moe.items():
        slot = acc.setdefault(idx, {"load": 0.0, "entropy": 0.0, "dropped": 0.0})
        slot["load"] = slot["load"] + stats.expert_load.float() / n_micro
        slot["entropy"] = slot["entropy"] + float(stats.router_entropy) / n_micro
        slot["dropped"] = slot["dropped"] + float(stats.dropped_fraction) / n_micro
