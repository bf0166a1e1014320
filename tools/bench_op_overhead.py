"""Host time per call of the two ways to make a differentiable op, side by side (CPU is enough).

    python tools/bench_op_overhead.py [--calls 2000]

A stand-in op with the signature of `hybrid_kernels::ssd_fwd` (14 arguments, 3 outputs) whose
body only clones its input is called with inputs that require grad, (a) as a
`torch.library.custom_op` with `register_autograd` (what the kernels used before session 7) and
(b) as a `torch.library.Library` op under an `autograd.Function` (`_triton_utils.library_op` +
`differentiable`, what they use now). The difference is pure host overhead: at small shapes a
layer's kernels take less GPU time than this (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

from hybrid_kernels._triton_utils import differentiable, library_op  # noqa: E402


def _body(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    dt_bias: Tensor | None, init: Tensor | None, seq_idx: Tensor | None, softplus: bool,
    dt_min: float, dt_max: float, keep: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return x.clone(), x.new_empty(0), x.clone()


def _fake(x, *rest):
    return torch.empty_like(x), x.new_empty(0), torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy, _dypre, dfinal):
    return (dy + dfinal,) + (None,) * 13


def _custom_op():
    op = torch.library.custom_op("hybrid_bench::overhead_custom_op", mutates_args=())(_body)
    op.register_fake(_fake)
    op.register_autograd(_backward, setup_context=_setup)
    return op


def _library_op():
    return differentiable(library_op("bench_overhead_library_op", _body, _fake), _setup, _backward)


def host_us(fn, args: tuple, calls: int) -> float:
    for _ in range(50):
        fn(*args)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per variant")
    args = parser.parse_args(argv)
    t = [torch.randn(4, requires_grad=True) for _ in range(5)]
    op_args = (*t, t[0], None, t[1], None, None, True, 0.0, float("inf"), True)
    rows = [
        ("custom_op + register_autograd", host_us(_custom_op(), op_args, args.calls)),
        ("Library op + autograd.Function", host_us(_library_op(), op_args, args.calls)),
        ("the body alone (two clones)", host_us(_body, op_args, args.calls)),
    ]
    print(f"| op wrapper ({torch.__version__}) | host us per call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
