"""`causal_conv1d` and `causal_conv1d_step`: Mamba-2's depthwise causal conv1d, channels-last.

Implementations of `causal_conv1d`: "triton" (`hybrid_kernels.conv1d_triton`: CUDA, or CPU
tensors under TRITON_INTERPRET=1; chosen automatically on CUDA) and "torch"
(`hybrid_kernels.conv1d_ref`, any device). The decoding step stays in PyTorch. See
`hybrid.ops._registry` for how one is chosen.
"""

from __future__ import annotations

from hybrid_kernels._triton_utils import auto_triton, supports_triton, triton_available
from hybrid_kernels.conv1d_ref import causal_conv1d_ref, causal_conv1d_step_ref
from torch import Tensor

from hybrid.ops._registry import define_op

CAUSAL_CONV1D = define_op("causal_conv1d")
CAUSAL_CONV1D.register("torch", causal_conv1d_ref)
if triton_available():  # without triton only the PyTorch reference is registered
    from hybrid_kernels.conv1d_triton import causal_conv1d_triton

    CAUSAL_CONV1D.register(
        "triton", causal_conv1d_triton, supports=supports_triton, auto=auto_triton, priority=10
    )
CAUSAL_CONV1D_STEP = define_op("causal_conv1d_step")
CAUSAL_CONV1D_STEP.register("torch", causal_conv1d_step_ref)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    seq_idx: Tensor | None = None,
    activation: str | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    impl: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """x (B, L, D), weight (D, K) with K <= 4, bias (D), seq_idx (B, L), initial_states
    (B, D, K-1) -> y (B, L, D) [, final states (B, D, K-1)]. `activation`: None or "silu"."""
    fn = CAUSAL_CONV1D.select(x.device, impl).fn
    return fn(
        x,
        weight,
        bias,
        seq_idx=seq_idx,
        activation=activation,
        initial_states=initial_states,
        return_final_states=return_final_states,
    )


def causal_conv1d_step(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """x (B, D), conv_state (B, D, K-1) -> (y (B, D), new conv_state); the state is not
    modified."""
    fn = CAUSAL_CONV1D_STEP.select(x.device, impl).fn
    return fn(x, conv_state, weight, bias, activation)


__all__ = ["CAUSAL_CONV1D", "CAUSAL_CONV1D_STEP", "causal_conv1d", "causal_conv1d_step"]
