"""Causal softmax attention for packed documents.

Legend: B batch, Lq query length, Lk key length, H query heads, K kv heads, E head dim, T tokens.
Queries are the last Lq of the Lk key positions (Lq == Lk in training, Lq < Lk when decoding
with a KV cache). A query attends to keys at or before its position, in the same document
(`seq_idx`), and within `window` positions when a sliding window is set.

Implementations (chosen as for every op, see `hybrid.ops._registry`):

* "torch" (any device): `F.scaled_dot_product_attention`. Without documents or window it is the
  causal kernel; on CUDA the backends are tried cuDNN first (on an H100 cuDNN ran causal
  fwd+bwd at 474 TFLOP/s against 266 for FlashAttention-2, ../shared/device/README.md), then
  flash, memory-efficient, math. Packed documents or a window become a boolean mask.
* "varlen" (CUDA, torch with `torch.nn.attention.varlen`; chosen automatically there): packed
  documents run as variable-length flash attention over the documents (no (L, L) mask, no
  work across documents); everything else as "torch".

`cache` (a dict, e.g. the forward's `ForwardContext.scratch`) lets all attention layers of one
forward share the mask or the document offsets.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid.ops._registry import define_op

try:  # torch >= 2.10 on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None
# torch 2.11's varlen_attn has no `enable_gqa` (2.13's has): kv heads are then repeated
_VARLEN_GQA = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters


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


def one_document_per_row(seq_idx_BL: Tensor) -> bool:
    """True when no row of `seq_idx` changes document (a host sync)."""
    return bool((seq_idx_BL == seq_idx_BL[:, :1]).all())


def _sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """cuDNN first on CUDA; elsewhere SDPA's own choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    return sdpa_kernel(order, set_priority=True)


def _memo(cache: dict | None, key: str, make: Any) -> Any:
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def attention_sdpa(
    q_BLHE: Tensor,
    k_BLKE: Tensor,
    v_BLKE: Tensor,
    *,
    seq_idx: Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    cache: dict | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The "torch" implementation (see the module docstring)."""
    Lq, Lk = q_BLHE.shape[1], k_BLKE.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q_BLHE, k_BLKE, v_BLKE))
    gqa = q.shape[1] != k.shape[1]
    plain = mask is None and window is None and Lq == Lk and (
        seq_idx is None
        or _memo(cache, "attn_one_doc", lambda: one_document_per_row(seq_idx))
    )  # fmt: skip
    with _sdpa_backends(q.device):
        if plain:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            mask = (
                mask
                if mask is not None
                else _memo(
                    cache,
                    f"attn_mask:{Lq}:{Lk}:{window}",
                    lambda: attention_mask(
                        Lq, Lk, seq_idx_BL=seq_idx, window=window, device=q.device
                    ),
                )
            )
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
    return out.transpose(1, 2)


def document_offsets(seq_idx_BL: Tensor) -> tuple[Tensor, int]:
    """Cumulative token offsets (int32, D + 1) of the documents of the flattened (B * L) rows,
    and the longest document's length (a host sync). A document never spans two rows."""
    B, L = seq_idx_BL.shape
    starts = torch.ones_like(seq_idx_BL, dtype=torch.bool)
    starts[:, 1:] = seq_idx_BL[:, 1:] != seq_idx_BL[:, :-1]
    begin = torch.nonzero(starts.flatten()).flatten()
    total = torch.tensor([B * L], device=begin.device, dtype=begin.dtype)
    offsets = torch.cat([begin, total]).to(torch.int32)
    return offsets, int((offsets[1:] - offsets[:-1]).max())


def attention_varlen(
    q_BLHE: Tensor,
    k_BLKE: Tensor,
    v_BLKE: Tensor,
    *,
    seq_idx: Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    cache: dict | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The "varlen" implementation: packed documents through `varlen_attn`."""
    B, Lq, H, E = q_BLHE.shape
    if seq_idx is None or mask is not None or Lq != k_BLKE.shape[1]:
        return attention_sdpa(
            q_BLHE, k_BLKE, v_BLKE, seq_idx=seq_idx, window=window, scale=scale, cache=cache,
            mask=mask,
        )  # fmt: skip
    offsets, longest = _memo(cache, "attn_doc_offsets", lambda: document_offsets(seq_idx))
    q, k, v = (t.reshape(B * Lq, t.shape[2], E) for t in (q_BLHE, k_BLKE, v_BLKE))
    left = -1 if window is None else window - 1
    kw: dict[str, Any] = {}
    if k.shape[1] != H:
        if _VARLEN_GQA:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(
        q, k, v, offsets, offsets, longest, longest, scale=scale, window_size=(left, 0), **kw
    )
    return out.reshape(B, Lq, H, E)


def _varlen_supported(device: torch.device) -> bool:
    return device.type == "cuda" and varlen_attn is not None


ATTENTION = define_op("attention")
ATTENTION.register("torch", attention_sdpa)
ATTENTION.register(
    "varlen",
    attention_varlen,
    supports=_varlen_supported,
    priority=10,
    dtypes=(torch.bfloat16, torch.float16),  # flash attention kernels
)


def attention(
    q_BLHE: Tensor,
    k_BLKE: Tensor,
    v_BLKE: Tensor,
    *,
    seq_idx: Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    cache: dict | None = None,
    mask: Tensor | None = None,
    impl: str | None = None,
) -> Tensor:
    """Causal attention; q (B,Lq,H,E), k and v (B,Lk,K,E) with H % K == 0 -> (B,Lq,H,E).

    `seq_idx` (B,Lk) keeps documents of a packed row apart; `window` limits keys to the last
    `window` positions; `cache` memoises masks / document offsets across the layers of one
    forward (pass the same dict only for the same `seq_idx`); `mask` (B or 1, 1, Lq, Lk), True =
    may attend, replaces the causal/document/window rule (decoding over cache slots); `impl`
    names an implementation."""
    fn = ATTENTION.select(q_BLHE.device, impl, q_BLHE.dtype).fn
    return fn(q_BLHE, k_BLKE, v_BLKE, seq_idx=seq_idx, window=window, scale=scale, cache=cache,
              mask=mask)  # fmt: skip
