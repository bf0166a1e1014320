"""`rmsnorm` and `gated_rmsnorm` (Mamba-2's grouped, gated RMSNorm).

Implementations of both: "triton" (`hybrid_kernels.rmsnorm_triton`: CUDA, or CPU tensors under
TRITON_INTERPRET=1; chosen automatically on CUDA) and "torch" (`hybrid_kernels.rmsnorm_ref`, any
device). See `hybrid.ops._registry` for how one is chosen.
"""

from __future__ import annotations

from hybrid_kernels._triton_utils import auto_triton, supports_triton, triton_available
from hybrid_kernels.rmsnorm_ref import gated_rmsnorm_ref, rmsnorm_ref
from torch import Tensor

from hybrid.ops._registry import define_op

RMSNORM = define_op("rmsnorm")
RMSNORM.register("torch", rmsnorm_ref)
GATED_RMSNORM = define_op("gated_rmsnorm")
GATED_RMSNORM.register("torch", gated_rmsnorm_ref)
if triton_available():  # without triton only the PyTorch references are registered
    from hybrid_kernels.rmsnorm_triton import gated_rmsnorm_triton, rmsnorm_triton

    RMSNORM.register(
        "triton", rmsnorm_triton, supports=supports_triton, auto=auto_triton, priority=10
    )
    GATED_RMSNORM.register(
        "triton", gated_rmsnorm_triton, supports=supports_triton, auto=auto_triton, priority=10
    )


def rmsnorm(
    x: Tensor, weight: Tensor | None, eps: float = 1e-5, *, impl: str | None = None
) -> Tensor:
    """RMSNorm over the last dim: x (..., D), weight (D) -> (..., D) in x's dtype."""
    return RMSNORM.select(x.device, impl).fn(x, weight, eps)


def gated_rmsnorm(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    eps: float = 1e-5,
    *,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    impl: str | None = None,
) -> Tensor:
    """Gated RMSNorm per group of `group_size` channels: x, z (..., D), weight (D) -> (..., D)."""
    fn = GATED_RMSNORM.select(x.device, impl).fn
    return fn(x, z, weight, eps, group_size=group_size, norm_before_gate=norm_before_gate)


__all__ = ["GATED_RMSNORM", "RMSNORM", "gated_rmsnorm", "rmsnorm"]
