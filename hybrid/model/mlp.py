"""Dense feed-forward sublayer (`-` in the layout pattern) and the activations it shares with
the MoE experts.

SwiGLU:              y = down(silu(gate(x)) * up(x))
squared_relu, gelu:  y = down(act(up(x)))          (gelu is the exact, erf form)

Shape legend:
    B  batch
    L  sequence length
    D  model width
    F  hidden width
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.model.registry import register_sublayer
from hybrid.recipe.blocks import MLPConfig


def _squared_relu(x: Tensor) -> Tensor:
    return F.relu(x).square()


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


# name -> (elementwise function, gated). A gated activation multiplies act(gate) by up.
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], bool]] = {
    "swiglu": (F.silu, True),
    "squared_relu": (_squared_relu, False),
    "gelu": (_gelu, False),
}


def is_gated(activation: str) -> bool:
    """Whether `activation` takes a separate gate projection (gate_proj)."""
    return ACTIVATIONS[activation][1]


def apply_activation(activation: str, up_XF: Tensor, gate_XF: Tensor | None = None) -> Tensor:
    """The hidden activation: act(gate) * up when gated, act(up) otherwise.

    Args:
        activation: a key of `ACTIVATIONS`.
        up_XF: (..., F) the up projection.
        gate_XF: (..., F) the gate projection; required exactly when the activation is gated.
    """
    fn, gated = ACTIVATIONS[activation]
    if gated:
        assert gate_XF is not None, f"{activation} needs the gate projection"
        return fn(gate_XF) * up_XF
    assert gate_XF is None, f"{activation} takes no gate projection"
    return fn(up_XF)


@register_sublayer("-")
class MLP(nn.Module):
    """Dense MLP. Parameters: `gate_proj` (SwiGLU only), `up_proj`, `down_proj` (nn.Linear)."""

    def __init__(self, cfg: MLPConfig, d_model: int) -> None:
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"unknown MLP activation {cfg.activation!r}")
        self.activation = cfg.activation
        self.layer_idx = -1  # set by the LM
        hidden = cfg.resolved_hidden(d_model)
        self.gate_proj: nn.Linear | None = None
        if is_gated(cfg.activation):
            self.gate_proj = nn.Linear(d_model, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=cfg.bias)

    def init_weights(self, std: float, out_std: float) -> None:
        """normal(0, std) for gate/up, normal(0, out_std) for down, zero biases."""
        for proj, s in ((self.gate_proj, std), (self.up_proj, std), (self.down_proj, out_std)):
            if proj is None:
                continue
            nn.init.normal_(proj.weight, mean=0.0, std=s)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, x_BLD: Tensor, ctx: Any = None) -> tuple[Tensor, None]:
        """(B, L, D) -> ((B, L, D), None). Works on any (..., D) input; `ctx` is unused."""
        gate = self.gate_proj(x_BLD) if self.gate_proj is not None else None
        h_BLF = apply_activation(self.activation, self.up_proj(x_BLD), gate)
        return self.down_proj(h_BLF), None
