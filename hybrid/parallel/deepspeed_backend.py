"""The DeepSpeed backend: ZeRO stages 0-3, bf16 with fp32 master weights, CPU offload of the
optimizer and of parameters, and MoE expert parallelism. One process per GPU (NCCL), or CPU
processes (gloo), started by `torchrun` or `deepspeed --no_local_rank --module hybrid.cli`;
alone, it runs as a world of one.

The DeepSpeed config is generated from the recipe (batch sizes and accumulation from `train`,
`gradient_clipping` from `train.optimizer.grad_clip`, `zero_optimization` from `parallel`, `bf16`
from `train.precision`), then `parallel.deepspeed` is deep-merged over it, and the result is
written to RUN_DIR/deepspeed_config.json. The optimizer is the trainer's AdamW (two parameter
groups, see `hybrid.train.optim`) and the LR schedule stays the trainer's.

Precision `bf16`: under ZeRO 1-3, DeepSpeed's bf16 mode (bf16 parameters and gradients, fp32
master weights and Adam moments in the ZeRO optimizer); under ZeRO-0, fp32 parameters (they are
the masters) with bf16 autocast, as the local backend does.

Gradient accumulation: the trainer scales each micro-batch loss for the exact global token mean
and marks the last micro-batch as DeepSpeed's accumulation boundary; `engine.step()` runs once
per optimizer step and clips there. The gradient norm is DeepSpeed's (ZeRO) or measured after
the boundary all-reduce (ZeRO-0).

Checkpoints (see `hybrid.parallel.deepspeed_state`): each save writes the engine's own sharded
checkpoint (`engine.save_checkpoint`, every rank its files) into STEP/deepspeed/ inside the
trainer's temporary step directory, plus the canonical model and optimizer state, so the
atomic rename and `latest` protocol of `hybrid.checkpoint.store` cover it. A resume with the same
layout (world size, ZeRO stage, precision, offload; no expert parallelism) loads the engine's
files; any other resume, expert-parallel ones included, loads the canonical state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import Tensor, nn

from hybrid.model.lm import Sublayer
from hybrid.parallel.activation_checkpoint import apply_activation_checkpointing
from hybrid.parallel.base import Backend
from hybrid.parallel.deepspeed_state import PARENT_KEY, CanonicalLayout, StateIO
from hybrid.parallel.expert_parallel import apply_expert_parallel, group_name
from hybrid.parallel.local import resolve_device
from hybrid.recipe.recipe import ParallelConfig
from hybrid.recipe.schema import ConfigError
from hybrid.recipe.train_config import TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "deepspeed_config.json"
SHARDS_DIR = "deepspeed"
# DeepSpeed prints a progress line every `steps_per_print` steps; the trainer has its own.
_NEVER = 2**31 - 1


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged in: nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA and fp32 elsewhere (the trainer's rule)."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return requested


def build_config(
    parallel: ParallelConfig,
    train: TrainConfig,
    *,
    world_size: int,
    precision: str,
    pin_memory: bool,
) -> dict[str, Any]:
    """The DeepSpeed config of a run: generated from the recipe, `parallel.deepspeed` merged
    last. Raises ConfigError when the global batch does not split over `world_size` ranks."""
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    clip = train.optimizer.grad_clip if train.optimizer.clip_enabled else 0.0
    config = {
        "train_batch_size": train.global_batch_sequences(world_size),
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps(world_size),
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16" and parallel.zero_stage >= 1},
        "steps_per_print": _NEVER,
        "zero_allow_untested_optimizer": True,
        # the trainer's torch AdamW also runs the offloaded update (no compiled CPU Adam)
        "zero_force_ds_cpu_optimizer": False,
    }
    return deep_merge(config, parallel.deepspeed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, *, parallel: ParallelConfig, train: TrainConfig, run_dir: Path) -> None:
        self.parallel, self.train, self.run_dir = parallel, train, Path(run_dir)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(train.device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(train.precision, self.device)
        self._owns_group = self._init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.engine: Any = None
        self.layout: CanonicalLayout | None = None
        self.io: StateIO | None = None

    @classmethod
    def from_recipe(cls, recipe: Any, run_dir: Path) -> DeepSpeedBackend:
        return cls(parallel=recipe.parallel, train=recipe.train, run_dir=run_dir)

    def _init_distributed(self) -> bool:
        """Join (or, alone, create) the process group; True when this backend created it."""
        if self.device.type == "cpu":
            _skip_cpu_inference_comm_op()
        if dist.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
            return False
        if "RANK" not in os.environ:  # not started by a launcher: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        return True

    # -- building ------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Expert parallelism (replaces expert weights), then activation checkpointing and
        compile per sublayer; ZeRO-3 gathers each sublayer's parameters as one unit."""
        if self.parallel.ep > 1:
            apply_expert_parallel(model, self.parallel.ep)
        self.layout = CanonicalLayout.of(model)
        apply_activation_checkpointing(model, self.train.activation_checkpointing)
        if self.train.compile:
            for layer in model.layers:
                layer.compile()
            log.info("compiled %d sublayers with torch.compile", len(model.layers))
        if self.parallel.zero_stage == 3:
            # a mixer may read a child's weight directly (Mamba's conv1d), so ZeRO-3 fetches a
            # whole sublayer at its entry instead of module by module
            deepspeed.utils.set_z3_leaf_modules(model, [Sublayer])
        return model

    def attach_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Split expert parameters into DeepSpeed's MoE groups, write the config, and build the
        engine around `module` and the trainer's AdamW."""
        assert self.layout is not None, "parallelize() first"
        self.layout.record_groups(optimizer)
        for i, group in enumerate(optimizer.param_groups):
            group[PARENT_KEY] = i
        if self.parallel.ep > 1:
            _split_expert_groups(optimizer, group_name(self.parallel.ep))
        config = build_config(
            self.parallel,
            self.train,
            world_size=self.world_size,
            precision=self.precision,
            pin_memory=self.device.type == "cuda",
        )
        self._write_config(config)
        try:
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        except (ValueError, AssertionError, TypeError, KeyError) as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            what = "; ".join(lines[:3])[:400] or type(err).__name__
            raise ConfigError(
                f"DeepSpeed rejected the configuration ({what}); see {self.run_dir / CONFIG_FILE}",
                key="parallel.deepspeed",
            ) from err
        self.engine = engine
        self.io = StateIO(self.layout, engine, optimizer)
        return engine

    def _write_config(self, config: dict) -> None:
        if self.is_main:
            path = self.run_dir / CONFIG_FILE
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
            p = self.parallel
            log.info(
                "DeepSpeed: ZeRO-%d, %s%s%s%s, %d ranks; config written to %s",
                p.zero_stage,
                "DeepSpeed bf16 (fp32 masters)" if config["bf16"]["enabled"] else self.precision,
                " with autocast" if self.precision == "bf16" and p.zero_stage == 0 else "",
                ", optimizer offload" if p.offload_optimizer else "",
                ", parameter offload" if p.offload_params else "",
                self.world_size,
                path,
            )

    # -- one step ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, module: nn.Module, last_micro_step: bool):
        """DeepSpeed reduces gradients at the accumulation boundary: the last micro-batch."""
        module.set_gradient_accumulation_boundary(last_micro_step)
        yield

    def backward(self, module: nn.Module, loss: Tensor) -> None:
        module.backward(loss, scale_wrt_gas=False)  # the loss is scaled by the trainer

    def optimizer_step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None
    ) -> float:
        """engine.step(): clip (DeepSpeed's `gradient_clipping`), update, zero the gradients."""
        measured = None
        if self.parallel.zero_stage == 0:  # gradients are all-reduced: the norm is global
            params = [p for p in module.parameters() if p.grad is not None]
            measured = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
        module.step()
        norm = module.get_global_grad_norm()
        if norm is None:
            norm = measured
        if norm is None:  # e.g. zero_optimization.compute_grad_norm: false in parallel.deepspeed
            _warn_once("DeepSpeed reports no gradient norm; train/grad_norm is logged as nan")
            return float("nan")
        return float(norm)

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        if precision == "bf16" and self.parallel.zero_stage == 0:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()  # fp32, or DeepSpeed's bf16 parameters

    # -- canonical state -----------------------------------------------------------------------
    def _state(self) -> StateIO:
        if self.io is None:
            raise RuntimeError("the DeepSpeed engine is not built yet (attach_optimizer)")
        return self.io

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        return self._state().model_state()

    def load_model_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        self._state().load_model_state(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self._state().optimizer_state()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        self._state().load_optimizer_state(state, self._materialize_optimizer_state)

    def _materialize_optimizer_state(self) -> None:
        """Create the engine's optimizer state (zero moments) by one update at learning rate 0
        (AdamW then leaves every weight as it is) on an all-zero loss."""
        if self.engine.basic_optimizer.state:
            return
        groups = self.engine.basic_optimizer.param_groups
        lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        self.engine.set_gradient_accumulation_boundary(True)
        with self.autocast(self.precision):
            out = self.engine(ids, labels=ids, return_logits=False)
            loss = out.loss * 0.0 + (out.aux_loss * 0.0 if out.aux_loss is not None else 0.0)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()
        for g, lr in zip(groups, lrs):
            g["lr"] = lr

    def topology(self) -> dict[str, Any]:
        p = self.parallel
        return {
            "backend": self.name,
            "world_size": self.world_size,
            "zero_stage": p.zero_stage,
            "ep": p.ep,
            "precision": self.precision,
            "offload_optimizer": p.offload_optimizer,
            "offload_params": p.offload_params,
            "deepspeed_version": deepspeed.__version__,
        }

    def save_shards(self, module: nn.Module, directory: Path) -> None:
        """engine.save_checkpoint into DIRECTORY/deepspeed (every rank), fsynced."""
        module.save_checkpoint(str(directory), tag=SHARDS_DIR, client_state={}, save_latest=False)
        for path in sorted((Path(directory) / SHARDS_DIR).rglob("*")):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        self.barrier()

    def load_shards(self, module: nn.Module, step_dir: Path, saved: dict[str, Any] | None) -> bool:
        now = self.topology()
        if saved != now:
            if self.is_main:
                log.info(
                    "checkpoint layout %s, this run %s: restoring the canonical state", saved, now
                )
            return False
        if self.parallel.ep > 1:
            if self.is_main:
                log.info("expert-parallel run: restoring the canonical state")
            return False
        shards = Path(step_dir) / SHARDS_DIR
        if not shards.is_dir():
            raise ConfigError(f"{shards}: missing (the checkpoint's DeepSpeed files)")
        path, _ = module.load_checkpoint(
            str(step_dir),
            tag=SHARDS_DIR,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise ConfigError(f"{shards}: DeepSpeed could not load this checkpoint")
        return True

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, value: Tensor) -> Tensor:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def describe(self) -> str:
        p = self.parallel
        ep = f", expert parallel {p.ep}" if p.ep > 1 else ""
        return (
            f"deepspeed backend (ZeRO-{p.zero_stage}{ep}), rank {self.rank}/{self.world_size}, "
            f"device {self.device}"
        )


def _split_expert_groups(optimizer: torch.optim.Optimizer, name: str) -> None:
    """Move expert parameters (DeepSpeed's `allreduce=False`) of each group into a group of
    their own, marked as DeepSpeed expects (`moe: True`, `name`: the EP group name)."""
    expert_groups = []
    for group in optimizer.param_groups:
        experts = [p for p in group["params"] if getattr(p, "allreduce", True) is False]
        if experts:
            group["params"] = [p for p in group["params"] if getattr(p, "allreduce", True)]
            expert_groups.append({**group, "params": experts, "name": name, "moe": True})
    optimizer.param_groups.extend(expert_groups)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _skip_cpu_inference_comm_op() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce op (tens of seconds, a C++
    compiler) that only its inference all-reduce uses; training never calls it."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
