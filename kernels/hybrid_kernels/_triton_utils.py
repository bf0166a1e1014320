"""Small helpers shared by the Triton kernel files: interpreter detection, config choice, device
guards. Importable without triton (the kernels themselves need it).

Triton decides at decoration time (`@triton.jit`, i.e. when a kernel module is imported) whether
kernels are compiled for the GPU or run by its CPU interpreter (`TRITON_INTERPRET=1`). A kernel
module therefore records `interpreting()` at import, and CPU tensors can only go to a module
imported with the flag set (`check_launchable` says so clearly otherwise). Under the interpreter,
`triton.autotune` with several configs fails ("0 active drivers") and `torch.cuda.device` fails
on CPU tensors: use `pick_configs` and `device_guard`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

ENV_INTERPRET = "TRITON_INTERPRET"
T = TypeVar("T")
log = logging.getLogger("hybrid_kernels")


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


def pick_configs(configs: Sequence[T], interpret_config: T, interpreted: bool) -> list[T]:
    """The autotuning configs to use: all of them compiled, one under the interpreter."""
    return [interpret_config] if interpreted else list(configs)


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


ENV_TUNE = "HYBRID_KERNELS_TUNE"


def tuning_enabled() -> bool:
    """False when HYBRID_KERNELS_TUNE=0: launch tuners take their heuristic launch untimed
    (reproducible launches, no start-up timing; the GPU test suite runs so)."""
    return os.environ.get(ENV_TUNE, "1") != "0"


class LaunchTuner:
    """Picks, once per key, the fastest of a few launch configurations of a launcher that may
    run several kernels (what `triton.autotune` does for one kernel), by timing each with
    `triton.testing.do_bench` (median). The first configuration is the untimed choice where
    timing is impossible, pointless or turned off: one candidate, a non-CUDA device, a CUDA
    graph being captured, or HYBRID_KERNELS_TUNE=0. Each choice is logged once; choices live as
    long as the process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._best: dict[Hashable, dict] = {}

    def choose(self, key: Hashable, configs: Sequence[dict] | Callable[[], Sequence[dict]],
               run: Callable[[dict], object], device: torch.device) -> dict:  # fmt: skip
        """The fastest of `configs` (or of what a callable returns: built only on a key's first
        use) for `key`, timing `run(config)` on first use. A candidate other than the first
        that runs out of GPU memory or does not fit this GPU (shared memory, registers) is
        skipped and logged; the first must run."""
        if key in self._best:
            return self._best[key]
        if callable(configs):
            configs = configs()
        if len(configs) == 1 or device.type != "cuda" or not tuning_enabled():
            return configs[0]
        with torch.cuda.device(device):  # time (and check for capture) where the kernels run
            if torch.cuda.is_current_stream_capturing():
                return configs[0]
            log.info("%s %s: compiling and timing %d launches (once per shape and process)",
                     self.name, key, len(configs))  # fmt: skip
            times = [self._time(run, c, required=i == 0) for i, c in enumerate(configs)]
        best = min(range(len(configs)), key=times.__getitem__)
        self._best[key] = configs[best]
        log.info("%s %s: chose %s (%.3f ms; the first candidate %.3f ms)", self.name, key,
                 configs[best] or "the default", times[best], times[0])  # fmt: skip
        log.debug(
            "%s %s: every candidate: %s",
            self.name,
            key,
            "; ".join(f"{c or 'default'} {t:.3f} ms" for c, t in zip(configs, times)),
        )
        return configs[best]

    def _time(self, run: Callable[[dict], object], config: dict, required: bool) -> float:
        from triton.runtime import errors
        from triton.testing import do_bench

        unfit = (torch.OutOfMemoryError, errors.OutOfResources, errors.PTXASError)
        try:
            return do_bench(lambda: run(config), warmup=2, rep=10, return_mode="median")
        except unfit as err:
            if required:
                raise
            log.info("%s: skipped %s (%s)", self.name, config, type(err).__name__)
        torch.cuda.empty_cache()  # (after the handler: its traceback held the tensors)
        return float("inf")


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
    "ENV_TUNE",
    "LaunchTuner",
    "auto_triton",
    "check_launchable",
    "device_guard",
    "differentiable",
    "interpreting",
    "library_op",
    "num_sms",
    "pick_configs",
    "supports_triton",
    "triton_available",
    "tuning_enabled",
]
