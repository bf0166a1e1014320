"""Sharded checkpoints of the Megatron backend through megatron-core's `dist_checkpointing`.

Every tensor is stored under its canonical (single-device) name with its canonical shape, so a
checkpoint written at one layout (TP, EP, PP) loads at any other: each rank describes the pieces
it holds as `ShardedTensor`s (global shape, offset of its piece) and `dist_checkpointing`
reads or writes exactly those pieces. How a parameter is split comes from its `shard_spec`
mark: a `Shard(dim, sections, group)` keeps, per section, one contiguous slice of the canonical
axis, so a parameter with several sections (Mamba-2's fused in_proj z|x|B|C|dt, its conv
channels x|B|C) becomes one `ShardedTensor` per section, all under the same key (an uneven
sharding grid, which the torch_dist format stores as it is). Unmarked tensors are replicated;
of the ranks that hold the same piece, the lowest writes it (found by one all-gather of the
pieces' keys and offsets, whatever the process groups are).

Keys: `model.<canonical name>` and `optimizer.<canonical name>.<exp_avg | exp_avg_sq | step>`
(AdamW's moments are sharded exactly like their parameters; `step` is replicated). A parameter
shared by two names (tied embeddings) is stored once under its first name; the common state
(`hybrid_checkpoint`) records the alias and the optimizer groups' hyperparameters.

A pipeline stage module names its parameters canonically (`layers.7.mixer...`) and may carry
`checkpoint_aliases` ({local name: canonical name}, e.g. a last stage's copy of a tied
embedding), so stages contribute their own parameters and the keys do not depend on PP.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hybrid.parallel import shard_spec
from hybrid.parallel.shard_spec import Shard

COMMON = "hybrid_checkpoint"
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay")
GroupRanks = Mapping[str, tuple[int, int]]


@dataclass
class Piece:
    """One stored piece: `local` (a view of this rank's tensor) is the slice at `offset` of
    the canonical tensor `key` of shape `global_shape`."""

    key: str
    local: Tensor
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    regular: tuple[tuple[int, int, int], ...] | None  # (dim, rank, world) per split, when
    # every split has one section (None also for a replicated tensor)


def megatron_group_ranks() -> dict[str, tuple[int, int]]:
    """(rank, size) of the tensor- and expert-parallel groups from megatron's parallel_state
    ((0, 1) each when model parallelism is not initialised)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tp": (0, 1), "ep": (0, 1)}
    return {
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
    }


def _level_slices(
    key: str, local_size: int, level: Shard, groups: GroupRanks
) -> tuple[int, list[tuple[int, int, int]]]:
    """(canonical size, [(local start, length, canonical offset)] per section) of one split."""
    if level.group not in groups:
        raise KeyError(f"{key} is sharded over group {level.group!r}, which has no ranks given")
    rank, world = groups[level.group]
    full_size = local_size * world
    sizes = level.section_sizes(full_size)
    level.check_divisible(full_size, world, key)
    slices, start, local_start = [], 0, 0
    for size in sizes:
        step = size // world
        slices.append((local_start, step, start + rank * step))
        start, local_start = start + size, local_start + step
    return full_size, slices


def _pieces(key: str, local: Tensor, spec: Shard | None, groups: GroupRanks) -> list[Piece]:
    """This rank's stored pieces of `local`: one per combination of the sections of its
    splits (each level of a nested mark splits its own dim)."""
    shape, offset = list(local.shape), [0] * local.ndim
    pieces = [(local, offset)]
    regular: list[tuple[int, int, int]] | None = []
    for level in shard_spec.levels(spec):
        dim = level.dim
        shape[dim], slices = _level_slices(key, local.shape[dim], level, groups)
        if len(slices) == 1 and regular is not None:
            rank, world = groups[level.group]
            regular.append((dim, rank, world))
        else:
            regular = None
        pieces = [
            (view.narrow(dim, start, length), [*off[:dim], at, *off[dim + 1 :]])
            for view, off in pieces
            for start, length, at in slices
        ]
    grid = tuple(regular) if regular else None
    return [Piece(key, view, tuple(shape), tuple(off), grid) for view, off in pieces]


def _unwrap(module: nn.Module | list[nn.Module]) -> list[nn.Module]:
    """The modules holding canonically named tensors: wrappers (`.module`) removed, a list or
    ModuleList of pipeline chunks expanded."""
    modules = list(module) if isinstance(module, (list, nn.ModuleList)) else [module]
    out = []
    for m in modules:
        while hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        out.extend(_unwrap(m) if isinstance(m, nn.ModuleList) else [m])
    return out


def _named_tensors(
    module: nn.Module | list[nn.Module],
) -> tuple[list[tuple[str, Tensor]], dict[str, str]]:
    """(canonical name, tensor) of every persistent tensor of the module(s), each tensor once,
    and {alias: canonical name} for tensors reachable under a second name."""
    seen: dict[int, str] = {}
    named, aliases = [], {}
    for m in _unwrap(module):
        renames = getattr(m, "checkpoint_aliases", {})
        for name, t in m.state_dict(keep_vars=True).items():
            canonical = renames.get(name, name)
            if id(t) in seen:
                aliases[canonical] = seen[id(t)]
                continue
            seen[id(t)] = canonical
            if canonical != name:
                aliases[name] = canonical
            named.append((canonical, t))
    return named, aliases


def _optimizer_entries(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, Tensor]]
) -> Iterator[tuple[str, Tensor, Tensor, bool]]:
    """(name, parameter, state tensor, is_moment) for AdamW's state of each parameter
    (zeros and step 0 where the optimizer has not stepped yet: the same update)."""
    by_id = {id(t): name for name, t in named}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None and p.device.type == "meta":
                continue  # another pipeline stage's (see megatron_pipeline.release_other_stages)
            if name is None:
                raise KeyError("an optimizer parameter is not a parameter of the module")
            state = optimizer.state.get(p, {})
            moments = MOMENTS if group.get("amsgrad") else MOMENTS[:2]
            for m in moments:
                yield f"{name}.{m}", p, state.get(m, torch.zeros_like(p)), True
            step = state.get("step", torch.zeros((), dtype=torch.float32))
            yield f"{name}.step", p, torch.as_tensor(step).reshape(1), False


