"""Gradients and canonical state of a model sharded by the megatron backend (CPU or CUDA).

Every sharded parameter carries its `shard_spec.Shard`: group "tp" (megatron's tensor-parallel
group), "ep" (its expert-parallel group), or both nested (an expert weight whose hidden size is
split over TP: expert tensor parallelism, with megatron's expert tensor-parallel group equal to
the TP group). Replicated parameters carry none; those whose gradient is partial per TP rank
are flagged `tensor_parallel.PARTIAL_GRAD`.

Gradients (`finish_grads`): partial ones summed over TP; dense ones summed over the
data-parallel group, expert ones over the expert-data-parallel group; both divided by the DP
size (the trainer scales each rank's loss by the DP size, and an expert's gradient already
holds the tokens of its whole EP group). `clip_grads` counts each parameter once: squared norms
of TP shards summed over TP, of EP shards over EP (and TP when nested), replicated ones as
they are, stages over PP.

Canonical state: full tensors under single-device names, gathered with `shard_spec.unshard`
(every rank calls; rank 0's result is complete); loading shards the full tensors again.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hybrid.parallel import shard_spec
from hybrid.parallel.shard_spec import TIED_COPY_OF
from hybrid.parallel.tensor_parallel import PARTIAL_GRAD
from hybrid.recipe.schema import ConfigError

_GROUPS = {"tp": ps.get_tensor_model_parallel_group, "ep": ps.get_expert_model_parallel_group}


def _group(spec: shard_spec.Shard) -> dist.ProcessGroup:
    if spec.group not in _GROUPS:
        raise ValueError(f"unknown shard group {spec.group!r}")
    return _GROUPS[spec.group]()


def _groups_of(param: Tensor) -> tuple[str, ...]:
    return shard_spec.groups(shard_spec.get(param))


def _all_reduce_coalesced(tensors: list[Tensor], group: dist.ProcessGroup) -> None:
    """Sum `tensors` over `group` in place, as one flat buffer per dtype."""
    if not tensors or dist.get_world_size(group) == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_tensors in by_dtype.values():
        flat = _flatten_dense_tensors(group_tensors)
        dist.all_reduce(flat, group=group)
        for t, reduced in zip(group_tensors, _unflatten_dense_tensors(flat, group_tensors)):
            t.copy_(reduced)


# -- gradients ----------------------------------------------------------------------------------
@torch.no_grad()
def finish_grads(params: list[nn.Parameter], dp_size: int) -> None:
    """Make every gradient whole and averaged over data-parallel replicas (see the docstring)."""
    for p in params:
        if p.grad is None:  # every rank must take part in the same collectives
            p.grad = torch.zeros_like(p)
    partial = [p.grad for p in params if getattr(p, PARTIAL_GRAD, False)]
    _all_reduce_coalesced(partial, ps.get_tensor_model_parallel_group())
    if dp_size == 1:
        return
    expert = [p.grad for p in params if "ep" in _groups_of(p)]
    dense = [p.grad for p in params if "ep" not in _groups_of(p)]
    _all_reduce_coalesced(dense, ps.get_data_parallel_group())
    _all_reduce_coalesced(expert, ps.get_expert_data_parallel_group())
    for g in dense + expert:
        g.div_(dp_size)


@torch.no_grad()
def grad_norm(params: list[nn.Parameter]) -> float:
    """Global L2 norm of the gradients, each parameter counted once."""
    device = params[0].grad.device if params else torch.device("cpu")
    keys = ((), ("tp",), ("ep",), ("ep", "tp"))  # every rank reduces the same keys, in order
    sq = {key: torch.zeros((), device=device) for key in keys}
    for p in params:
        if p.grad is not None and not hasattr(p, TIED_COPY_OF):  # the original counts it
            key = _groups_of(p)
            sq[key] = sq[key] + p.grad.detach().float().square().sum()
    for key in keys:
        for name in key:  # a nested shard's pieces span the EP x TP grid
            group = _GROUPS[name]()
            if dist.get_world_size(group) > 1:
                dist.all_reduce(sq[key], group=group)
    total = sum(sq.values())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return math.sqrt(float(total))


@torch.no_grad()
def clip_grads(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Scale the gradients to at most `max_norm` (None or 0: measure only) as
    `torch.nn.utils.clip_grad_norm_` does; returns the norm before clipping."""
    norm = grad_norm(params)
    if max_norm:
        coef = min(max_norm / (norm + 1e-6), 1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


# -- canonical model state ----------------------------------------------------------------------
def gather_full(local: Tensor, spec: shard_spec.Shard) -> Tensor:
    """The canonical tensor of a sharded one (collective over its groups, innermost first)."""
    for level in reversed(shard_spec.levels(spec)):
        group = _group(level)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        local = shard_spec.unshard(parts, level)
    return local


def local_piece(full: Tensor, spec: shard_spec.Shard) -> Tensor:
    """This rank's piece of a canonical tensor."""
    for level in shard_spec.levels(spec):
        group = _group(level)
        full = shard_spec.shard(full, level, dist.get_rank(group), dist.get_world_size(group))
    return full


def _canonical(t: Tensor, cache: dict[int, Tensor]) -> Tensor:
    """Full CPU copy of `t` (tied tensors stay one tensor)."""
    if id(t) not in cache:
        spec = shard_spec.get(t)
        full = gather_full(t.detach(), spec) if spec is not None else t.detach()
        cache[id(t)] = full.to("cpu", copy=True)
    return cache[id(t)]


def canonical_model_state(model: nn.Module) -> dict[str, Tensor]:
    """Single-device names and full tensors on CPU; rank 0's result is complete (pipeline stages
    are gathered to it)."""
    cache: dict[int, Tensor] = {}
    own = model.state_dict(keep_vars=True)  # other pipeline stages' parts are on meta
    state = {k: _canonical(v, cache) for k, v in own.items() if not v.is_meta}
    if ps.get_pipeline_model_parallel_world_size() > 1:
        state = _gather_to_first_stage(state)
    return state


@torch.no_grad()
def load_canonical_model_state(
    model: nn.Module, state: dict[str, Tensor], *, partial: bool = False
) -> None:
    """Copy a canonical state into the sharded `model` (each rank keeps its pieces). `partial`:
    pipeline parallel, so keys of other stages (on the meta device here) are expected."""
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if not v.is_meta}
    missing = sorted(k for k in own if k not in state)
    unexpected = [] if partial else sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint does not fit this model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (was the recipe's model section changed?)"
        )
    for name, t in own.items():
        spec = shard_spec.get(t)
        full = state[name].to(t.device)
        t.copy_(local_piece(full, spec) if spec is not None else full)


