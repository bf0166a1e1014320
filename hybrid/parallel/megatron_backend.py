"""The megatron backend: megatron-core's process groups, tensor / sequence / expert parallelism
(and pipeline stages through `megatron_pipeline`) around our single-device model.

Layout: `parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep,
expert_tensor_parallel_size=tp)`. Each of the world / (tp * pp) data-parallel replicas reads its
own batches; inside a replica the TP ranks see the same tokens. In MoE layers every TP rank
routes the same tokens (the router is replicated) and holds its slice of every expert's hidden
size (expert tensor parallelism, `tensor_parallel.shard_moe`); the experts themselves are split
over `ep` ranks of the data-parallel group (megatron's expert-parallel group when the expert
tensor-parallel size is tp), which hold different tokens, through our all-to-all dispatch
(`expert_dispatch`). An expert weight then carries both marks: experts over EP, hidden over TP.

The model is built full, identically, on every rank (same seed) and sharded in place
(`tensor_parallel.apply_tensor_parallel`), so a TP run starts from the TP=1 weights; every
sharded parameter carries its `shard_spec.Shard` and keeps its single-device name.

One step (CPU, or CUDA without the distributed optimizer): the micro-batch loop (or the pipeline
schedule), then in `optimizer_step` the gradients are made whole: partial gradients of
TP-replicated parameters summed over TP, dense gradients averaged over the data-parallel group
and expert gradients over the expert-data-parallel group (divided by the DP size as well: an
expert's gradient already holds the tokens of its whole EP group), clipped with a norm that
counts every parameter once, and the trainer's optimizer steps. `megatron_optim` wraps
megatron-core's DDP and distributed optimizer for `distributed_optimizer: true` (CUDA).

Checkpoints: the canonical state is gathered with the shard marks (`megatron_state`);
`save_shards` / `load_shards` use `megatron_checkpoint` (dist_checkpointing) when it exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import Tensor, nn

from hybrid.model.lm import IGNORE_INDEX, LMOutput
from hybrid.parallel import megatron_state, tensor_parallel
from hybrid.parallel.activation_checkpoint import apply_activation_checkpointing
from hybrid.parallel.base import Backend
from hybrid.parallel.expert_dispatch import apply_expert_dispatch
from hybrid.parallel.local import compile_sublayers, resolve_device
from hybrid.recipe.recipe import Recipe
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)


def _optional(module: str) -> Any | None:
    """`hybrid.parallel.<module>` if it exists (pipeline and dist_checkpointing parts)."""
    name = f"hybrid.parallel.{module}"
    return importlib.import_module(name) if importlib.util.find_spec(name) else None


def _has_cuda_device() -> bool:
    """Whether `torch.cuda.current_device()`, which megatron-core allocates on, answers."""
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):
        return False
    return True


class MegatronBackend(Backend):
    name = "megatron"

    def __init__(
        self,
        *,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        sequence_parallel: bool = False,
        virtual_pp: int | None = None,
        distributed_optimizer: bool = False,
        device: str = "auto",
        activation_checkpointing: str = "none",
        compile: bool = False,
        seq_len: int = 0,
    ):
        """Reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun), joins or starts the process group
        (gloo on CPU, NCCL on CUDA) and lays out megatron-core's groups. `seq_len`: training
        length, for the pipeline's per-layer costs."""
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.tp, self.pp, self.ep = tp, pp, ep
        self.sequence_parallel, self.virtual_pp = sequence_parallel, virtual_pp
        self.distributed_optimizer = distributed_optimizer
        self.activation_checkpointing, self.compile = activation_checkpointing, compile
        self.seq_len = seq_len
        self.device = resolve_device(device, self.local_rank)
        self._check_layout()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if "RANK" in os.environ:
                dist.init_process_group(backend)
            else:  # one process without torchrun: megatron-core still needs its groups
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=virtual_pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=tp,
        )
        self.engine: Any = None  # megatron_optim.Engine with distributed_optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        self.model: nn.Module | None = None  # the single-device model, sharded in place
        self._said_no_shards = False

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> MegatronBackend:
        p, t = recipe.parallel, recipe.train
        if p.sequence_parallel and t.seq_len % p.tp:
            raise ConfigError(
                f"train.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp} "
                "(sequence parallel splits the sequence)",
                key="train.seq_len",
            )
        return cls(
            tp=p.tp,
            pp=p.pp,
            ep=p.ep,
            sequence_parallel=p.sequence_parallel,
            virtual_pp=p.virtual_pp,
            distributed_optimizer=p.distributed_optimizer,
            device=t.device,
            activation_checkpointing=t.activation_checkpointing,
            compile=t.compile,
            seq_len=t.seq_len,
        )

    def _check_layout(self) -> None:
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(
                f"the world size {self.world_size} is not a multiple of parallel.tp * "
                f"parallel.pp = {self.tp * self.pp}",
                key="parallel.tp",
            )
        dp = self.world_size // (self.tp * self.pp)
        if dp % self.ep:
            raise ConfigError(
                f"parallel.ep={self.ep} does not divide the {dp} data-parallel ranks (experts "
                f"are split over data-parallel ranks: world / (tp * pp))",
                key="parallel.ep",
            )
        if self.sequence_parallel and not _has_cuda_device():
            raise ConfigError(
                "sequence parallelism needs CUDA (megatron-core allocates its sequence gathers "
                "on torch.cuda.current_device()); set it false on CPU",
                key="parallel.sequence_parallel",
            )
        if self.distributed_optimizer and self.device.type != "cuda":
            raise ConfigError(
                "megatron-core's distributed optimizer needs CUDA; set it false on CPU",
                key="parallel.distributed_optimizer",
            )
        if self.distributed_optimizer and self.pp > 1:
            raise ConfigError(
                "the distributed optimizer is not wired to pipeline stages yet; use pp 1",
                key="parallel.distributed_optimizer",
            )

    # -- layout ---------------------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        return ps.get_data_parallel_world_size()

    @property
    def data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def topology(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "world_size": self.world_size,
            "tp": self.tp,
            "pp": self.pp,
            "ep": self.ep,
            "sequence_parallel": self.sequence_parallel,
        }

    def describe(self) -> str:
        return (
            f"megatron backend, rank {self.rank}/{self.world_size} (tp {self.tp}, pp {self.pp}, "
            f"ep {self.ep}, dp {self.data_parallel_size}"
            f"{', sequence parallel' if self.sequence_parallel else ''}), device {self.device}"
        )

    # -- building -------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        self.model = model
        if self.ep > 1:
            apply_expert_dispatch(model, ps.get_expert_model_parallel_group(), self.ep)
        if self.tp > 1:
            tensor_parallel.apply_tensor_parallel(
                model,
                ps.get_tensor_model_parallel_group(),
                sequence_parallel=self.sequence_parallel,
            )
        apply_activation_checkpointing(model, self.activation_checkpointing)
        if self.compile:
            compile_sublayers(model)
        module = self._build_stages(model) if self.pp > 1 else model
        log.info("%s", self.describe())
        return module

    def _build_stages(self, model: nn.Module) -> nn.Module:
        """This rank's pipeline stage (model chunks when interleaved): contiguous layers split
        by their training FLOPs per token (the head's on the last stage); the parts of the
        model other ranks run are released to the meta device."""
        from hybrid.parallel.pipeline_split import stage_ranges

        pipeline = self._pipeline()
        ranges = stage_ranges(model.cfg, self.pp * (self.virtual_pp or 1), self.seq_len or 1)
        config = pipeline.stage_config(
            model.cfg.d_model,
            next(model.parameters()).dtype,
            virtual_pp=self.virtual_pp,
            sequence_parallel=self.sequence_parallel,
        )
        chunks = pipeline.rank_chunks(ranges, self.pp, ps.get_pipeline_model_parallel_rank())
        stages = [
            pipeline.build_stage(
                model, r, first, last, config=config, vp_stage=v if self.virtual_pp else None
            )
            for v, (r, first, last) in enumerate(chunks)
        ]
        pipeline.release_other_stages(model, stages)
        return PipelineStages(stages, self)

    def _pipeline(self) -> Any:
        pipeline = _optional("megatron_pipeline")
        if pipeline is None:
            raise ConfigError(
                "parallel.pp > 1 needs hybrid.parallel.megatron_pipeline, which is missing",
                key="parallel.pp",
            )
        return pipeline

    def attach_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.optimizer = optimizer
        if not self.distributed_optimizer:
            return module
        from hybrid.parallel import megatron_optim

        self.engine = megatron_optim.Engine(module, optimizer, module.cfg)
        return self.engine.module

    # -- one step -------------------------------------------------------------------------------
    def forward_backward(
        self,
        module: nn.Module,
        batches: list[dict[str, Tensor]],
        *,
        precision: str,
        total_tokens: float,
    ) -> tuple[Tensor, Tensor, dict]:
        if self.pp > 1:
            return self._pipeline().forward_backward(
                list(module),
                batches,
                total_tokens=total_tokens,
                data_parallel_size=self.data_parallel_size,
                autocast=lambda: self.autocast(precision),
            )
        return super().forward_backward(
            module, batches, precision=precision, total_tokens=total_tokens
        )

    def optimizer_step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None
    ) -> float:
        if self.engine is not None:
            return self.engine.step(grad_clip)
        params = [p for p in module.parameters() if p.requires_grad]
        megatron_state.finish_grads(params, self.data_parallel_size)
        norm = megatron_state.clip_grads(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # -- canonical state ------------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        return megatron_state.canonical_model_state(model)

    def load_model_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        megatron_state.load_canonical_model_state(model, state, partial=self.pp > 1)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.engine is not None:
            return self.engine.optimizer_state()
        return megatron_state.canonical_optimizer_state(self._model(), optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.engine is not None:
            self.engine.load_optimizer_state(state)
            return
        megatron_state.load_canonical_optimizer_state(self._model(), optimizer, state)

    def _model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("the megatron backend's optimizer state needs parallelize() first")
        return self.model

    def _checkpointer(self) -> Any | None:
        """`megatron_checkpoint` when sharded checkpoints can be written here: it exists, and the
        device is CUDA (dist_checkpointing's torch_dist save calls `torch.cuda.synchronize`)."""
        if self.device.type != "cuda" or self.engine is not None:
            return None  # the distributed optimizer's state: canonical checkpoints only
        return _optional("megatron_checkpoint")

    def save_shards(self, module: nn.Module, directory: Path) -> None:
        ckpt = self._checkpointer()
        if ckpt is not None:
            ckpt.save_sharded(module, self._optimizer_for_shards(), directory / "megatron")
        elif not self._said_no_shards and self.is_main:
            log.info("no megatron sharded checkpoint on %s: only the canonical one", self.device)
            self._said_no_shards = True

    def load_shards(self, module: nn.Module, step_dir: Path, saved: dict[str, Any] | None) -> bool:
        ckpt = self._checkpointer()
        if ckpt is None or not (step_dir / "megatron").is_dir():
            return False
        ckpt.load_sharded(module, self._optimizer_for_shards(), step_dir / "megatron")
        return True

    def _optimizer_for_shards(self) -> Any:
        return self.engine.optimizer if self.engine is not None else self.optimizer

    # -- collectives ----------------------------------------------------------------------------
    def all_reduce_sum(self, value: Tensor) -> Tensor:
        if self.data_parallel_size > 1:
            value = value.clone()
            dist.all_reduce(value, group=ps.get_data_parallel_group())
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
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


class PipelineStages(nn.ModuleList):
    """This rank's pipeline model chunks, as the trainer's module. Calling it (evaluation) runs
    megatron's schedule forward-only over one micro-batch; the loss is the same on every
    stage."""

    def __init__(self, stages: list[nn.Module], backend: MegatronBackend) -> None:
        super().__init__(stages)
        self._backend = (backend,)  # not a submodule

    def forward(
        self,
        input_ids: Tensor,
        *,
        labels: Tensor | None = None,
        seq_idx: Tensor | None = None,
        return_logits: bool = False,
    ) -> LMOutput:
        if labels is None or return_logits:
            raise NotImplementedError("under pipeline parallelism only the loss is computed")
        batch = {"input_ids": input_ids, "labels": labels}
        if seq_idx is not None:
            batch["seq_idx"] = seq_idx
        n = float((labels != IGNORE_INDEX).sum().clamp(min=1))
        loss_sum, _, _ = (
            self._backend[0]
            ._pipeline()
            .forward_backward(
                list(self), [batch], total_tokens=n, data_parallel_size=1, forward_only=True
            )
        )
        return LMOutput(loss=loss_sum / n)
