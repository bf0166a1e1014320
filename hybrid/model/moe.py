"""Dropless mixture-of-experts sublayer (`E` in the layout pattern).

    logits = x @ router.weight^T                        (float32, or float64 for float64 input)
    weights, experts = ROUTERS[cfg.router](logits)      (top-k per token, times the scaling factor)
    y = sum_k weights_k * expert_k(x)  [+ shared_experts(x)]

Experts run as grouped matmuls over tokens sorted by expert (`hybrid.ops.moe`). Routers:

* `softmax_topk`: p = softmax(logits); top-k of p (+ expert_bias); weights = the picked p,
  divided by their sum when `renormalize`.
* `topk_softmax`: top-k of logits (+ expert_bias); weights = softmax over the k picked logits.
* `sigmoid`: s = sigmoid(logits); top-k of s + expert_bias (the bias only selects); weights =
  the picked s, divided by (their sum + 1e-20) when `renormalize` (DeepSeek-V3 / Nemotron-H).

Auxiliary losses (`MoEStats`): the Switch / Megatron load-balance loss
E * sum_e f_e * P_e, with f_e the fraction of the T*K assignments routed to expert e (before
capacity drops) and P_e the mean normalised router probability (softmax; for `sigmoid` the
scores over their per-token sum), and the z-loss mean_t logsumexp(logits_t)^2.

Shape legend:
    B  batch        L  sequence length    T  tokens (B*L)
    D  model width  F  expert hidden      E  routed experts
    K  top_k        M  kept assignments (T*K when dropless)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from hybrid.model.mlp import MLP, apply_activation, is_gated
from hybrid.model.registry import register_sublayer
from hybrid.ops.moe import grouped_mm, permute, unpermute
from hybrid.recipe.blocks import MLPConfig, MoEConfig

_SIGMOID_EPS = 1e-20


@dataclass
class MoEStats:
    """What one MoE forward reports besides its output.

    aux_loss: scalar with grad, aux_loss_coef * load_balance_loss + z_loss_coef * z_loss; the
        caller adds it to the training loss.
    load_balance_loss, z_loss: detached scalars (unscaled).
    expert_load: (E,) detached fraction of the T*K assignments routed to each expert (before
        capacity drops); sums to 1. Feed it (summed over micro-batches and data-parallel ranks)
        to `MoE.update_expert_bias`.
    router_entropy: detached scalar, mean entropy of the normalised router probabilities.
    dropped_fraction: detached scalar, the fraction of assignments dropped by the capacity
        (0 when dropless).
    """

    aux_loss: Tensor
    load_balance_loss: Tensor
    z_loss: Tensor
    expert_load: Tensor
    router_entropy: Tensor
    dropped_fraction: Tensor


class Routing(NamedTuple):
    """The router's decision for T tokens.

    weights: (T, K) routing weights (routed_scaling_factor applied).
    expert_idx: (T, K) int64 selected experts.
    probs: (T, E) normalised router probabilities (for the aux loss and entropy).
    logits: (T, E) router logits (for the z-loss).
    """

    weights: Tensor
    expert_idx: Tensor
    probs: Tensor
    logits: Tensor


# A router: (logits_TE, top_k, renormalize, selection bias_E or None) -> (weights, idx, probs).
RouterFn = Callable[[Tensor, int, bool, Tensor | None], tuple[Tensor, Tensor, Tensor]]
ROUTERS: dict[str, RouterFn] = {}


def register_router(name: str) -> Callable[[RouterFn], RouterFn]:
    def wrap(fn: RouterFn) -> RouterFn:
        ROUTERS[name] = fn
        return fn

    return wrap


def _pick(select_TE: Tensor, top_k: int, bias_E: Tensor | None) -> Tensor:
    if bias_E is not None:
        select_TE = select_TE + bias_E.to(select_TE.dtype)
    return torch.topk(select_TE, top_k, dim=-1).indices


@register_router("softmax_topk")
def softmax_topk(
    logits_TE: Tensor, top_k: int, renormalize: bool, bias_E: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    probs_TE = torch.softmax(logits_TE, dim=-1)
    idx_TK = _pick(probs_TE, top_k, bias_E)
    weights_TK = probs_TE.gather(-1, idx_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK, idx_TK, probs_TE


@register_router("topk_softmax")
def topk_softmax(
    logits_TE: Tensor, top_k: int, renormalize: bool, bias_E: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    idx_TK = _pick(logits_TE, top_k, bias_E)
    weights_TK = torch.softmax(logits_TE.gather(-1, idx_TK), dim=-1)  # sums to 1 already
    return weights_TK, idx_TK, torch.softmax(logits_TE, dim=-1)


@register_router("sigmoid")
def sigmoid_router(
    logits_TE: Tensor, top_k: int, renormalize: bool, bias_E: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    scores_TE = torch.sigmoid(logits_TE)
    idx_TK = _pick(scores_TE, top_k, bias_E)
    weights_TK = scores_TE.gather(-1, idx_TK)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + _SIGMOID_EPS)
    return weights_TK, idx_TK, scores_TE / scores_TE.sum(-1, keepdim=True)


class Router(nn.Module):
    """Linear router `weight` (E, D) plus, for aux-loss-free balancing, a persistent float32
    buffer `expert_bias` (E,) that only affects which experts are selected."""

    def __init__(self, cfg: MoEConfig, d_model: int) -> None:
        super().__init__()
        if cfg.router not in ROUTERS:
            raise ValueError(f"unknown MoE router {cfg.router!r}; known: {sorted(ROUTERS)}")
        self.kind = cfg.router
        self.top_k = cfg.top_k
        self.renormalize = cfg.renormalize
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, d_model))
        self.expert_bias: Tensor | None
        if cfg.uses_correction_bias():
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Router:
        # Keep the correction bias in float32 through model.to(bfloat16): its updates are tiny.
        super()._apply(fn, recurse)
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x_TD: Tensor) -> Routing:
        """(T, D) -> Routing; computed in float32 (float64 stays float64)."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        logits_TE = x_TD.to(dtype) @ self.weight.to(dtype).t()
        weights_TK, idx_TK, probs_TE = ROUTERS[self.kind](
            logits_TE, self.top_k, self.renormalize, self.expert_bias
        )
        if self.scaling != 1.0:
            weights_TK = weights_TK * self.scaling
        return Routing(weights_TK, idx_TK, probs_TE, logits_TE)


