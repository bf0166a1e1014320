"""megatron-core's DistributedDataParallel and distributed optimizer for the megatron backend
(`parallel.distributed_optimizer: true`, CUDA only).

`Engine` wraps each model chunk in megatron's DDP (contiguous fp32 gradient buffers, reduced
over the data-parallel group; expert parameters, `allreduce = False`, over the expert-data-
parallel group) and builds megatron's optimizer with `get_megatron_optimizer`
(`use_distributed_optimizer`: the Adam state and fp32 main parameters sharded over DP).

The trainer's AdamW stays the source of the hyperparameters: its two groups (decay / no decay,
`hybrid.train.optim`) give megatron's groups their `wd_mult` (a predicate on the parameters of
the no-decay group), its betas, eps and weight decay build the OptimizerConfig, and its learning
rate, which the trainer's schedule moves, is copied into megatron's groups before each step.

Sharded parameters get megatron's attributes (`tensor_model_parallel`, `partition_dim`,
`partition_stride`) so its gradient norm counts TP-replicated parameters once; the gradients
that are partial per TP rank (`tensor_parallel.PARTIAL_GRAD`) are summed over TP after the
data-parallel reduction, as megatron's `finalize_model_grads` does for sequence-parallel norms.

Checkpoints: the distributed optimizer's state is sharded in megatron's flat buffers; the
canonical (single-device AdamW) optimizer state is not produced from it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from hybrid.parallel import shard_spec
from hybrid.parallel.tensor_parallel import PARTIAL_GRAD


def _megatron_marks(module: nn.Module) -> None:
    for p in module.parameters():
        for level in shard_spec.levels(shard_spec.get(p)):
            if level.group == "tp":
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, level.dim, 1
            if level.group == "ep":
                p.allreduce = False  # megatron DDP: an expert parameter


def _transformer_config(model_cfg: Any, dtype: torch.dtype) -> Any:
    from megatron.core.transformer import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    return TransformerConfig(
        num_layers=len(model_cfg.layers()),
        hidden_size=model_cfg.d_model,
        num_attention_heads=tp,  # read by nothing here; must divide by tp
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp,
        num_moe_experts=model_cfg.moe.n_experts if ep > 1 else None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        calculate_per_token_loss=False,  # DDP averages over data-parallel ranks
    )


class Engine:
    """megatron DDP + distributed optimizer over `module` (a model, or a list of pipeline
    chunks), hyperparameters from the trainer's `optimizer`."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, model_cfg: Any):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate

        self.trainer_optimizer = optimizer
        chunks = list(module) if isinstance(module, nn.ModuleList) else [module]
        dtype = next(module.parameters()).dtype
        config = _transformer_config(model_cfg, dtype)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True
        )
        for chunk in chunks:
            _megatron_marks(chunk)
        self.chunks = [DistributedDataParallel(config, ddp_config, chunk) for chunk in chunks]
        self.partial = [
            p for c in chunks for p in c.parameters() if getattr(p, PARTIAL_GRAD, False)
        ]

        decay = next(g for g in optimizer.param_groups if g["weight_decay"] > 0)
        no_decay = {
            id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
        }
        self.weight_decay = decay["weight_decay"]
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=decay["lr"],
            weight_decay=self.weight_decay,
            adam_beta1=decay["betas"][0],
            adam_beta2=decay["betas"][1],
            adam_eps=decay["eps"],
            params_dtype=dtype,
            use_distributed_optimizer=True,
            clip_grad=1.0,  # set per step
        )
        plain = ParamKey(
            predicate=ParamPredicate(name="hybrid_no_decay", fn=lambda p: id(p) in no_decay)
        )
        self.optimizer = get_megatron_optimizer(
            opt_config, self.chunks, config_overrides={plain: {"wd_mult": 0.0}}
        )

    @property
    def module(self) -> nn.Module:
        return self.chunks[0] if len(self.chunks) == 1 else nn.ModuleList(self.chunks)

    def _configs(self) -> list[Any]:
        inner = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [o.config for o in inner]

    @torch.no_grad()
    def step(self, grad_clip: float | None) -> float:
        """Reduce the gradients, sum TP-partial ones, clip (None or 0: measure only), step
        with the trainer's current learning rate, zero the buffers; returns the grad norm."""
        for chunk in self.chunks:
            chunk.finish_grad_sync()
        if self.partial and ps.get_tensor_model_parallel_world_size() > 1:
            group = ps.get_tensor_model_parallel_group()
            for p in self.partial:
                dist.all_reduce(p.main_grad, group=group)
        for config in self._configs():
            config.clip_grad = grad_clip if grad_clip else 1e30  # the norm is always computed
        lr = self.trainer_optimizer.param_groups[0]["lr"]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        ok, norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("megatron's optimizer skipped the step (non-finite gradients)")
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return float(norm)

    # -- canonical optimizer state ----------------------------------------------------------------
    def _dp_group(self, param: nn.Parameter) -> dist.ProcessGroup:
        if not getattr(param, "allreduce", True):
            return ps.get_expert_data_parallel_group()
        return ps.get_data_parallel_group()

    def _owned(self, param: nn.Parameter) -> tuple[Any, dict[str, torch.Tensor]] | None:
        """(range of param.view(-1) this DP rank owns, its main param and Adam moments)."""
        opt = self._inner_for(param)
        if opt is None:
            return None
        span = opt._get_model_param_range_map(param)["param"]
        return span, opt._get_main_param_and_optimizer_states(param)

    def _inner_for(self, param: nn.Parameter) -> Any | None:
        """The distributed optimizer holding a range of `param` on this rank (None: another
        data-parallel rank holds all of it)."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if param in opt.model_param_gbuf_map:
                return opt
        return None

    def _full_moment(self, param: nn.Parameter, key: str) -> torch.Tensor:
        """This rank's (TP / EP-local) `key` moment of `param`, gathered over data parallel."""
        flat = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        owned = self._owned(param)
        if owned is not None:
            span, tensors = owned
            flat[span.start : span.end] = tensors[key].float()
        dist.all_reduce(flat, group=self._dp_group(param))
        return flat.view_as(param)

    def optimizer_state(self) -> dict[str, Any]:
        """The trainer's AdamW `state_dict()` layout, moments gathered over data parallel and
        (with the shard marks) to canonical shapes. Every rank calls it."""
        from hybrid.parallel.megatron_state import gather_full

        sd = self.trainer_optimizer.state_dict()
        params = [p for g in self.trainer_optimizer.param_groups for p in g["params"]]
        step = self._step_tensor()
        for idx, param in enumerate(params):
            slot: dict[str, torch.Tensor] = {"step": step.clone()}
            spec = shard_spec.get(param)
            for key in ("exp_avg", "exp_avg_sq"):
                moment = self._full_moment(param, key)
                slot[key] = (gather_full(moment, spec) if spec is not None else moment).cpu()
            sd["state"][idx] = slot
        return sd

    def _step_tensor(self) -> torch.Tensor:
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for state in opt.optimizer.state.values():
                if "step" in state:
                    return torch.as_tensor(state["step"], dtype=torch.float32).cpu()
        return torch.zeros((), dtype=torch.float32)

    @torch.no_grad()
    def load_optimizer_state(self, state: dict) -> None:
        """Load a canonical AdamW state (after the model weights, which the fp32 main
        parameters are views of): each rank keeps its DP range of its TP / EP piece."""
        from hybrid.parallel.megatron_state import local_piece

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            lrs = [g["lr"] for g in opt.optimizer.param_groups]
            for g in opt.optimizer.param_groups:  # its dummy step must not move the weights
                g["lr"] = 0.0
            opt._init_optimizer_states_with_dummy_values()
            for g, lr in zip(opt.optimizer.param_groups, lrs):
                g["lr"] = lr
        params = [p for g in self.trainer_optimizer.param_groups for p in g["params"]]
        slots = {int(k): v for k, v in state.get("state", {}).items()}
        if len(slots) != len(params):
            raise ValueError(f"{len(slots)} optimizer slots for {len(params)} parameters")
        for idx, param in enumerate(params):
            owned = self._owned(param)
            if owned is None:
                continue
            span, tensors = owned
            spec = shard_spec.get(param)
            for key in ("exp_avg", "exp_avg_sq"):
                full = slots[idx][key].to(param.device)
                local = local_piece(full, spec) if spec is not None else full
                tensors[key].copy_(local.reshape(-1)[span.start : span.end])
            if "step" in slots[idx]:
                inner = self._inner_for(param)
                group_index, order = inner.model_param_group_index_map[param]
                main = inner.optimizer.param_groups[group_index]["params"][order]
                step = inner.optimizer.state[main].get("step")
                if torch.is_tensor(step):
                    step.copy_(slots[idx]["step"])
                else:
                    inner.optimizer.state[main]["step"] = slots[idx]["step"].clone()
