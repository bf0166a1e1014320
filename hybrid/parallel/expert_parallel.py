"""Expert parallelism under DeepSpeed: the engine-free dispatch of
`hybrid.parallel.expert_dispatch` (read its docstring for how tokens travel), made into a
`deepspeed.moe.layer.MoE` so the engine recognises an MoE model.

Its parameters carry DeepSpeed's expert marks (`allreduce=False`, `group_name="ep_size_{P}"`),
so their gradients are averaged over the expert-data-parallel group and ZeRO partitions them
there. The groups are DeepSpeed's (`deepspeed.utils.groups`).
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.utils import groups
from torch import nn

from hybrid.model.moe import GroupedExperts
from hybrid.parallel.expert_dispatch import EXPERT_WEIGHTS, ExpertDispatch, moe_layers

log = logging.getLogger(__name__)

__all__ = ["EXPERT_WEIGHTS", "ExpertShard", "apply_expert_parallel", "create_groups"]


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel groups of size `ep_size`."""
    return f"ep_size_{ep_size}"


def create_groups(ep_size: int) -> dist.ProcessGroup:
    """DeepSpeed's expert-parallel and expert-data-parallel groups of size `ep_size` (created
    once per process; consecutive ranks form an EP group). Returns this rank's EP group."""
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


class ExpertShard(ExpertDispatch, DeepSpeedMoE):
    """`ExpertDispatch` as a `deepspeed.moe.layer.MoE`, which is how the engine recognises an
    MoE model. Only `nn.Module`'s constructor runs: DeepSpeed's MoE constructor builds its own
    gate and experts, which this class does not use; the attributes the engine reads
    (`num_experts`, `num_local_experts`, `ep_size`, `expert_group_name`) are set here.
    """

    def __init__(self, full: GroupedExperts, group: dist.ProcessGroup, ep_size: int) -> None:
        ExpertDispatch.__init__(self, full, group, ep_size)
        self.expert_group_name = group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        for p in self.parameters():
            p.allreduce = False  # DeepSpeed: an expert parameter, reduced over its EP-DP group
            p.group_name = self.expert_group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine; the groups exist already (`create_groups`)."""
        assert self.expert_group_name in groups._get_expert_parallel_group_dict()

    forward = ExpertDispatch.forward


def apply_expert_parallel(model: nn.Module, ep_size: int) -> list[ExpertShard]:
    """Replace the routed experts of every MoE sublayer of `model` by this rank's shard
    (in place; call before activation checkpointing wraps the layers). Returns the shards."""
    moes = moe_layers(model, ep_size)
    n_experts = moes[0].cfg.n_experts
    group = create_groups(ep_size)
    shards = []
    for moe in moes:
        moe.experts = ExpertShard(moe.experts, group, ep_size)
        shards.append(moe.experts)
    log.info(
        "expert parallel: %d MoE layers, %d of %d experts on each rank (EP group of %d)",
        len(shards),
        n_experts // ep_size,
        n_experts,
        ep_size,
    )
    return shards