class GroupedExperts(nn.Module):
    """E expert MLPs as stacked weights: `gate_proj` (E, D, F) for SwiGLU only, `up_proj`
    (E, D, F), `down_proj` (E, F, D), and `*_bias` ((E, F) / (E, D)) when `bias`."""

    def __init__(self, cfg: MoEConfig, d_model: int) -> None:
        super().__init__()
        n, hidden = cfg.n_experts, cfg.expert_hidden(d_model)
        self.activation = cfg.activation
        self.has_bias = cfg.bias
        gated = is_gated(cfg.activation)
        self.gate_proj = nn.Parameter(torch.empty(n, d_model, hidden)) if gated else None
        self.up_proj = nn.Parameter(torch.empty(n, d_model, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, d_model))
        self.gate_proj_bias = self.up_proj_bias = self.down_proj_bias = None
        if cfg.bias:
            self.gate_proj_bias = nn.Parameter(torch.empty(n, hidden)) if gated else None
            self.up_proj_bias = nn.Parameter(torch.empty(n, hidden))
            self.down_proj_bias = nn.Parameter(torch.empty(n, d_model))

    def init_weights(self, std: float, out_std: float) -> None:
        for w, s in ((self.gate_proj, std), (self.up_proj, std), (self.down_proj, out_std)):
            if w is not None:
                nn.init.normal_(w, mean=0.0, std=s)
        for b in (self.gate_proj_bias, self.up_proj_bias, self.down_proj_bias):
            if b is not None:
                nn.init.zeros_(b)

    def _proj(
        self, x_MX: Tensor, w: Tensor, b: Tensor | None, counts_E: Tensor, e_M: Tensor | None
    ) -> Tensor:
        y_MY = grouped_mm(x_MX, w, counts_E)
        return y_MY if b is None else y_MY + b[e_M]

    def forward(self, x_MD: Tensor, counts_E: Tensor, expert_M: Tensor | None = None) -> Tensor:
        """Rows sorted by expert (M, D) -> (M, D). `expert_M` (M,): expert of each row, needed
        only with biases."""
        return self.ffn(x_MD, counts_E, expert_M)

    def ffn(self, x_MD: Tensor, counts_E: Tensor, expert_M: Tensor | None) -> Tensor:
        """The expert MLPs on rows grouped by expert (what a parallel wrapper of these experts
        calls on the rows it holds)."""
        assert not self.has_bias or expert_M is not None, "biased experts need expert_M"
        up_MF = self._proj(x_MD, self.up_proj, self.up_proj_bias, counts_E, expert_M)
        gate_MF = None
        if self.gate_proj is not None:
            gate_MF = self._proj(x_MD, self.gate_proj, self.gate_proj_bias, counts_E, expert_M)
        h_MF = apply_activation(self.activation, up_MF, gate_MF)
        return self._proj(h_MF, self.down_proj, self.down_proj_bias, counts_E, expert_M)


