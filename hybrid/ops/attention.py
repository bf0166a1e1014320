"""Causal softmax attention for packed documents, through PyTorch SDPA.

Legend: B batch, Lq query length, Lk key length, H query heads, K kv heads, E head dim.
Queries are the last Lq of the Lk key positions (Lq == Lk in training, Lq < Lk when decoding
with a KV cache). A query attends to keys at or before its position, in the same document
(`seq_idx`), and within `window` positions when a sliding window is set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_mask(
    Lq: int,
    Lk: int,
    *,
    seq_idx_BL: Tensor | None = None,
    window: int | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Boolean mask (B or 1, 1, Lq, Lk): True where a query may attend to a key."""
    device = seq_idx_BL.device if seq_idx_BL is not None else device
    q_pos = torch.arange(Lk - Lq, Lk, device=device)[:, None]
    k_pos = torch.arange(Lk, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    allowed = allowed[None, None]
    if seq_idx_BL is not None:
        q_doc = seq_idx_BL[:, Lk - Lq :, None]
        k_doc = seq_idx_BL[:, None, :]
        allowed = allowed & (q_doc == k_doc)[:, None]
    return allowed


def attention(
    q_BLHE: Tensor,
    k_BLKE: Tensor,
    v_BLKE: Tensor,
    *,
    seq_idx: Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Causal attention; q (B,Lq,H,E), k and v (B,Lk,K,E) with H % K == 0 -> (B,Lq,H,E).

    `seq_idx` (B,Lk) keeps documents of a packed row apart; `mask` may pass a precomputed
    `attention_mask(...)` (shared by all layers of one forward)."""
    Lq, Lk = q_BLHE.shape[1], k_BLKE.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q_BLHE, k_BLKE, v_BLKE))
    gqa = q.shape[1] != k.shape[1]
    if mask is None and seq_idx is None and window is None and Lq == Lk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        if mask is None:
            mask = attention_mask(Lq, Lk, seq_idx_BL=seq_idx, window=window, device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)
