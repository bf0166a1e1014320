"""RMSNorm and the gated, grouped RMSNorm of Mamba-2 (computed through hybrid.ops)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hybrid import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return ops.rmsnorm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """norm(x * silu(z)) over `group_size`-channel groups (mamba_ssm RMSNormGated)."""

    def __init__(
        self, dim: int, *, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False
    ):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return ops.gated_rmsnorm(
            x,
            z,
            self.weight,
            self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )
