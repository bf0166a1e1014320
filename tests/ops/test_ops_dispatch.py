"""hybrid.ops: implementation selection (automatic, requested, forced by HYBRID_OPS_IMPL),
logging of the automatic choice, clear errors, and that each public op runs its reference."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from hybrid_kernels.conv1d_ref import causal_conv1d_ref, causal_conv1d_step_ref
from hybrid_kernels.rmsnorm_ref import gated_rmsnorm_ref, rmsnorm_ref
from hybrid_kernels.ssd_ref import ssd_chunked_ref, ssd_step_ref

from hybrid import ops
from hybrid.ops._registry import ENV_VAR, Op, define_op, parse_forced

PUBLIC = ["ssd", "ssd_step", "causal_conv1d", "causal_conv1d_step", "rmsnorm", "gated_rmsnorm"]
LOGGER = "hybrid.ops._registry"


@pytest.fixture(autouse=True)
def _no_forced_impl(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def double(t: torch.Tensor) -> torch.Tensor:
    return 2 * t


def triple(t: torch.Tensor) -> torch.Tensor:
    return 3 * t


def demo_op(name: str) -> Op:
    """A standalone op (not in the global table): portable impl + a higher-priority CUDA one."""
    op = Op(name)
    op.register("portable", double)
    op.register("cuda_only", triple, supports=lambda d: d.type == "cuda", priority=10)
    return op


def test_all_public_ops_are_defined_and_pick_torch_on_cpu():
    assert set(PUBLIC) <= set(ops.op_names())
    for name in PUBLIC:
        assert ops.get_op(name).select("cpu").name == "torch"
        assert ops.get_op(name).select(torch.device("cpu"), "torch").name == "torch"


def test_unknown_requested_impl_raises(monkeypatch):
    # Triton kernels support CPU tensors only under the interpreter (set for the CPU tests).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 4, 2, 2)
    dt, A = torch.rand(1, 4, 2), -torch.rand(2)
    B = C = torch.randn(1, 4, 1, 3)
    msg = "ssd implementation 'triton' is not available on cpu; available: torch"
    with pytest.raises(ValueError, match=re.escape(msg)):
        ops.ssd(x, dt, A, B, C, chunk_size=4, impl="triton")
    with pytest.raises(ValueError, match="rmsnorm implementation 'nope'"):
        ops.rmsnorm(x, None, impl="nope")


def test_priority_and_device_support():
    op = demo_op("demo_priority")
    assert op.select("cpu").name == "portable"
    assert op.select(torch.device("cuda")).name == "cuda_only"
    assert op.select("cuda", "portable").name == "portable"
    assert op.names() == ["cuda_only", "portable"]
    msg = "demo_priority implementation 'cuda_only' is not available on cpu; available: portable"
    with pytest.raises(ValueError, match=re.escape(msg)):
        op.select("cpu", "cuda_only")


def test_dtype_restricted_impl_is_skipped_automatically_and_refused_by_name():
    op = Op("demo_dtypes")
    op.register("any", triple)
    op.register("low", triple, priority=5, dtypes=(torch.float32, torch.bfloat16))
    assert op.select("cpu", dtype=torch.float32).name == "low"
    assert op.select("cpu", dtype=torch.float64).name == "any"
    with pytest.raises(ValueError, match="'low' does not take torch.float64 inputs"):
        op.select("cpu", "low", torch.float64)


def test_no_implementation_for_device_raises():
    op = Op("demo_cuda_only")
    op.register("cuda_only", triple, supports=lambda d: d.type == "cuda")
    with pytest.raises(ValueError, match="no demo_cuda_only implementation is available on cpu"):
        op.select("cpu")


def test_automatic_choice_is_logged_once_per_device_type(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    op = demo_op("demo_logging")
    op.select("cpu")
    op.select("cpu")
    op.select("cpu", "portable")  # requested: not logged
    op.select("cuda:0")
    op.select("cuda:1")
    messages = [r.getMessage() for r in caplog.records if "demo_logging" in r.getMessage()]
    assert len(messages) == 2
    assert "'portable' on cpu" in messages[0] and "'cuda_only' on cuda" in messages[1]


def test_duplicate_registration_raises():
    op = demo_op("demo_duplicate")
    with pytest.raises(ValueError, match="already registered"):
        op.register("portable", double)
    with pytest.raises(ValueError, match="already defined"):
        define_op("ssd")
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        ops.get_op("nope")


def test_env_var_forces_an_implementation(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no Triton on CPU tensors
    x = torch.randn(2, 8)
    monkeypatch.setenv(ENV_VAR, "rmsnorm=torch")
    torch.testing.assert_close(ops.rmsnorm(x, None), rmsnorm_ref(x, None))
    monkeypatch.setenv(ENV_VAR, "torch")
    assert ops.get_op("gated_rmsnorm").select("cpu").name == "torch"
    monkeypatch.setenv(ENV_VAR, "rmsnorm=triton, ssd=torch")
    with pytest.raises(ValueError, match="rmsnorm implementation 'triton' is not available"):
        ops.rmsnorm(x, None)
    ops.rmsnorm(x, None, impl="torch")  # an explicit impl wins over the environment
    assert ops.get_op("ssd").select("cpu").name == "torch"
    op = demo_op("demo_env")
    monkeypatch.setenv(ENV_VAR, "portable")
    assert op.select("cuda").name == "portable"


@pytest.mark.parametrize(
    "value,match",
    [
        ("nonsense_op=torch", "unknown op 'nonsense_op'"),
        ("ssd=", "expected 'op=impl'"),
        ("=torch", "expected 'op=impl'"),
    ],
)
def test_env_var_bad_values(monkeypatch, value, match):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ValueError, match=match):
        ops.get_op("ssd").select("cpu")


def test_parse_forced():
    assert parse_forced(" ssd=torch , causal_conv1d = torch,") == {
        "ssd": "torch",
        "causal_conv1d": "torch",
    }
    assert parse_forced("torch") == {"*": "torch"}


def test_public_ops_run_the_references():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 5, 4, 3, generator=g), torch.randn(2, 5, 4, 3, generator=g)
    dt, A = torch.rand(2, 5, 4, generator=g), -torch.rand(4, generator=g)
    B, C = torch.randn(2, 5, 2, 6, generator=g), torch.randn(2, 5, 2, 6, generator=g)
    kw = dict(
        chunk_size=4,
        D=torch.randn(4, generator=g),
        z=z,
        dt_softplus=True,
        seq_idx=torch.tensor([[0, 0, 1, 1, 1]] * 2),
        return_final_states=True,
    )
    for got, ref in zip(ops.ssd(x, dt, A, B, C, **kw), ssd_chunked_ref(x, dt, A, B, C, **kw)):
        assert torch.equal(got, ref)
    state = torch.randn(2, 4, 3, 6, generator=g)
    step_args = (state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    for got, ref in zip(ops.ssd_step(*step_args, z=z[:, 0]), ssd_step_ref(*step_args, z=z[:, 0])):
        assert torch.equal(got, ref)

    u, w, bias = torch.randn(2, 5, 8, generator=g), torch.randn(8, 4, generator=g), None
    ckw = dict(
        seq_idx=torch.tensor([[0, 0, 0, 1, 1]] * 2), activation="silu", return_final_states=True
    )
    for got, ref in zip(ops.causal_conv1d(u, w, bias, **ckw), causal_conv1d_ref(u, w, bias, **ckw)):
        assert torch.equal(got, ref)
    cstate = torch.randn(2, 8, 3, generator=g)
    for got, ref in zip(
        ops.causal_conv1d_step(u[:, 0], cstate, w, bias, "silu"),
        causal_conv1d_step_ref(u[:, 0], cstate, w, bias, "silu"),
    ):
        assert torch.equal(got, ref)

    v, gate, nw = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.rand(8)
    assert torch.equal(ops.rmsnorm(v, nw, 1e-5), rmsnorm_ref(v, nw, 1e-5))
    assert torch.equal(
        ops.gated_rmsnorm(v, gate, nw, 1e-5, group_size=4, norm_before_gate=True),
        gated_rmsnorm_ref(v, gate, nw, 1e-5, group_size=4, norm_before_gate=True),
    )
