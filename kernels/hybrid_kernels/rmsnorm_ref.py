"""PyTorch references for RMSNorm and Mamba-2's gated, grouped RMSNorm (mamba_ssm's
`RMSNormGated` / `rmsnorm_fn`).

    gated_rmsnorm(x, z) = norm(x * silu(z)) * w             (norm_before_gate=False)
                        = norm(x) * w * silu(z)              (norm_before_gate=True)
    norm(v) = v / sqrt(mean(v^2 over each group of `group_size` channels) + eps)

Computed in fp32 (fp64 for fp64 inputs); the result has x's dtype.

Shape legend (suffixes of tensor names):
  X any leading dims, D channels (last dim), G groups, S group size (D = G * S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalize(x_XD: Tensor, eps: float, group_size: int) -> Tensor:
    """x (..., D) -> x / rms over each group of `group_size` channels, same shape."""
    D = x_XD.shape[-1]
    if group_size <= 0 or D % group_size != 0:
        raise ValueError(f"rmsnorm: group_size ({group_size}) must divide the last dim ({D})")
    x_XGS = x_XD.unflatten(-1, (D // group_size, group_size))
    rstd_XG1 = torch.rsqrt(x_XGS.square().mean(dim=-1, keepdim=True) + eps)
    return (x_XGS * rstd_XG1).flatten(-2)


def rmsnorm_ref(x: Tensor, weight: Tensor | None, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dim. x: (..., D), weight: (D) or None -> (..., D) in x's dtype."""
    ct = _compute_dtype(x.dtype)
    y_XD = _normalize(x.to(ct), eps, x.shape[-1])
    if weight is not None:
        y_XD = y_XD * weight.to(ct)
    return y_XD.to(x.dtype)


def gated_rmsnorm_ref(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    eps: float = 1e-5,
    *,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Gated RMSNorm normalising each group of `group_size` channels separately.

    Args:
        x: (..., D). z: (..., D) gate or None. weight: (D) or None.
        group_size: channels per group (D // n_groups); None means the whole last dim.
        norm_before_gate: gate after normalising instead of before.
    Returns:
        (..., D) in x's dtype.
    """
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gated_rmsnorm: z {tuple(z.shape)} must match x {tuple(x.shape)}")
    ct = _compute_dtype(x.dtype)
    x_XD = x.to(ct)
    gate_XD = F.silu(z.to(ct)) if z is not None else None
    if gate_XD is not None and not norm_before_gate:
        x_XD = x_XD * gate_XD
    y_XD = _normalize(x_XD, eps, group_size if group_size is not None else x.shape[-1])
    if weight is not None:
        y_XD = y_XD * weight.to(ct)
    if gate_XD is not None and norm_before_gate:
        y_XD = y_XD * gate_XD
    return y_XD.to(x.dtype)


__all__ = ["gated_rmsnorm_ref", "rmsnorm_ref"]
