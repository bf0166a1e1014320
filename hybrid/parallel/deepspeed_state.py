"""The canonical training state of a DeepSpeed engine, gathered from and scattered back into
whatever holds it (ZeRO stage 0-3, expert-parallel shards).

Canonical means the single-device model's view: `model.state_dict()` keys with full tensors
(fp32 master weights where the engine keeps them), and the optimizer state in the layout
`torch.optim.AdamW.state_dict()` has for the single-device model (parameters numbered through
the canonical parameter groups in order). A checkpoint in this form resumes under any ZeRO stage,
world size or expert-parallel size, and under the local backend.

Where the values live, per engine layout (all reads and writes here are collective: every rank
calls them for every key, in the same order):

- ZeRO 1-3 (and DeepSpeed's bf16 optimizer): fp32 masters and Adam moments partitioned over the
  data-parallel group (the expert-data-parallel group for experts), read and written with
  DeepSpeed's public `safe_get_full_*` / `safe_set_full_*` functions; the module's parameters
  are their (possibly bf16) copies, refreshed after a load (ZeRO-3 through `GatheredParameters`).
- ZeRO 0 (fp32 parameters): the module's parameters are the masters and the client AdamW holds
  the moments directly.
- Expert parallelism: a rank holds rows [r * E/P, (r + 1) * E/P) of each expert tensor; full
  tensors are all-gathered over the EP group, and a load keeps the rank's rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import Tensor, nn

from hybrid.parallel.expert_parallel import ExpertShard
from hybrid.recipe.schema import ConfigError

MOMENTS = ("exp_avg", "exp_avg_sq")
# Set on every optimizer group: the index of the canonical group it belongs to (expert groups
# are split from a canonical group and follow its settings).
PARENT_KEY = "hybrid_parent"
_NOT_SAVED = ("params", "moe", PARENT_KEY)
_NOT_LOADED = ("params", "name", "moe", PARENT_KEY)


@dataclass
class CanonicalLayout:
    """Canonical keys of the model and where this rank holds each.

    tensors: key -> this rank's parameter or buffer (tied keys share one object).
    shards: id(parameter) -> the ExpertShard that holds it (rows of an expert tensor).
    groups: per canonical optimizer group, the canonical key of each parameter (filled by
        `record_groups` before the engine reorganises the optimizer's groups).
    """

    tensors: dict[str, Tensor]
    shards: dict[int, ExpertShard] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> CanonicalLayout:
        """Read from `model` after expert parallelism and before any wrapper renames modules."""
        tensors = dict(model.state_dict(keep_vars=True))
        shards = {
            id(p): m for m in model.modules() if isinstance(m, ExpertShard) for p in m.parameters()
        }
        return cls(tensors=tensors, shards=shards)

    def record_groups(self, optimizer: torch.optim.Optimizer) -> None:
        key_of: dict[int, str] = {}
        for key, t in self.tensors.items():
            key_of.setdefault(id(t), key)
        self.groups = [[key_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]

    def parameters(self) -> list[tuple[int, str, nn.Parameter]]:
        """(canonical optimizer index, key, parameter) in the canonical optimizer order."""
        flat = [key for group in self.groups for key in group]
        return [(i, key, self.tensors[key]) for i, key in enumerate(flat)]


class StateIO:
    """Collective reads and writes of the canonical state of one engine (see module doc)."""

    def __init__(self, layout: CanonicalLayout, engine: Any, basic: torch.optim.Optimizer):
        self.layout, self.engine, self.basic = layout, engine, basic
        self.rank = dist.get_rank()

    # -- one tensor ----------------------------------------------------------------------------
    def _zero(self, p: Tensor) -> bool:
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")

    def _read_local(self, p: Tensor, key: str | None) -> Tensor | None:
        """This rank's full tensor (the shard rows for experts) in fp32, or None if no state."""
        if not isinstance(p, nn.Parameter):
            return p.detach().clone()
        if self._zero(p):
            if key is None:
                value = safe_get_full_fp32_param(p)
            elif not self.basic.state:
                return None
            else:
                self._link_moments(p)
                value = safe_get_full_optimizer_state(p, key)
            return None if value is None else value.detach().float()
        if key is None:
            return p.detach().float().clone()
        state = self.basic.state.get(p, {})
        return state[key].detach().float().clone() if key in state else None

    def _link_moments(self, p: Tensor) -> None:
        """Point the ZeRO 1/2 fragment of `p` at the current moments of its flat partition.

        DeepSpeed links the fragments once, right after the first parameter group's first
        update, when the other groups have no optimizer state yet (their fragments stay empty);
        and a load replaces the state tensors. Linking again before each access fixes both.
        """
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return
        flat = self.basic.param_groups[mapping.param_group_index]["params"][0]
        mapping.set_optim_state_fragment(flat, self.basic.state[flat])

    def read(self, p: Tensor, key: str | None = None) -> Tensor | None:
        """The canonical (full) tensor of `p`: its fp32 master, or optimizer moment `key`."""
        value = self._read_local(p, key)
        shard = self.layout.shards.get(id(p))
        if shard is None or value is None:
            return value
        parts = [torch.empty_like(value) for _ in range(shard.ep_size)]
        dist.all_gather(parts, value.contiguous(), group=shard.group)
        return torch.cat(parts, dim=0)

    def _local_rows(self, p: Tensor, value: Tensor) -> Tensor:
        shard = self.layout.shards.get(id(p))
        if shard is None:
            return value
        n = shard.num_local_experts
        return value[shard.ep_rank * n : (shard.ep_rank + 1) * n]

    def write(self, p: Tensor, value: Tensor, key: str | None = None) -> None:
        """Set the fp32 master of `p` (and the module's copy) or its optimizer moment `key`."""
        value = self._local_rows(p, value).to(device=p.device)
        if not isinstance(p, nn.Parameter):
            p.data.copy_(value)
        elif key is not None:
            if self._zero(p):
                self._link_moments(p)
                safe_set_full_optimizer_state(p, value.float(), key)
            else:
                self.basic.state[p][key].copy_(value)
        else:
            if self._zero(p):
                safe_set_full_fp32_param(p, value.float())
            self._write_module_copy(p, value)

    def _write_module_copy(self, p: nn.Parameter, value: Tensor) -> None:
        if hasattr(p, "ds_id"):  # ZeRO-3: gather, change on rank 0, partition again
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.rank == 0:
                    p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(p.dtype))

    # -- whole states --------------------------------------------------------------------------
    def model_state(self) -> dict[str, Tensor]:
        """Canonical model state on CPU (complete on rank 0; tied keys share one tensor)."""
        out: dict[str, Tensor] = {}
        done: dict[int, Tensor] = {}
        for key, t in self.layout.tensors.items():
            if id(t) not in done:
                value = self.read(t)
                done[id(t)] = value.cpu() if value is not None else None
            out[key] = done[id(t)]
        return out

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        _check_keys(state, self.layout.tensors, "model")
        for key, t in self.layout.tensors.items():
            expected = self._full_shape(t)
            if tuple(state[key].shape) != expected:
                raise ConfigError(
                    f"checkpoint tensor {key} has shape {tuple(state[key].shape)}, this model "
                    f"{expected} (was the recipe's model section changed?)"
                )
        done: set[int] = set()
        for key, t in self.layout.tensors.items():
            if id(t) not in done:
                done.add(id(t))
                self.write(t, state[key])

    def _full_shape(self, t: Tensor) -> tuple[int, ...]:
        shard = self.layout.shards.get(id(t))
        shape = tuple(getattr(t, "ds_shape", t.shape))
        return (shape[0] * shard.ep_size, *shape[1:]) if shard else shape

    def optimizer_state(self) -> dict[str, Any]:
        """The single-device `AdamW.state_dict()` (complete on rank 0)."""
        state: dict[int, dict[str, Tensor]] = {}
        step = self._step()
        for index, _, p in self.layout.parameters():
            moments = {k: self.read(p, k) for k in MOMENTS}
            if step is not None and all(v is not None for v in moments.values()):
                state[index] = {"step": step.clone()}
                state[index].update({k: v.cpu() for k, v in moments.items()})
        groups, start = [], 0
        for i, keys in enumerate(self.layout.groups):
            hyper = {k: v for k, v in self._canonical_group(i).items() if k not in _NOT_SAVED}
            groups.append({**hyper, "params": list(range(start, start + len(keys)))})
            start += len(keys)
        return {"state": state, "param_groups": groups}

    def _canonical_group(self, index: int) -> dict:
        """The optimizer group of canonical group `index` (or an expert group split from it,
        if DeepSpeed dropped the emptied original)."""
        found = [g for g in self.basic.param_groups if g.get(PARENT_KEY, 0) == index]
        return next((g for g in found if not g.get("moe")), found[0])

    def _step(self) -> Tensor | None:
        for st in self.basic.state.values():
            if "step" in st:
                step = st["step"]
                return step.detach().cpu().float() if torch.is_tensor(step) else torch.tensor(step)
        return None

    def load_optimizer_state(self, saved: dict, materialize: Callable[[], None]) -> None:
        """Set hyperparameters, moments and step from a canonical optimizer state.
        `materialize` makes the engine create its (zero) optimizer state if it has none yet."""
        groups = saved.get("param_groups", [])
        sizes = [len(g.get("params", [])) for g in groups]
        if sizes != [len(keys) for keys in self.layout.groups]:
            raise ConfigError(
                f"the checkpoint's optimizer has parameter groups of sizes {sizes}, this run "
                f"{[len(k) for k in self.layout.groups]} (was the model or optimizer changed?)"
            )
        self._set_hyperparameters(groups)
        state = saved.get("state", {})
        if not state:
            return  # saved before the first step: nothing to restore
        materialize()
        for index, _, p in self.layout.parameters():
            for k in MOMENTS:
                self.write(p, state[index][k], k)
        step = next(iter(state.values()))["step"]
        for st in self.basic.state.values():
            st["step"] = step.to(st["step"].device, st["step"].dtype).clone()

    def _set_hyperparameters(self, saved_groups: list[dict]) -> None:
        """Canonical group i and the expert groups split from it take the saved settings."""
        for group in self.basic.param_groups:
            parent = saved_groups[group.get(PARENT_KEY, 0)]
            for k, v in parent.items():
                if k not in _NOT_LOADED:
                    group[k] = v


def _check_keys(state: dict, tensors: dict, what: str) -> None:
    missing = sorted(set(tensors) - set(state))
    unexpected = sorted(set(state) - set(tensors))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint does not fit this {what}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (was the recipe's model section changed?)"
        )
