"""`HybridCache`: the inference state of a whole `HybridLM` for a batch of sequences.

Legend: B batch, C conv channels, W = d_conv - 1, H Mamba heads, P head dim, N d_state,
T KV slots, K kv heads, E head dim.

Per Mamba-2 layer it holds the model's own `MambaState`: conv inputs (B,C,W) in the model dtype
and the SSM state (B,H,P,N) in fp32, a size that does not depend on the context. Per attention
layer it holds a pre-allocated `KVCache` (B,T,K,E) with T = max_len (or the sliding window).
MLP and MoE sublayers hold nothing. Which layer holds what is decided by the per-symbol rules of
`hybrid.infer.rules`.

Positions count from the first column of the (left-padded) batch: `start` (B,) is where each
row's prompt begins and `pos` (0-dim long tensor; `length` is its host copy) the position the
next token is written at.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hybrid.infer.rules import LayerRule, rule_for


class HybridCache:
    def __init__(
        self,
        layers: dict[int, Any],
        rules: dict[int, LayerRule],
        symbols: dict[int, str],
        start: Tensor,
        max_len: int,
    ) -> None:
        self.layers = layers
        self.rules = rules
        self.symbols = symbols
        self.start = start
        self.max_len = max_len
        self.pos = torch.zeros((), dtype=torch.long, device=start.device)
        self.length = 0

    @classmethod
    def allocate(
        cls,
        model: nn.Module,
        batch: int,
        max_len: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> HybridCache:
        """An empty cache of `model` for `batch` rows of up to `max_len` positions (prompt and
        new tokens); device and dtype default to those of the model's weights."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"batch and max_len must be positive, got {batch} and {max_len}")
        weight = model.embed.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        layers, rules, symbols = {}, {}, {}
        for layer in model.layers:
            rule = rule_for(layer.symbol)
            if rule.allocate is None:
                continue
            idx = layer.mixer.layer_idx
            layers[idx] = rule.allocate(layer.mixer, batch, max_len, device=device, dtype=dtype)
            rules[idx], symbols[idx] = rule, layer.symbol
        start = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(layers, rules, symbols, start, max_len)

    @property
    def batch(self) -> int:
        return int(self.start.shape[0])

    def layer_bytes(self) -> dict[int, int]:
        """Bytes held per cached layer (Mamba: conv + SSM state; attention: keys + values)."""
        return {i: self.rules[i].nbytes(entry) for i, entry in self.layers.items()}

    def nbytes(self, symbol: str | None = None) -> int:
        """Bytes of the whole batch, or of the layers with layout symbol `symbol` ("M", "*")."""
        sizes = self.layer_bytes()
        return sum(n for i, n in sizes.items() if symbol is None or self.symbols[i] == symbol)

    def bytes_per_sequence(self) -> int:
        return self.nbytes() // self.batch

    def load_prefill(self, states: dict[int, Any], length: int) -> None:
        """Take the per-layer states a prefill forward of `length` positions returned."""
        for idx, entry in self.layers.items():
            self.rules[idx].load_prefill(entry, states[idx])
        self.pos.fill_(length)
        self.length = length

    def advance(self) -> None:
        """One more position written (after a decode step)."""
        self.pos += 1
        self.length += 1

    def __repr__(self) -> str:
        kinds = "".join(self.symbols[i] for i in sorted(self.symbols))
        return (
            f"HybridCache(batch={self.batch}, max_len={self.max_len}, length={self.length}, "
            f"layers={kinds!r}, bytes={self.nbytes():,})"
        )


__all__ = ["HybridCache"]
