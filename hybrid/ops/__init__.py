"""One function per operation; each picks its implementation for the device.

    from hybrid import ops
    y = ops.ssd(x, dt, A, B, C, chunk_size=256, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)

Public ops: `ssd`, `ssd_step`, `causal_conv1d`, `causal_conv1d_step`, `rmsnorm`,
`gated_rmsnorm`, `linear_cross_entropy` (LM head + token cross-entropy in chunks). Each takes a
keyword `impl: str | None`; without it the implementation comes from the environment variable
`HYBRID_OPS_IMPL` if that names one for the op, else the highest-priority implementation that
supports the input's device (the choice is logged once per op and device type). A requested
implementation that is unknown or unavailable on the device raises `ValueError`.

`HYBRID_OPS_IMPL`: comma-separated `op=impl` pairs (`ssd=torch,causal_conv1d=torch`), or a bare
implementation name for every op (`torch`).

Implementations registered now: "torch" (the PyTorch references in `hybrid_kernels`; plain
PyTorch for `linear_cross_entropy`) for every op. Adding one is a single call, e.g.
`register("ssd", "triton", ssd_triton, supports=lambda d: d.type == "cuda", priority=10)`.
"""

from hybrid.ops._registry import ENV_VAR, Impl, Op, get_op, op_names, register
from hybrid.ops.conv1d import causal_conv1d, causal_conv1d_step
from hybrid.ops.cross_entropy import linear_cross_entropy
from hybrid.ops.norm import gated_rmsnorm, rmsnorm
from hybrid.ops.ssd import ssd, ssd_step

__all__ = [
    "ENV_VAR",
    "Impl",
    "Op",
    "causal_conv1d",
    "causal_conv1d_step",
    "gated_rmsnorm",
    "get_op",
    "linear_cross_entropy",
    "op_names",
    "register",
    "rmsnorm",
    "ssd",
    "ssd_step",
]