# -- canonical optimizer state ------------------------------------------------------------------
def _indexed_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Parameters in the order `state_dict()` numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def canonical_param_names(model: nn.Module) -> dict[int, str]:
    """The single-device name of every parameter of `model` (meta ones included), by id: a last
    pipeline stage's copy of a tied embedding (`TIED_COPY_OF`) is named after the original."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), getattr(p, TIED_COPY_OF, name))
    return names


def _canonical_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Names of each optimizer group's parameters as the single-device optimizer holds them:
    the groups of every pipeline stage merged (collective over the pipeline group), in the
    model's parameter order."""
    names = canonical_param_names(model)
    mine = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    everyone = [mine]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        group = ps.get_pipeline_model_parallel_group()
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
    order = {n: i for i, n in enumerate(dict.fromkeys(names.values()))}
    return [
        sorted({n for stage in everyone for n in stage[gi]}, key=order.__getitem__)
        for gi in range(len(mine))
    ]


def _gather_to_first_stage(part: dict[str, Any]) -> dict[str, Any]:
    """Union of every pipeline stage's `part` on the first stage (the first one of a key wins:
    the two copies of a tied embedding hold the same values)."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return part
    group = ps.get_pipeline_model_parallel_group()
    first = dist.get_global_rank(group, 0)
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(part, parts, dst=first, group=group)
    merged: dict[str, Any] = {}
    for p in parts or [part]:
        for key, value in p.items():
            merged.setdefault(key, value)
    return merged


def canonical_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` in the single-device AdamW layout: per-parameter tensors of
    sharded parameters gathered to their canonical shape, pipeline stages merged and numbered as
    the single-device optimizer numbers its parameters (every rank calls; rank 0's is whole)."""
    sd = optimizer.state_dict()
    params = _indexed_params(optimizer)
    names = canonical_param_names(model)
    slots = {}
    for idx in sorted(sd["state"]):
        spec = shard_spec.get(params[idx])
        slot = dict(sd["state"][idx])  # the live state's dict otherwise
        for key, value in slot.items():
            if torch.is_tensor(value):
                full = gather_full(value, spec) if spec is not None and value.ndim else value
                slot[key] = full.cpu()
        slots[names[id(params[idx])]] = slot
    groups = _canonical_groups(model, optimizer)
    slots = _gather_to_first_stage(slots)
    index = {n: i for i, n in enumerate(n for g in groups for n in g)}
    return {
        "state": {index[n]: slot for n, slot in sorted(slots.items(), key=lambda x: index[x[0]])},
        "param_groups": [
            {**{k: v for k, v in hp.items() if k != "params"}, "params": [index[n] for n in g]}
            for hp, g in zip(sd["param_groups"], groups)
        ],
    }


def load_canonical_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load a canonical optimizer state, keeping this rank's pieces of sharded parameters and
    this pipeline stage's parameters (collective over the pipeline group)."""
    groups = _canonical_groups(model, optimizer)
    saved_groups = state.get("param_groups", [])
    if [len(g["params"]) for g in saved_groups] != [len(g) for g in groups]:
        raise ConfigError(
            "the checkpoint's optimizer state does not fit this run: parameter groups of "
            f"{[len(g['params']) for g in saved_groups]} parameters, this model has "
            f"{[len(g) for g in groups]}"
        )
    index = {n: i for i, n in enumerate(n for g in groups for n in g)}
    names = canonical_param_names(model)
    saved = state.get("state", {})
    local: dict[int, dict] = {}
    for idx, p in enumerate(_indexed_params(optimizer)):
        ci = index[names[id(p)]]
        slot = saved.get(ci, saved.get(str(ci)))
        if slot is None:
            continue
        spec = shard_spec.get(p)
        local[idx] = {
            key: local_piece(value, spec)
            if spec is not None and torch.is_tensor(value) and value.ndim == p.ndim
            else value
            for key, value in slot.items()
        }
    param_groups, start = [], 0
    for saved_group, group in zip(saved_groups, optimizer.param_groups):
        n = len(group["params"])
        hyper = {k: v for k, v in saved_group.items() if k != "params"}
        param_groups.append({**hyper, "params": list(range(start, start + n))})
        start += n
    try:
        optimizer.load_state_dict({"state": local, "param_groups": param_groups})
    except (ValueError, KeyError) as err:
        raise ConfigError(
            f"the checkpoint's optimizer state does not fit this run: {err}"
        ) from None