def _collect(
    module: nn.Module | list[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    groups: GroupRanks,
) -> tuple[dict[str, Piece], dict[str, str]]:
    named, aliases = _named_tensors(module)
    out: dict[str, Piece] = {}

    def add(key: str, local: Tensor, spec: Shard | None) -> None:
        for i, piece in enumerate(_pieces(key, local, spec, groups)):
            out[f"{key}#{i}"] = piece

    for name, t in named:
        add(f"model.{name}", t.detach(), shard_spec.get(t))
    if optimizer is not None:
        for key, p, value, moment in _optimizer_entries(optimizer, named):
            add(f"optimizer.{key}", value.detach(), shard_spec.get(p) if moment else None)
    return out, aliases


def _replica_ids(pieces: dict[str, Piece]) -> dict[str, int]:
    """0 for the pieces this rank writes (the lowest rank holding each), 1 for the others."""
    mine = [(p.key, p.offset) for p in pieces.values()]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: 0 for k in pieces}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    owner: dict[tuple, int] = {}
    for rank, held in enumerate(everyone):
        for item in held:
            owner.setdefault(item, rank)
    me = dist.get_rank()
    return {k: int(owner[(p.key, p.offset)] != me) for k, p in pieces.items()}


def _sharded_tensor(piece: Piece, replica: int) -> Any:
    from megatron.core.dist_checkpointing import ShardedTensor

    if piece.regular is not None:
        return ShardedTensor.from_rank_offsets(
            piece.key, piece.local, *piece.regular, replica_id=replica
        )
    return ShardedTensor(
        key=piece.key,
        data=piece.local,
        dtype=piece.local.dtype,
        local_shape=tuple(piece.local.shape),
        global_shape=piece.global_shape,
        global_offset=piece.offset,
        axis_fragmentations=None,
        replica_id=replica,
    )


def _all_aliases(aliases: dict[str, str]) -> dict[str, str]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(aliases)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, aliases)
    return {k: v for held in everyone for k, v in held.items()}


