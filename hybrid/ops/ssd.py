"""`ssd` and `ssd_step`: the Mamba-2 SSD scan and its one-token decoding step.

Implementations: "triton" (`hybrid_kernels.ssd_triton`: CUDA, or CPU tensors under
TRITON_INTERPRET=1; chosen automatically on CUDA) and "torch" (`hybrid_kernels.ssd_ref`, any
device). See `hybrid.ops._registry` for how one is chosen. The decoding step stays in PyTorch.
"""

from __future__ import annotations

import math

import torch
from hybrid_kernels._triton_utils import auto_triton, supports_triton, triton_available
from hybrid_kernels.ssd_ref import ssd_chunked_ref, ssd_step_ref
from torch import Tensor

from hybrid.ops._registry import define_op

SSD = define_op("ssd")
# Inductor (torch 2.11, CUDA) fails to generate code for the reference's chunked cumulative sums,
# so `torch.compile` leaves the reference eager; the Triton kernel is a custom op it traces.
SSD.register("torch", torch.compiler.disable(ssd_chunked_ref))
if triton_available():  # without triton only the PyTorch reference is registered
    from hybrid_kernels.ssd_triton import ssd_triton

    SSD.register(
        "triton",
        ssd_triton,
        supports=supports_triton,
        auto=auto_triton,
        priority=10,
        dtypes=(torch.float32, torch.bfloat16, torch.float16),  # fp64 (checks) runs the reference
    )
SSD_STEP = define_op("ssd_step")
SSD_STEP.register("torch", ssd_step_ref)


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_states: bool = False,
    impl: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan (semantics of mamba_ssm's `mamba_chunk_scan_combined`).

    Shapes: x (B, L, H, P), dt (B, L, H), A (H) negative, B and C (B, L, G, N), D (H) or (H, P),
    z (B, L, H, P), dt_bias (H), initial_states (B, H, P, N), seq_idx (B, L).
    Returns y (B, L, H, P) in x's dtype, and with `return_final_states` the final state
    (B, H, P, N) in fp32 (fp64 for fp64 inputs). `impl` names an implementation to use.
    """
    fn = SSD.select(x.device, impl, x.dtype).fn
    return fn(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        initial_states=initial_states,
        seq_idx=seq_idx,
        return_final_states=return_final_states,
    )


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step: state (B, H, P, N), x (B, H, P), dt (B, H), B and C (B, G, N) ->
    (y (B, H, P), new state). `state` is not modified."""
    fn = SSD_STEP.select(x.device, impl).fn
    return fn(
        state,
        x,
        dt,
        A,
        B,
        C,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
    )


__all__ = ["SSD", "SSD_STEP", "ssd", "ssd_step"]
