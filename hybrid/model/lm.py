"""The hybrid language model: embedding -> pre-norm residual sublayers -> norm -> LM head.

Legend: B batch, L length, D d_model, V padded vocabulary.
Each sublayer is `x = x + f(norm(x))` with f chosen by the layout symbol through the registry.
Module names are the canonical checkpoint names: `embed`, `layers.{i}.norm`, `layers.{i}.mixer`,
`norm_f`, `lm_head`.

The training loss goes through the plain attribute `loss_fn(h (N,D), lm_head.weight (V,D),
labels (N,)) -> summed token CE` (default `hybrid.ops.linear_cross_entropy`, which never holds
the full logits), so a parallel backend can swap in its own (e.g. vocab-parallel) version. It is
called inside the head's module call (`LMHead`), so engines that gather a module's parameters
around its forward and backward (ZeRO-3) see the weight in use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hybrid.model.context import ForwardContext
from hybrid.model.norm import RMSNorm
from hybrid.model.registry import build_sublayer
from hybrid.ops.cross_entropy import linear_cross_entropy
from hybrid.recipe.layout import LayerSpec
from hybrid.recipe.model_config import ModelConfig

IGNORE_INDEX = -100


class Sublayer(nn.Module):
    """One pre-norm residual sublayer."""

    def __init__(self, spec: LayerSpec, cfg: ModelConfig):
        super().__init__()
        self.symbol = spec.symbol
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_sublayer(spec.symbol, cfg)
        self.mixer.layer_idx = spec.index

    def forward(self, h_BLD: Tensor, ctx: ForwardContext) -> tuple[Tensor, Any]:
        y, aux = self.mixer(self.norm(h_BLD), ctx)
        return h_BLD + y, aux


class LMHead(nn.Linear):
    """The output projection (V, D). `head(h)` gives logits; `head(h_ND, labels=labels_N,
    loss_fn=fn)` gives `fn(h_ND, weight, labels_N)`, the summed token cross-entropy."""

    def forward(
        self,
        h: Tensor,
        labels: Tensor | None = None,
        loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        if labels is None:
            return super().forward(h)
        assert loss_fn is not None, "labels need a loss_fn"
        return loss_fn(h, self.weight, labels)


@dataclass
class LMOutput:
    """logits (B,L,V) unless only the loss was asked for; loss = mean token CE (no aux);
    aux_loss = sum of MoE aux losses (coefficients applied); moe = per-MoE-layer stats."""

    logits: Tensor | None = None
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    moe: dict[int, Any] = field(default_factory=dict)


def cached_length(states: dict[int, Any] | None) -> int:
    """Tokens already seen by an inference state (0 if none or no attention layer)."""
    for state in (states or {}).values():
        if hasattr(state, "k"):
            return int(state.k.shape[1])
    return 0


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        V, D = cfg.padded_vocab_size, cfg.d_model
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList(Sublayer(spec, cfg) for spec in cfg.layers())
        self.norm_f = RMSNorm(D, cfg.norm_eps)
        self.lm_head = LMHead(D, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # (h_ND, weight_VD, labels_N) -> summed CE over labelled tokens; replaceable from outside
        self.loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor] = linear_cross_entropy

    @torch.no_grad()
    def init_weights(self) -> None:
        std, out_std = self.cfg.init.std, self.cfg.output_init_std()
        nn.init.normal_(self.embed.weight, std=std)
        for layer in self.layers:
            layer.norm.init_weights()
            layer.mixer.init_weights(std, out_std)
        self.norm_f.init_weights()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def hidden_states(self, input_ids_BL: Tensor, ctx: ForwardContext) -> tuple[Tensor, list]:
        h = self.embed(input_ids_BL)
        aux = []
        for layer in self.layers:
            h, a = layer(h, ctx)
            if a is not None:
                aux.append((layer.mixer.layer_idx, a))
        return self.norm_f(h), aux

    def forward(
        self,
        input_ids: Tensor,
        *,
        labels: Tensor | None = None,
        seq_idx: Tensor | None = None,
        position_ids: Tensor | None = None,
        states: dict[int, Any] | None = None,
        position_offset: int | None = None,
        return_logits: bool = True,
    ) -> LMOutput:
        """input_ids (B,L); labels (B,L) next-token targets (IGNORE_INDEX = no loss);
        seq_idx (B,L) document index in packed rows; states: per-layer inference state (filled
        in place, see `empty_states`); positions continue after the cached tokens unless
        `position_offset` says otherwise."""
        if position_offset is None:
            position_offset = cached_length(states)
        ctx = ForwardContext(
            seq_idx=seq_idx,
            position_ids=position_ids,
            states=states,
            position_offset=position_offset,
        )

        h, aux = self.hidden_states(input_ids, ctx)
        out = LMOutput()
        if return_logits or labels is None:
            out.logits = self.lm_head(h)
        if labels is not None:
            total = self.lm_head(h.flatten(0, 1), labels=labels.flatten(), loss_fn=self.loss_fn)
            # mean over label tokens; a batch with none gives 0 (not 0/0 = NaN)
            out.loss = total / (labels != IGNORE_INDEX).sum().clamp(min=1)
        if aux:
            out.aux_loss = torch.stack([a.aux_loss for _, a in aux]).sum()
            out.moe = dict(aux)
        return out

    def empty_states(
        self, batch: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict[int, Any]:
        """Fresh inference state per mixer layer (Mamba conv+SSM, attention KV)."""
        return {
            layer.mixer.layer_idx: layer.mixer.empty_state(batch, device=device, dtype=dtype)
            for layer in self.layers
            if hasattr(layer.mixer, "empty_state")
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init: bool = True,
) -> HybridLM:
    """Build and initialise a model (on `device="meta"` it is only shaped, not initialised)."""
    import hybrid.model  # noqa: F401  (registers the sublayer kinds)

    with torch.device(device):
        model = HybridLM(cfg)
    model.to(dtype=dtype)
    if init and str(device) != "meta":
        model.init_weights()
    return model
