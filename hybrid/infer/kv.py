"""`KVCache`: the pre-allocated keys and values of one attention layer.

Legend: B batch, T slots (capacity), K kv heads, E head dim, L prefill length.

Keys and values (B,T,K,E) are allocated once for the whole generation: T = max_len, or the
sliding window when that is shorter (then the slots form a ring, slot = position mod T).
`slot_pos` (T,) holds the absolute position stored in each slot (-1: empty), from which the
attention mask of a decode step follows. Writing a token is an in-place `index_copy_` at a
position given as a 0-dim tensor, so every decode step sees the same shapes and addresses (what
CUDA graphs and `torch.compile` need) and nothing is concatenated per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybrid.model.attention import Attention


@dataclass
class KVCache:
    k: Tensor
    v: Tensor
    slot_pos: Tensor
    window: int | None = None

    @classmethod
    def allocate(
        cls, attn: Attention, batch: int, max_len: int, *, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        """Zeroed cache of `attn` for `batch` rows and `max_len` positions."""
        window = attn.cfg.sliding_window
        capacity = min(max_len, window) if window else max_len
        k = torch.zeros(batch, capacity, attn.n_kv, attn.head_dim, device=device, dtype=dtype)
        slots = torch.full((capacity,), -1, device=device, dtype=torch.long)
        return cls(k=k, v=torch.zeros_like(k), slot_pos=slots, window=window)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values (the `slot_pos` bookkeeping, 8 bytes a slot, excluded)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def fill(self, k_BLKE: Tensor, v_BLKE: Tensor) -> None:
        """Store the keys/values of positions 0..L-1 (a prefill); a ring keeps the last T."""
        L = k_BLKE.shape[1]
        first = max(0, L - self.capacity)
        pos = torch.arange(first, L, device=self.k.device)
        slots = pos % self.capacity
        self.k.index_copy_(1, slots, k_BLKE[:, first:].to(self.k.dtype))
        self.v.index_copy_(1, slots, v_BLKE[:, first:].to(self.v.dtype))
        self.slot_pos.index_copy_(0, slots, pos)

    def write(self, pos: Tensor, k_B1KE: Tensor, v_B1KE: Tensor) -> None:
        """Store one token's key/value at position `pos` (0-dim long tensor), in place."""
        slot = (pos % self.capacity).reshape(1)
        self.k.index_copy_(1, slot, k_B1KE.to(self.k.dtype))
        self.v.index_copy_(1, slot, v_B1KE.to(self.v.dtype))
        self.slot_pos.index_copy_(0, slot, pos.reshape(1))

    def mask(self, pos: Tensor, start_B: Tensor) -> Tensor:
        """(B,1,1,T) bool: the slots a query at `pos` may attend to: filled, not after `pos`,
        not before its row's prompt start, and inside the sliding window."""
        sp = self.slot_pos[None, :]
        allowed = (sp >= 0) & (sp <= pos) & (sp >= start_B[:, None])
        if self.window is not None:
            allowed = allowed & (pos - sp < self.window)
        return allowed[:, None, None, :]


__all__ = ["KVCache"]