def _hyperparameters(optimizer: torch.optim.Optimizer | None) -> list[dict]:
    if optimizer is None:
        return []
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def sharded_state_dict(
    module: nn.Module | list[nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    groups: GroupRanks | None = None,
) -> dict[str, Any]:
    """The `dist_checkpointing` state dict of this rank's model (and optimizer) pieces, from
    the shard_spec marks; `groups` gives (rank, size) of each shard group ("tp", "ep"),
    default megatron's parallel_state. Collective (every rank calls it)."""
    groups = groups if groups is not None else megatron_group_ranks()
    pieces, aliases = _collect(module, optimizer, groups)
    replicas = _replica_ids(pieces)
    out: dict[str, Any] = {k: _sharded_tensor(p, replicas[k]) for k, p in pieces.items()}
    out[COMMON] = {
        "version": 1,
        "aliases": _all_aliases(aliases),
        "param_groups": _hyperparameters(optimizer),
        "has_optimizer": optimizer is not None,
    }
    return out


def save_sharded(
    module: nn.Module | list[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    directory: str | Path,
    *,
    groups: GroupRanks | None = None,
) -> None:
    """Write the model (and optimizer) pieces of every rank into `directory` (collective)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if not dist.is_initialized() or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(sharded_state_dict(module, optimizer, groups=groups), str(directory))


def _materialize(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW's state (step 0, zero moments) so loading can fill it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.device.type == "meta":  # another pipeline stage's
                continue
            state = optimizer.state[p]
            if "step" not in state:
                fused = group.get("fused") or group.get("capturable")
                device = p.device if fused else "cpu"
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            moments = MOMENTS if group.get("amsgrad") else MOMENTS[:2]
            for m in moments:
                state.setdefault(m, torch.zeros_like(p, memory_format=torch.preserve_format))


@torch.no_grad()
def load_sharded(
    module: nn.Module | list[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    directory: str | Path,
    *,
    groups: GroupRanks | None = None,
) -> None:
    """Read this rank's pieces of the model (and optimizer) from a checkpoint written by
    `save_sharded` at any TP / EP / PP layout, in place (collective)."""
    from megatron.core import dist_checkpointing

    groups = groups if groups is not None else megatron_group_ranks()
    common = dist_checkpointing.load_common_state_dict(str(directory))[COMMON]
    if optimizer is not None and not common["has_optimizer"]:
        raise ValueError(f"the checkpoint in {directory} holds no optimizer state")
    if optimizer is not None:
        _materialize(optimizer)
    pieces, _ = _collect(module, optimizer, groups)
    replicas = _replica_ids(pieces)
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    io_device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
    request = {  # read into device tensors under nccl (AdamW's `step` lives on the CPU)
        k: _sharded_tensor(
            replace(
                p,
                local=torch.empty(
                    p.local.shape, dtype=p.local.dtype, device=io_device or p.local.device
                ),
            ),
            replicas[k],
        )
        for k, p in pieces.items()
    }
    loaded = dist_checkpointing.load(request, str(directory))
    for k, piece in pieces.items():  # views of the parameters and optimizer state
        piece.local.copy_(loaded[k])
    if optimizer is not None:
        _restore_hyperparameters(optimizer, common["param_groups"])


def _restore_hyperparameters(optimizer: torch.optim.Optimizer, saved: list[dict]) -> None:
    """The saved groups' learning rates, betas, eps and weight decay, matched by group name
    (by position for unnamed groups); implementation flags (fused, foreach) stay this run's."""
    by_name = {g.get("name", i): g for i, g in enumerate(saved)}
    for i, group in enumerate(optimizer.param_groups):
        old = by_name.get(group.get("name", i))
        if old is not None:
            group.update({k: old[k] for k in HYPERPARAMETERS if k in old})


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """A one-process gloo group when none exists (dist_checkpointing reads through one)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def consolidate(directory: str | Path, *, optimizer: bool = False) -> dict[str, Tensor]:
    """The canonical full model state (single-device names and shapes, tied names restored)
    of a checkpoint written by `save_sharded`, read by one process (for HF export and
    `hybrid convert`); with `optimizer=True` the optimizer entries too, under
    `optimizer.<name>.<exp_avg | exp_avg_sq | step>`."""
    from megatron.core import dist_checkpointing

    with _process_group():
        tensors = dist_checkpointing.load_plain_tensors(str(directory))
        common = dist_checkpointing.load_common_state_dict(str(directory))
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    for alias, target in common[COMMON]["aliases"].items():
        state[alias] = state[target]
    if optimizer:
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                state[k] = v.reshape(()) if k.endswith(".step") else v
    return dict(sorted(state.items()))
