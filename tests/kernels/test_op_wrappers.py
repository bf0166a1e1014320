"""`_triton_utils.library_op` + `differentiable`: the op wrapper of the Triton kernels."""

from __future__ import annotations

import torch
from hybrid_kernels._triton_utils import differentiable, library_op
from torch import Tensor


def _scaled(x: Tensor, w: Tensor | None, s: float) -> tuple[Tensor, Tensor]:
    y = x * s if w is None else x * w * s
    return y, y.sum().reshape(1)


def _scaled_fake(x, w, s):
    return torch.empty_like(x), x.new_empty(1)


def _setup(ctx, inputs, output) -> None:
    x, w, s = inputs
    ctx.save_for_backward(x, w)
    ctx.s = s


def _backward(ctx, dy, dsum):
    x, w = ctx.saved_tensors
    g = (dy + dsum) * ctx.s
    return (g if w is None else g * w), (None if w is None else (g * x)), None


_op = library_op("test_scaled", _scaled, _scaled_fake)
_fn = differentiable(_op, _setup, _backward)


def test_gradients_and_schema() -> None:
    """The op's schema comes from the type hints; gradients through the Function equal
    autograd's through the same arithmetic (optional tensor present and absent)."""
    assert str(_op._schema) == (
        "hybrid_kernels::test_scaled(Tensor x, Tensor? w, float s) -> (Tensor, Tensor)"
    )
    for with_w in (True, False):
        x = torch.randn(5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_w else None
        y, total = _fn(x, w, 1.5)
        (y.square().sum() + total.sum()).backward()
        got = (x.grad.clone(), w.grad.clone() if with_w else None)
        x.grad = None
        if with_w:
            w.grad = None
        y_ref = x * w * 1.5 if with_w else x * 1.5
        (y_ref.square().sum() + y_ref.sum()).backward()
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(got[0], x.grad, rtol=1e-15, atol=0)
        if with_w:
            torch.testing.assert_close(got[1], w.grad, rtol=1e-15, atol=0)


def test_traces_with_torch_compile() -> None:
    """torch.compile(fullgraph) traces the Function and keeps the op opaque."""
    x = torch.randn(6, requires_grad=True)
    compiled = torch.compile(lambda t: _fn(t, None, 2.0)[0].sum(), backend="aot_eager",
                             fullgraph=True)  # fmt: skip
    compiled(x).backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
