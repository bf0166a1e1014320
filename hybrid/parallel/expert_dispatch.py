"""Expert parallelism for the MoE sublayer, applied from outside the single-device model; no
engine dependency (the DeepSpeed and Megatron backends both use it, with their own groups).

The E routed experts of each MoE layer are split over an expert-parallel (EP) group of P ranks:
rank r of the group keeps experts [r * E/P, (r + 1) * E/P) (`E_l` = E/P local experts). The
router, its aux losses, the correction bias and the shared experts stay replicated and
unchanged. `MoE.forward` still routes its own tokens, sorts their assignments by expert
(`hybrid.ops.moe.permute`) and calls `self.experts(x_MD, counts_E, expert_M)`;
`ExpertDispatch` replaces `self.experts` and keeps that contract while running only the local
experts:

    1. counts:   recv_SE[s, e] = rows source rank s sends to my local expert e  (all-to-all)
    2. dispatch: the rows for rank j's experts are one contiguous block of x_MD (ascending
                 expert order), so one all-to-all sends each block to its owner
    3. compute:  received rows (grouped by source, then expert) are regrouped by local expert
                 (stable, so source order is kept inside an expert) and run as grouped matmuls
    4. combine:  the inverse regrouping and the inverse all-to-all return (M, D) rows in the
                 caller's order; `unpermute` weights and sums them as on one device

Dropless by construction (every assignment is computed) and exact: each row meets the same
weights as on one device. Gradients flow back through both all-to-alls. Each local expert
tensor is marked `Shard(dim=0, group="ep")` (hybrid.parallel.shard_spec).

Shape legend:
    M  rows this rank sends (its tokens' assignments)   R  rows this rank receives
    D  model width   F  expert hidden   E  experts   P  EP group size   S = P source ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hybrid.model.moe import GroupedExperts, MoE
from hybrid.parallel import shard_spec
from hybrid.recipe.schema import ConfigError

EXPERT_WEIGHTS = (
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_proj_bias",
    "up_proj_bias",
    "down_proj_bias",
)
EP_SHARD = shard_spec.Shard(dim=0, group="ep")


class _AllToAll(torch.autograd.Function):
    """Rows of `x` (split by `send`) to each rank of `group`; the backward sends them back."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class ExpertDispatch(GroupedExperts):
    """This rank's E/P experts of one MoE layer, with the all-to-all dispatch around them.

    Holds the same parameter names as `GroupedExperts` with E_l rows instead of E (so the
    canonical key of each is unchanged).
    """

    def __init__(self, full: GroupedExperts, group: dist.ProcessGroup, ep_size: int) -> None:
        nn.Module.__init__(self)
        n_experts = full.up_proj.shape[0]
        self.num_experts, self.ep_size = n_experts, ep_size
        self.num_local_experts = n_experts // ep_size
        self.group, self.ep_rank = group, dist.get_rank(group)
        self.activation, self.has_bias = full.activation, full.has_bias
        lo = self.ep_rank * self.num_local_experts
        for name in EXPERT_WEIGHTS:
            weight = getattr(full, name)
            if weight is None:
                setattr(self, name, None)
                continue
            local = nn.Parameter(weight.detach()[lo : lo + self.num_local_experts].clone())
            setattr(self, name, shard_spec.mark(local, EP_SHARD))

    def forward(self, x_MD: Tensor, counts_E: Tensor, expert_M: Tensor | None = None) -> Tensor:
        """Rows sorted by (global) expert (M, D) -> expert outputs (M, F->D) in the same order.
        `expert_M` is not needed: local expert ids are derived from the exchanged counts."""
        P, E_l = self.ep_size, self.num_local_experts
        send_SE = counts_E.reshape(P, E_l).contiguous()
        recv_SE = torch.empty_like(send_SE)
        dist.all_to_all_single(recv_SE, send_SE, group=self.group)
        send = send_SE.sum(1).tolist()
        recv = recv_SE.sum(1).tolist()

        x_RD = _AllToAll.apply(x_MD, send, recv, self.group)
        local_R = torch.repeat_interleave(
            torch.arange(E_l, device=x_MD.device).repeat(P), recv_SE.reshape(-1)
        )
        order_R = torch.argsort(local_R, stable=True)
        counts_local = recv_SE.sum(0)
        x_sorted = x_RD[order_R]
        y_sorted = self.ffn(x_sorted, counts_local, local_R[order_R] if self.has_bias else None)
        if y_sorted.shape[0] == 0 and torch.is_grad_enabled():
            y_sorted = y_sorted + self._zero_link(x_sorted)
        y_RD = torch.empty_like(y_sorted).index_copy(0, order_R, y_sorted)
        return _AllToAll.apply(y_RD, recv, send, self.group)

    def _zero_link(self, x_RD: Tensor) -> Tensor:
        """0, with a gradient path to the input and every local weight. A rank that receives no
        rows must still run the backward all-to-all its peers wait for, and give its experts
        (zero) gradients as the other ranks do, so every rank's backward has the same
        collectives in the same order."""
        weights = [w for w in (getattr(self, n) for n in EXPERT_WEIGHTS) if w is not None]
        return (x_RD.sum() + sum(w.sum() for w in weights)) * 0.0

    def extra_repr(self) -> str:
        first = self.ep_rank * self.num_local_experts
        return (
            f"experts {first}..{first + self.num_local_experts - 1} of {self.num_experts}, "
            f"ep_size={self.ep_size}"
        )


def moe_layers(model: nn.Module, ep_size: int) -> list[MoE]:
    """The MoE sublayers of `model`; ConfigError (key parallel.ep) when there are none or their
    experts do not divide over `ep_size` ranks."""
    moes = [layer.mixer for layer in model.layers if isinstance(layer.mixer, MoE)]
    if not moes:
        raise ConfigError(
            f"parallel.ep is {ep_size} but the model has no MoE layer; set parallel.ep: 1",
            key="parallel.ep",
        )
    n_experts = moes[0].cfg.n_experts
    if n_experts % ep_size:
        raise ConfigError(
            f"model.moe.n_experts={n_experts} is not divisible by parallel.ep={ep_size}",
            key="parallel.ep",
        )
    return moes


def apply_expert_dispatch(
    model: nn.Module, group: dist.ProcessGroup, ep_size: int
) -> list[ExpertDispatch]:
    """Replace the routed experts of every MoE sublayer by this rank's `ExpertDispatch` over
    `group` (in place). Returns the new modules."""
    shards = []
    for moe in moe_layers(model, ep_size):
        moe.experts = ExpertDispatch(moe.experts, group, ep_size)
        shards.append(moe.experts)
    return shards
