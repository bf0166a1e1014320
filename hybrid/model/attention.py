"""Causal self-attention sublayer: GQA/MQA, optional RoPE (partial rotary), QK-norm, bias,
sliding window, document-aware for packed rows, and a KV cache for decoding.

Legend: B batch, L length, D d_model, H query heads, K kv heads, E head dim, R rotary dims.
RoPE rotates the first R dims of each head, first half against second half (Llama / HF
`rotate_half` convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hybrid.model.context import ForwardContext
from hybrid.model.norm import RMSNorm
from hybrid.model.registry import register_sublayer
from hybrid.ops.attention import attention
from hybrid.recipe.blocks import AttentionConfig


@dataclass
class KVState:
    """Inference state of one attention layer: keys and values so far, (B,T,K,E) each."""

    k: Tensor
    v: Tensor


def rope_cos_sin(
    positions_BL: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B,L,1,R) for the given positions (fp32, or fp64 if asked)."""
    dev = positions_BL.device
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=dev, dtype=dtype) / rotary_dim)
    freqs = positions_BL.to(dtype)[..., None] * inv_freq  # (B,L,R/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rope(x_BLHE: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    R = cos.shape[-1]
    rot, rest = x_BLHE[..., :R].to(cos.dtype), x_BLHE[..., R:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated.to(x_BLHE.dtype), rest], dim=-1)


@register_sublayer("*")
class Attention(nn.Module):
    def __init__(self, cfg: AttentionConfig, d_model: int):
        super().__init__()
        cfg.validate_for(d_model)
        self.cfg = cfg
        self.layer_idx = -1  # set by the LM
        self.n_heads, self.n_kv = cfg.n_heads, cfg.kv_heads()
        self.head_dim = cfg.resolved_head_dim(d_model)
        self.rotary_dim = cfg.rotary_dim(d_model) if cfg.position == "rope" else 0
        E = self.head_dim
        self.q_proj = nn.Linear(d_model, self.n_heads * E, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, self.n_kv * E, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, self.n_kv * E, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_heads * E, d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(E) if cfg.qk_norm else None
        self.k_norm = RMSNorm(E) if cfg.qk_norm else None

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()

    def _qkv(self, x_BLD: Tensor, positions_BL: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x_BLD).view(B, L, self.n_kv, self.head_dim)
        v = self.v_proj(x_BLD).view(B, L, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary_dim:
            dtype = torch.promote_types(q.dtype, torch.float32)
            cos, sin = rope_cos_sin(positions_BL, self.rotary_dim, self.cfg.rope_theta, dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x_BLD: Tensor, ctx: ForwardContext) -> tuple[Tensor, None]:
        B, L, _ = x_BLD.shape
        q, k, v = self._qkv(x_BLD, ctx.positions(B, L, x_BLD.device))
        past = ctx.states.get(self.layer_idx) if ctx.states is not None else None
        if past is not None:
            k, v = torch.cat([past.k, k], dim=1), torch.cat([past.v, v], dim=1)
            if ctx.seq_idx is not None:
                raise ValueError("seq_idx is not supported together with a KV cache")
            out = attention(q, k, v, window=self.cfg.sliding_window)
        else:
            window = self.cfg.sliding_window
            out = attention(q, k, v, seq_idx=ctx.seq_idx, window=window, cache=ctx.scratch)
        if ctx.states is not None:
            ctx.states[self.layer_idx] = KVState(k=k, v=v)
        return self.o_proj(out.reshape(B, L, -1)), None

    def empty_state(
        self, batch: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVState:
        device = device or self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        empty = torch.zeros(batch, 0, self.n_kv, self.head_dim, device=device, dtype=dtype)
        return KVState(k=empty, v=empty.clone())


__all__ = ["Attention", "KVState", "apply_rope", "rope_cos_sin"]
