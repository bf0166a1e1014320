"""Per-forward context handed to every sublayer: document boundaries, positions, inference state.

One `ForwardContext` is made per forward call (never shared between calls), so nothing global is
mutated. Shapes: B batch, L sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def positions_from_seq_idx(seq_idx_BL: Tensor) -> Tensor:
    """Position of each token inside its document: restarts at 0 where seq_idx changes."""
    B, L = seq_idx_BL.shape
    arange = torch.arange(L, device=seq_idx_BL.device).expand(B, L)
    starts = torch.ones_like(seq_idx_BL, dtype=torch.bool)
    starts[:, 1:] = seq_idx_BL[:, 1:] != seq_idx_BL[:, :-1]
    first = torch.where(starts, arange, torch.zeros_like(arange)).cummax(dim=1).values
    return arange - first


@dataclass
class ForwardContext:
    """seq_idx (B,L): document index of each token in packed rows (None: one document per row);
    position_ids (B,L): RoPE positions (default: restart at each document start);
    states: per-layer inference state (dict layer index -> state), filled in by mixers when given;
    scratch: per-call memo (e.g. an attention mask shared by all attention layers)."""

    seq_idx: Tensor | None = None
    position_ids: Tensor | None = None
    states: dict[int, Any] | None = None
    position_offset: int = 0
    scratch: dict[str, Any] = field(default_factory=dict)

    def positions(self, B: int, L: int, device: torch.device) -> Tensor:
        if self.position_ids is None:
            if self.seq_idx is not None:
                self.position_ids = positions_from_seq_idx(self.seq_idx)
            else:
                base = torch.arange(L, device=device) + self.position_offset
                self.position_ids = base.expand(B, L)
        return self.position_ids
