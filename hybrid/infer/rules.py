"""How each layout symbol takes part in inference: its cache entry and its one-token decode step.

Legend: B batch, D d_model, T KV slots.

A `LayerRule` per layout symbol (registered with `register_rule`, like the model's sublayer
registry): `allocate` makes the layer's cache entry (None for stateless sublayers), `load_prefill`
takes the state a prefill forward (`HybridLM.hidden_states` with `ctx.states`) returned for the
layer, `nbytes` measures the entry, and `decode` runs one token through the mixer:

* `M` (Mamba-2): the mixer's own recurrent `step` (O(1) per token), state updated in place.
* `*` (attention): the mixer's projections and RoPE, the new key/value written into the
  pre-allocated `KVCache`, attention over all T slots under the mask of valid slots (shapes do
  not change from step to step); with GQA the query heads sharing a kv head attend as a group,
  so the cache is never repeated per query head.
* `-` (MLP), `E` (MoE): token-wise, the mixer's forward on (B,1,D).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hybrid.infer.kv import KVCache
from hybrid.model.mamba2 import Mamba2Mixer, MambaState
from hybrid.ops.attention import attention


@dataclass
class DecodeStep:
    """What every layer of one decode step shares: pos (0-dim long), the position written now;
    start (B,) each row's prompt start; positions (B,1) RoPE positions (pos - start); scratch:
    memo for masks shared by attention layers of equal capacity and window."""

    pos: Tensor
    start: Tensor
    positions: Tensor
    scratch: dict[Any, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerRule:
    decode: Callable[[nn.Module, Tensor, Any, DecodeStep], Tensor]
    allocate: Callable[..., Any] | None = None
    load_prefill: Callable[[Any, Any], None] | None = None
    nbytes: Callable[[Any], int] = lambda entry: 0


_RULES: dict[str, LayerRule] = {}


def register_rule(symbol: str, rule: LayerRule) -> None:
    if symbol in _RULES and _RULES[symbol] is not rule:
        raise ValueError(f"an inference rule for layout symbol {symbol!r} is already registered")
    _RULES[symbol] = rule


def rule_for(symbol: str) -> LayerRule:
    if symbol not in _RULES:
        known = ", ".join(sorted(_RULES))
        raise KeyError(f"no inference rule for layout symbol {symbol!r} (known: {known})")
    return _RULES[symbol]


# -- Mamba-2 ----------------------------------------------------------------------------------
def _mamba_allocate(
    mixer: Mamba2Mixer, batch: int, max_len: int, *, device: torch.device, dtype: torch.dtype
) -> MambaState:
    return mixer.empty_state(batch, device=device, dtype=dtype)  # max_len plays no part


def _mamba_load(entry: MambaState, state: MambaState) -> None:
    entry.conv.copy_(state.conv)
    entry.ssm.copy_(state.ssm)


def _mamba_decode(mixer, x_B1D: Tensor, entry: MambaState, step: DecodeStep) -> Tensor:
    y_BD, new = mixer.step(x_B1D[:, 0], entry)
    entry.conv.copy_(new.conv)
    entry.ssm.copy_(new.ssm)
    return y_BD[:, None]


def _state_bytes(entry: MambaState) -> int:
    return sum(t.numel() * t.element_size() for t in (entry.conv, entry.ssm))


# -- attention --------------------------------------------------------------------------------
def _kv_load(entry: KVCache, state: Any) -> None:
    entry.fill(state.k, state.v)


def _attention_decode(mixer, x_B1D: Tensor, entry: KVCache, step: DecodeStep) -> Tensor:
    B = x_B1D.shape[0]
    q_B1HE, k_B1KE, v_B1KE = mixer._qkv(x_B1D, step.positions)  # the mixer's projections + RoPE
    entry.write(step.pos, k_B1KE, v_B1KE)
    key = ("mask", entry.capacity, entry.window)
    if key not in step.scratch:
        step.scratch[key] = entry.mask(step.pos, step.start)
    # GQA without repeating the cache: the G query heads of each kv head become G queries of
    # that head (query head h uses kv head h // G), all under the same mask over the slots
    K, E = entry.k.shape[2], entry.k.shape[3]
    q_BGKE = q_B1HE.reshape(B, K, -1, E).transpose(1, 2)
    out_BGKE = attention(q_BGKE, entry.k, entry.v, mask=step.scratch[key])
    return mixer.o_proj(out_BGKE.transpose(1, 2).reshape(B, 1, -1))


# -- token-wise sublayers -------------------------------------------------------------------
def _tokenwise_decode(mixer, x_B1D: Tensor, entry: None, step: DecodeStep) -> Tensor:
    return mixer(x_B1D, None)[0]


MAMBA_RULE = LayerRule(
    decode=_mamba_decode, allocate=_mamba_allocate, load_prefill=_mamba_load, nbytes=_state_bytes
)
ATTENTION_RULE = LayerRule(
    decode=_attention_decode,
    allocate=KVCache.allocate,
    load_prefill=_kv_load,
    nbytes=lambda entry: entry.nbytes,
)
TOKENWISE_RULE = LayerRule(decode=_tokenwise_decode)

register_rule("M", MAMBA_RULE)
register_rule("*", ATTENTION_RULE)
register_rule("-", TOKENWISE_RULE)
register_rule("E", TOKENWISE_RULE)


def decode_layers(
    model: nn.Module, h_B1D: Tensor, layers: dict[int, Any], step: DecodeStep
) -> Tensor:
    """Run the residual sublayers of `model` on one token: (B,1,D) -> (B,1,D) (before norm_f)."""
    for layer in model.layers:
        rule = rule_for(layer.symbol)
        entry = layers.get(layer.mixer.layer_idx)
        h_B1D = h_B1D + rule.decode(layer.mixer, layer.norm(h_B1D), entry, step)
    return h_B1D


__all__ = [
    "ATTENTION_RULE",
    "MAMBA_RULE",
    "TOKENWISE_RULE",
    "DecodeStep",
    "LayerRule",
    "decode_layers",
    "register_rule",
    "rule_for",
]
