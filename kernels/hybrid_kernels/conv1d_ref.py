"""PyTorch references for the depthwise causal conv1d of Mamba-2 (as causal-conv1d's
`causal_conv1d_fn` / `causal_conv1d_update`), channels-last.

    y_t = act(bias + sum_k w[:, k] * x_{t-K+1+k})

Inputs before position 0 are zero, or come from `initial_states` (the K-1 inputs before position
0). With `seq_idx` (packed documents) an output only sees inputs of its own document;
`initial_states` belong to the document at position 0.

Shape legend (suffixes of tensor names):
  B batch, L sequence length, D channels, K kernel width (<= 4), W = K - 1 (state width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_WIDTH = 4
ACTIVATIONS = (None, "silu", "swish")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"causal_conv1d: activation must be one of {ACTIVATIONS}, got {activation!r}"
        )


def _activate(y: Tensor, activation: str | None) -> Tensor:
    return F.silu(y) if activation is not None else y


def _check_shapes(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    seq_idx: Tensor | None,
    initial_states: Tensor | None,
) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, seqlen, dim), got {tuple(x.shape)}")
    batch, seqlen, dim = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim or not 1 <= weight.shape[1] <= MAX_WIDTH:
        raise ValueError(
            f"causal_conv1d: weight must be ({dim}, K) with 1 <= K <= {MAX_WIDTH}, "
            f"got {tuple(weight.shape)}"
        )
    width = weight.shape[1]
    expected = {
        "bias": (bias, (dim,)),
        "seq_idx": (seq_idx, (batch, seqlen)),
        "initial_states": (initial_states, (batch, dim, width - 1)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"causal_conv1d: {name} must have shape {shape}, got {tuple(tensor.shape)}"
            )


def _conv_plain(xp_BDL: Tensor, w_DK: Tensor, bias_D: Tensor | None) -> Tensor:
    """Fast path: left-padded input (B, D, W + L) -> (B, L, D) via a grouped F.conv1d."""
    y_BDL = F.conv1d(xp_BDL, w_DK[:, None, :], bias_D, groups=w_DK.shape[0])
    return y_BDL.transpose(1, 2)


def _conv_masked(xp_BDL: Tensor, w_DK: Tensor, bias_D: Tensor | None, seq_idx_BL: Tensor) -> Tensor:
    """Document-aware path: unfold the left-padded input into windows and mask other documents.

    xp_BDL: (B, D, W + L) -> (B, L, D). The W padded positions count as document seq_idx[:, 0].
    """
    K = w_DK.shape[1]
    W = K - 1
    windows_BDLK = xp_BDL.unfold(-1, K, 1)
    seqp_BL = torch.cat([seq_idx_BL[:, :1].expand(-1, W), seq_idx_BL], dim=1)
    same_BLK = seqp_BL.unfold(-1, K, 1) == seq_idx_BL[..., None]
    windows_BDLK = windows_BDLK * same_BLK[:, None].to(windows_BDLK.dtype)
    y_BDL = torch.einsum("bdlk,dk->bdl", windows_BDLK, w_DK)
    if bias_D is not None:
        y_BDL = y_BDL + bias_D[:, None]
    return y_BDL.transpose(1, 2)


def _final_states(xp_BDL: Tensor, W: int, seq_idx_BL: Tensor | None) -> Tensor:
    """The last W inputs (B, D, W); with seq_idx, those not of the last document are zero."""
    final_BDW = xp_BDL[..., xp_BDL.shape[-1] - W :]
    if seq_idx_BL is None or W == 0:
        return final_BDW
    seqp_BL = torch.cat([seq_idx_BL[:, :1].expand(-1, W), seq_idx_BL], dim=1)
    same_BW = seqp_BL[:, seqp_BL.shape[1] - W :] == seq_idx_BL[:, -1:]
    return final_BDW * same_BW[:, None].to(final_BDW.dtype)


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    seq_idx: Tensor | None = None,
    activation: str | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal conv1d, channels-last; computes in fp32 (fp64 for fp64 inputs).

    Args:
        x: (B, L, D). weight: (D, K), K <= 4. bias: (D). seq_idx: (B, L) integer document ids.
        activation: None or "silu" ("swish" is an alias). initial_states: (B, D, K-1), the
        K-1 inputs before position 0 (oldest first).
    Returns:
        y (B, L, D) in x's dtype; with `return_final_states` also the last K-1 inputs
        (B, D, K-1) in x's dtype, zero-padded (or taken from initial_states) when L < K-1. With
        seq_idx, inputs of documents other than the last one are zeroed in the final states, so
        they continue the last document.
    """
    _check_shapes(x, weight, bias, seq_idx, initial_states)
    _check_activation(activation)
    ct = _compute_dtype(x.dtype)
    batch, _, dim = x.shape
    W = weight.shape[1] - 1
    x_BDL = x.transpose(1, 2)
    if initial_states is None:
        init_BDW = x_BDL.new_zeros(batch, dim, W)
    else:
        init_BDW = initial_states.to(x.dtype)
    xp_BDL = torch.cat([init_BDW, x_BDL], dim=-1)
    w_DK = weight.to(ct)
    bias_D = bias.to(ct) if bias is not None else None
    if seq_idx is None:
        y_BLD = _conv_plain(xp_BDL.to(ct), w_DK, bias_D)
    else:
        y_BLD = _conv_masked(xp_BDL.to(ct), w_DK, bias_D, seq_idx)
    y_BLD = _activate(y_BLD, activation).to(x.dtype)
    if return_final_states:
        return y_BLD, _final_states(xp_BDL, W, seq_idx)
    return y_BLD


def causal_conv1d_step_ref(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step; `conv_state` is not modified.

    Args:
        x: (B, D). conv_state: (B, D, K-1), the previous K-1 inputs, oldest first.
        weight: (D, K). bias: (D).
    Returns:
        y (B, D) in x's dtype, new conv_state (B, D, K-1) in conv_state's dtype.
    """
    batch, dim = x.shape
    W = weight.shape[1] - 1
    if tuple(conv_state.shape) != (batch, dim, W) or weight.shape[0] != dim:
        raise ValueError(
            f"causal_conv1d_step: shapes do not fit: x {tuple(x.shape)}, "
            f"conv_state {tuple(conv_state.shape)}, weight {tuple(weight.shape)}"
        )
    _check_activation(activation)
    ct = _compute_dtype(x.dtype)
    window_BDK = torch.cat([conv_state.to(ct), x.to(ct)[..., None]], dim=-1)
    y_BD = (window_BDK * weight.to(ct)).sum(-1)
    if bias is not None:
        y_BD = y_BD + bias.to(ct)
    y_BD = _activate(y_BD, activation).to(x.dtype)
    return y_BD, window_BDK[..., 1:].to(conv_state.dtype)


__all__ = ["causal_conv1d_ref", "causal_conv1d_step_ref"]
