"""RMSNorm references against direct formulas, and fp32 / bf16 against fp64."""

from __future__ import annotations

import pytest
import torch
from hybrid_kernels.rmsnorm_ref import gated_rmsnorm_ref, rmsnorm_ref

F64 = torch.float64


def silu(v: torch.Tensor) -> torch.Tensor:
    return v / (1 + torch.exp(-v))


def direct_gated(x, z, w, eps, group_size, norm_before_gate):
    """Per-group loop over the last dim, straight from the definition (fp64)."""
    x, z, w = x.to(F64), None if z is None else z.to(F64), w.to(F64)
    if z is not None and not norm_before_gate:
        x = x * silu(z)
    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], group_size):
        part = x[..., start : start + group_size]
        rms = torch.sqrt((part**2).sum(-1, keepdim=True) / group_size + eps)
        out[..., start : start + group_size] = part / rms
    out = out * w
    if z is not None and norm_before_gate:
        out = out * silu(z)
    return out


def make(shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=F64) * 3
    z = torch.randn(*shape, generator=g, dtype=F64)
    w = 1 + 0.5 * torch.randn(shape[-1], generator=g, dtype=F64)
    return x.to(dtype), z.to(dtype), w.to(dtype)


def test_rmsnorm_matches_formula():
    x, _, w = make((2, 3, 16))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rmsnorm_ref(x, w, 1e-5), expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rmsnorm_ref(x, None, 1e-5), expected / w, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [4, 8, 24])
@pytest.mark.parametrize("gated", [True, False])
def test_gated_matches_direct(gated, group_size, norm_before_gate):
    x, z, w = make((2, 5, 24), seed=group_size)
    z = z if gated else None
    out = gated_rmsnorm_ref(x, z, w, 1e-6, group_size=group_size, norm_before_gate=norm_before_gate)
    expected = direct_gated(x, z, w, 1e-6, group_size, norm_before_gate)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


def test_gated_whole_dim_equals_rmsnorm_when_ungated():
    x, _, w = make((3, 12), seed=1)
    torch.testing.assert_close(gated_rmsnorm_ref(x, None, w, 1e-5), rmsnorm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_low_precision_against_fp64(dtype, tol):
    x, z, w = make((4, 7, 32), seed=2)
    ref = gated_rmsnorm_ref(x, z, w, 1e-5, group_size=8)
    out = gated_rmsnorm_ref(x.to(dtype), z.to(dtype), w.to(dtype), 1e-5, group_size=8)
    assert out.dtype == dtype
    assert ((out.to(F64) - ref).abs().max() / ref.abs().max()).item() < tol
    out = rmsnorm_ref(x.to(dtype), w.to(dtype), 1e-5)
    assert out.dtype == dtype
    ref = rmsnorm_ref(x, w, 1e-5)
    assert ((out.to(F64) - ref).abs().max() / ref.abs().max()).item() < tol


def test_group_size_must_divide():
    x, z, w = make((2, 12))
    with pytest.raises(ValueError, match="group_size"):
        gated_rmsnorm_ref(x, z, w, 1e-5, group_size=5)
    with pytest.raises(ValueError, match="must match"):
        gated_rmsnorm_ref(x, z[:, :6], w, 1e-5, group_size=6)