def load_balance_loss(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """E * sum_e f_e * P_e: f_e = counts_e / sum(counts) (no grad), P_e = mean_t probs_TE."""
    f_E = counts_E.to(probs_TE.dtype) / counts_E.sum().clamp_min(1)
    return probs_TE.shape[-1] * (f_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of -sum_e p log p."""
    tiny = torch.finfo(probs_TE.dtype).tiny
    return -(probs_TE * probs_TE.clamp_min(tiny).log()).sum(-1).mean()


@register_sublayer("E")
class MoE(nn.Module):
    """Routed experts (`router`, `experts`) plus optional always-on `shared_experts` (an MLP of
    width cfg.shared_hidden(d_model), added without a gate)."""

    def __init__(self, cfg: MoEConfig, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = -1  # set by the LM
        self.router = Router(cfg, d_model)
        self.experts = GroupedExperts(cfg, d_model)
        self.shared_experts: MLP | None = None
        if cfg.n_shared_experts > 0:
            shared = MLPConfig(
                activation=cfg.activation, hidden_size=cfg.shared_hidden(d_model), bias=cfg.bias
            )
            self.shared_experts = MLP(shared, d_model)

    def init_weights(self, std: float, out_std: float) -> None:
        """normal(0, std): router, expert gate/up; normal(0, out_std): expert down; zeros:
        biases and the correction bias."""
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        if self.router.expert_bias is not None:
            with torch.no_grad():
                self.router.expert_bias.zero_()
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)

    def capacity(self, n_tokens: int) -> int | None:
        """ceil(capacity_factor * T * K / E) assignments per expert; None when dropless."""
        cf = self.cfg.capacity_factor
        if cf is None:
            return None
        return math.ceil(cf * n_tokens * self.cfg.top_k / self.cfg.n_experts)

    def forward(self, x_BLD: Tensor, ctx: Any = None) -> tuple[Tensor, MoEStats]:
        """(B, L, D) -> ((B, L, D), MoEStats). `ctx` is unused."""
        shape = x_BLD.shape
        x_TD = x_BLD.reshape(-1, shape[-1])
        n_tokens = x_TD.shape[0]
        route = self.router(x_TD)
        x_MD, order_M, counts_E = permute(
            x_TD, route.expert_idx, self.cfg.n_experts, capacity=self.capacity(n_tokens)
        )
        expert_M = route.expert_idx.reshape(-1)[order_M] if self.experts.has_bias else None
        y_MD = self.experts(x_MD, counts_E, expert_M)
        y_TD = unpermute(y_MD, order_M, route.weights, n_tokens)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)[0]
        return y_TD.view(shape), self._stats(route, kept=order_M.numel())

    def _stats(self, route: Routing, kept: int) -> MoEStats:
        n_assign = route.expert_idx.numel()
        routed_E = torch.bincount(route.expert_idx.reshape(-1), minlength=self.cfg.n_experts)
        lb = load_balance_loss(route.probs, routed_E)
        z = z_loss(route.logits)
        aux = self.cfg.aux_loss_coef * lb + self.cfg.z_loss_coef * z
        dtype = route.probs.dtype
        return MoEStats(
            aux_loss=aux,
            load_balance_loss=lb.detach(),
            z_loss=z.detach(),
            expert_load=routed_E.to(dtype) / max(n_assign, 1),
            router_entropy=router_entropy(route.probs.detach()),
            dropped_fraction=torch.tensor(
                1.0 - kept / max(n_assign, 1), dtype=dtype, device=routed_E.device
            ),
        )

    @torch.no_grad()
    def update_expert_bias(self, load: Tensor, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): expert_bias += rate * sign(mean(load) - load).

        Under-loaded experts become more likely to be selected, over-loaded ones less; the
        weights are unaffected. `load` (E,) is any per-expert assignment measure (counts or
        `MoEStats.expert_load`), accumulated over the optimizer step and all-reduced across
        data-parallel ranks by the caller so every replica applies the same update. Call it
        once per optimizer step, outside autograd.
        """
        bias = self.router.expert_bias
        if bias is None:
            raise RuntimeError(
                "update_expert_bias needs the score-correction bias "
                "(moe.router: sigmoid or moe.score_correction_bias: true)"
            )
        load_E = load.detach().to(device=bias.device, dtype=torch.float32)
        assert load_E.shape == bias.shape, (load_E.shape, bias.shape)
        bias.add_(rate * torch.sign(load_E.mean() - load_E))
