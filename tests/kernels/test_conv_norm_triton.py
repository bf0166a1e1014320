"""Triton causal conv1d and gated RMSNorm against their PyTorch references.

Error rule (as for the SSD kernels): against the reference on fp64 copies of the inputs, the
kernel's relative error (max |err| / max |ref|) must satisfy err_kernel <= 2 * err_torch + atol,
err_torch being the reference's error with inputs of the kernel's dtype; for outputs, final
states and every gradient. bf16 runs on a GPU only (Triton's CPU interpreter mishandles bf16;
see test_ssd_triton.py), fp16 and fp32 run everywhere. On a GPU, `gpu` tests add real shapes and
check that two backward passes give bitwise-equal gradients.
"""

from __future__ import annotations

import pytest
import torch
from hybrid_kernels.conv1d_ref import causal_conv1d_ref
from hybrid_kernels.rmsnorm_ref import gated_rmsnorm_ref

conv_mod = pytest.importorskip("hybrid_kernels.conv1d_triton", reason="triton is not installed")
norm_mod = pytest.importorskip("hybrid_kernels.rmsnorm_triton", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def leaves(tensors: dict, dtype=None) -> dict:
    return {
        k: (v.detach().to(dtype) if dtype is not None else v.detach()).requires_grad_(True)
        for k, v in tensors.items()
    }


def outputs_and_grads(fn, tensors: dict, cotangents: list, **kwargs) -> dict:
    out = fn(**tensors, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outs, cotangents))
    loss.backward()
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    result.update({f"d{k}": v.grad for k, v in tensors.items()})
    return result


def check(kernel, ref, tensors: dict, cotangents: list, dtype, **kwargs) -> None:
    low = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    got = outputs_and_grads(kernel, leaves(low), cotangents, **kwargs)
    torch_ = outputs_and_grads(ref, leaves(low), cotangents, **kwargs)
    exact = outputs_and_grads(ref, leaves(tensors, torch.float64), cotangents, **kwargs)
    for name, want in exact.items():
        e_kernel, e_torch = rel_err(got[name], want), rel_err(torch_[name], want)
        assert got[name].dtype == torch_[name].dtype, name
        assert e_kernel <= 2 * e_torch + ATOL[dtype], (name, e_kernel, e_torch)


def conv_inputs(batch, L, D, K, *, bias, docs, init, device=DEVICE):
    g = torch.Generator().manual_seed(7)
    t = {
        "x": torch.randn(batch, L, D, generator=g),
        "weight": torch.randn(D, K, generator=g) / K,
    }
    if bias:
        t["bias"] = torch.randn(D, generator=g)
    if init:
        t["initial_states"] = torch.randn(batch, D, K - 1, generator=g)
    t = {k: v.to(device) for k, v in t.items()}
    kwargs = {}
    if docs:
        seq = torch.zeros(batch, L, dtype=torch.long)
        seq[0, L // 3 :] = 1
        seq[-1, L - 2 :] = 5
        kwargs["seq_idx"] = seq.to(device)
    return t, kwargs


@pytest.mark.parametrize(
    ("L", "D", "K", "bias", "docs", "init", "act", "dtype"),
    [
        (37, 24, 4, True, True, True, "silu", torch.float32),
        (64, 16, 2, False, False, False, None, torch.float32),
        (50, 40, 3, True, True, False, "silu", torch.float16),
        (1, 8, 4, True, False, True, "silu", torch.float32),
    ],
)
def test_causal_conv1d_triton_matches_reference(L, D, K, bias, docs, init, act, dtype) -> None:
    tensors, kwargs = conv_inputs(2, L, D, K, bias=bias, docs=docs, init=init)
    g = torch.Generator().manual_seed(8)
    cot = [
        torch.randn(2, L, D, generator=g).to(DEVICE),
        torch.randn(2, D, K - 1, generator=g).to(DEVICE),
    ]
    check(
        conv_mod.causal_conv1d_triton, causal_conv1d_ref, tensors, cot, dtype,
        activation=act, return_final_states=True, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "group", "gate", "before", "weight", "dtype"),
    [
        ((3, 7, 32), 8, True, False, True, torch.float32),
        ((5, 48), None, False, False, True, torch.float32),
        ((2, 9, 64), 16, True, True, False, torch.float32),
        ((4, 40), 20, True, False, True, torch.float16),
    ],
)
def test_gated_rmsnorm_triton_matches_reference(shape, group, gate, before, weight, dtype) -> None:
    g = torch.Generator().manual_seed(9)
    D = shape[-1]
    tensors = {"x": torch.randn(*shape, generator=g) * 3}
    tensors["z"] = torch.randn(*shape, generator=g) if gate else None
    tensors["weight"] = (1 + 0.1 * torch.randn(D, generator=g)) if weight else None
    present = {k: v.to(DEVICE) for k, v in tensors.items() if v is not None}
    absent = {k: None for k, v in tensors.items() if v is None}
    cot = [torch.randn(*shape, generator=g).to(DEVICE)]

    def kernel(**t):
        return norm_mod.gated_rmsnorm_triton(**t, **absent, eps=1e-5, group_size=group,
                                             norm_before_gate=before)  # fmt: skip

    def ref(**t):
        return gated_rmsnorm_ref(**t, **absent, eps=1e-5, group_size=group,
                                 norm_before_gate=before)  # fmt: skip

    check(kernel, ref, present, cot, dtype)


def test_dispatch_chooses_torch_on_cpu_and_triton_on_request() -> None:
    from hybrid import ops

    assert ops.get_op("causal_conv1d").select("cpu").name == "torch"
    assert ops.get_op("gated_rmsnorm").select("cpu").name == "torch"
    if DEVICE == "cuda":
        assert ops.get_op("causal_conv1d").select("cuda").name == "triton"
        assert ops.get_op("gated_rmsnorm").select("cuda").name == "triton"


@pytest.mark.gpu
def test_conv_and_norm_backward_are_deterministic_and_accurate_at_real_shapes() -> None:
    tensors, kwargs = conv_inputs(4, 4096, 2560, 4, bias=True, docs=True, init=False)
    g = torch.Generator().manual_seed(1)
    cot = [
        torch.randn(4, 4096, 2560, generator=g).cuda(),
        torch.randn(4, 2560, 3, generator=g).cuda(),
    ]
    check(conv_mod.causal_conv1d_triton, causal_conv1d_ref, tensors, cot, torch.bfloat16,
          activation="silu", return_final_states=True, **kwargs)  # fmt: skip
    runs = []
    for _ in range(2):
        t = leaves({k: v.bfloat16() for k, v in tensors.items()})
        outputs_and_grads(conv_mod.causal_conv1d_triton, t, cot, activation="silu",
                          return_final_states=True, **kwargs)  # fmt: skip
        runs.append([v.grad for v in t.values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    x = torch.randn(4, 4096, 4096, device="cuda").bfloat16()
    z = torch.randn_like(x)
    w = torch.rand(4096, device="cuda")
    runs = []
    for _ in range(2):
        t = leaves({"x": x, "z": z, "weight": w})
        norm_mod.gated_rmsnorm_triton(**t, group_size=512).float().sum().backward()
        runs.append([v.grad for v in t.values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
