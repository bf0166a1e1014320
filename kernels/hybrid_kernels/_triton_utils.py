"""Small helpers shared by the Triton kernel files: interpreter detection, device guards,
op declaration. Importable without triton (the kernels themselves need it).

Triton decides at decoration time (`@triton.jit`, i.e. when a kernel module is imported) whether
kernels are compiled for the GPU or run by its CPU interpreter (`TRITON_INTERPRET=1`). A kernel
module therefore records `interpreting()` at import, and CPU tensors can only go to a module
imported with the flag set (`check_launchable` says so clearly otherwise). Under the interpreter,
`triton.autotune` with several configs fails ("0 active drivers") and `torch.cuda.device` fails
on CPU tensors: use `device_guard`. Launch tuning (`LaunchTuner`) lives in `_tuning`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable

import torch

ENV_INTERPRET = "TRITON_INTERPRET"


def interpreting() -> bool:
    """True when Triton runs kernels on its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get(ENV_INTERPRET, "0") == "1"


def triton_available() -> bool:
    """True when the `triton` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def supports_triton(device: torch.device) -> bool:
    """`supports` predicate of a Triton implementation: CUDA, or CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def auto_triton(device: torch.device) -> bool:
    """`auto` predicate of a Triton implementation: chosen automatically on CUDA only (the
    interpreter is for tests)."""
    return device.type == "cuda"


def check_launchable(t: torch.Tensor, interpreted: bool, what: str) -> None:
    """Raise a clear error when `t` cannot run the kernels of a module imported with
    `interpreted` (CPU tensors need a module imported under TRITON_INTERPRET=1)."""
    if t.device.type == "cuda" or (interpreted and t.device.type == "cpu"):
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            f"{what}: CPU tensors need Triton's interpreter, but the kernels were imported "
            f"without {ENV_INTERPRET}=1; set it before the first import, or use impl='torch'"
        )
    raise RuntimeError(
        f"{what}: Triton kernels run on CUDA (or CPU when interpreting), got {t.device}"
    )


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """`torch.cuda.device(t.device)` for CUDA tensors, a no-op otherwise."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): sizes grids for full occupancy."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# -- ops: declared through torch.library, differentiated by autograd.Function ----------------
# `torch.library.custom_op` + `register_autograd` re-reads the schema for every argument on
# every call (0.27 ms of host time per call on the CPU machine against 0.07 ms for this pairing:
# tools/bench_op_overhead.py); the ops stay opaque to torch.compile through their fakes.

_LIB = torch.library.Library("hybrid_kernels", "FRAGMENT")


def library_op(name: str, impl: Callable, fake: Callable) -> Callable:
    """Declare `torch.ops.hybrid_kernels.<name>` with the schema of `impl`'s type hints, `impl`
    for every device and `fake` for tracing; return the op."""
    _LIB.define(name + torch.library.infer_schema(impl, mutates_args=()))
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"hybrid_kernels::{name}", fake, lib=_LIB)
    return getattr(torch.ops.hybrid_kernels, name).default


def differentiable(op: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """`op(*args)` under an autograd.Function: `setup_context(ctx, args, output)` after the
    forward and `backward(ctx, *grads)`, the two functions `register_autograd` would take."""

    class _OpFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = op(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _OpFunction.__name__ = _OpFunction.__qualname__ = f"{op.__name__}_function"
    return _OpFunction.apply


__all__ = [
    "ENV_INTERPRET",
    "auto_triton",
    "check_launchable",
    "device_guard",
    "differentiable",
    "interpreting",
    "library_op",
    "num_sms",
    "supports_triton",
    "triton_available",
]
