"""SSD references: chunked == sequential recurrence (fp64), document packing, decoding steps,
gradients, and fp32 / bf16 accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hybrid_kernels.ssd_ref import (
    process_dt,
    ssd_chunked_ref,
    ssd_sequential_ref,
    ssd_step_ref,
)

F64 = torch.float64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, computed in fp64."""
    ref = ref.to(F64)
    return ((out.to(F64) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def seq_idx_from_lengths(rows: list[list[int]]) -> torch.Tensor:
    """Document lengths per row -> (B, L) seq_idx; ids jump by 1 or 2 (only changes matter)."""
    out = []
    for lengths in rows:
        ids = torch.arange(len(lengths)) * 2 - (torch.arange(len(lengths)) % 2)
        out.append(torch.repeat_interleave(ids, torch.tensor(lengths)))
    return torch.stack(out)


@dataclass
class Case:
    L: int
    chunk: int
    H: int = 4
    G: int = 1
    P: int = 3
    N: int = 5
    batch: int = 2
    D: str | None = None  # None, "h" (per head) or "hp" (per channel)
    z: bool = False
    dt_proc: bool = False  # dt_bias + softplus + dt_limit
    init: bool = False
    docs: list[list[int]] | None = None


def make_inputs(case: Case, dtype: torch.dtype = F64, seed: int = 0) -> dict:
    """Random inputs for `case` as keyword arguments of the SSD references."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    b, L, H, P, G, N = case.batch, case.L, case.H, case.P, case.G, case.N
    kw: dict = dict(
        x=randn(b, L, H, P),
        A=-torch.exp(torch.rand(H, generator=g, dtype=F64) * math.log(8.0)) / 2,
        B=randn(b, L, G, N),
        C=randn(b, L, G, N),
    )
    if case.dt_proc:
        kw.update(dt=randn(b, L, H) - 1.0, dt_bias=0.5 * randn(H))
        kw.update(dt_softplus=True, dt_limit=(0.05, 0.6))
    else:
        kw["dt"] = 0.01 + 0.5 * torch.rand(b, L, H, generator=g, dtype=F64)
    if case.D == "h":
        kw["D"] = randn(H)
    elif case.D == "hp":
        kw["D"] = randn(H, P)
    if case.z:
        kw["z"] = randn(b, L, H, P)
    if case.init:
        kw["initial_states"] = randn(b, H, P, N)
    if case.docs is not None:
        kw["seq_idx"] = seq_idx_from_lengths(case.docs)
    return {
        k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()
    }


def split(kw: dict) -> tuple[tuple, dict]:
    kw = dict(kw)
    return tuple(kw.pop(k) for k in ("x", "dt", "A", "B", "C")), kw


CASES = {
    "plain_L37_c16": Case(L=37, chunk=16),
    "groups_Dh_z": Case(L=37, chunk=16, H=4, G=2, D="h", z=True),
    "groups3_Dhp_dtproc_init": Case(L=32, chunk=8, H=6, G=3, D="hp", dt_proc=True, init=True),
    "docs_chunk_boundary_one_token": Case(
        L=37, chunk=16, G=2, init=True, docs=[[16, 1, 12, 8], [3, 29, 5]]
    ),
    "docs_whole_chunks_last_one_token": Case(L=48, chunk=16, init=True, docs=[[32, 15, 1], [48]]),
    "all_options": Case(
        L=37,
        chunk=16,
        H=4,
        G=2,
        D="hp",
        z=True,
        dt_proc=True,
        init=True,
        docs=[[1, 15, 16, 5], [20, 17]],
    ),
    "L_shorter_than_chunk": Case(L=10, chunk=16, D="h", init=True, docs=[[4, 6], [10]]),
    "chunk_1": Case(L=7, chunk=1, G=2, init=True, docs=[[2, 1, 4], [7]]),
    "chunk_equals_L": Case(L=16, chunk=16, batch=1, dt_proc=True, docs=[[8, 8]]),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_chunked_matches_sequential_fp64(case: Case) -> None:
    args, kw = split(make_inputs(case))
    y, final = ssd_chunked_ref(*args, chunk_size=case.chunk, return_final_states=True, **kw)
    y_ref, final_ref = ssd_sequential_ref(*args, return_final_states=True, **kw)
    assert y.dtype == F64 and final.dtype == F64
    assert y.shape == (case.batch, case.L, case.H, case.P)
    assert final.shape == (case.batch, case.H, case.P, case.N)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(final, final_ref) < 1e-10


def test_chunked_gradients_match_sequential_fp64() -> None:
    case = CASES["all_options"]
    kw = make_inputs(case)
    grads = []
    for fn in (ssd_chunked_ref, ssd_sequential_ref):
        leaves = {
            k: v.clone().requires_grad_()
            for k, v in kw.items()
            if torch.is_tensor(v) and v.is_floating_point()
        }
        args, rest = split({**kw, **leaves})
        y, final = fn(*args, chunk_size=case.chunk, return_final_states=True, **rest)
        (y.sin().sum() + final.cos().sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for name, g in grads[0].items():
        assert rel_err(g, grads[1][name]) < 1e-10, name


@pytest.mark.parametrize("with_init", [False, True])
def test_packed_documents_equal_separate_runs(with_init: bool) -> None:
    lengths = [16, 1, 12, 8]
    case = Case(
        L=sum(lengths),
        chunk=16,
        batch=1,
        G=2,
        D="h",
        z=True,
        dt_proc=True,
        init=with_init,
        docs=[lengths],
    )
    kw = make_inputs(case, seed=1)
    args, rest = split(kw)
    y, final = ssd_chunked_ref(*args, chunk_size=case.chunk, return_final_states=True, **rest)
    rest.pop("seq_idx")
    init = rest.pop("initial_states", None)
    start = 0
    for i, n in enumerate(lengths):
        part = slice(start, start + n)
        doc_args = tuple(a[:, part] if a.dim() > 1 else a for a in args)
        doc_rest = {k: (v[:, part] if k == "z" else v) for k, v in rest.items()}
        y_doc, final_doc = ssd_chunked_ref(
            *doc_args,
            chunk_size=case.chunk,
            initial_states=init if i == 0 else None,
            return_final_states=True,
            **doc_rest,
        )
        assert rel_err(y[:, part], y_doc) < 1e-10, f"document {i}"
        start += n
    assert rel_err(final, final_doc) < 1e-10


def test_step_iterated_matches_sequential() -> None:
    case = Case(L=9, chunk=4, H=4, G=2, D="hp", z=True, dt_proc=True, init=True)
    kw = make_inputs(case, seed=2)
    args, rest = split(kw)
    y_ref, final_ref = ssd_sequential_ref(*args, return_final_states=True, **rest)
    x, dt, A, B, C = args
    init = rest.pop("initial_states")
    z = rest.pop("z")
    state = init.clone()
    ys = []
    for t in range(case.L):
        before = state.clone()
        y_t, new_state = ssd_step_ref(
            state, x[:, t], dt[:, t], A, B[:, t], C[:, t], z=z[:, t], **rest
        )
        assert torch.equal(state, before), "ssd_step_ref modified the state in place"
        ys.append(y_t)
        state = new_state
    assert rel_err(torch.stack(ys, 1), y_ref) < 1e-12
    assert rel_err(state, final_ref) < 1e-12


def test_step_dtypes() -> None:
    case = Case(L=1, chunk=1, batch=2, H=4, G=2)
    kw = make_inputs(case, dtype=torch.bfloat16)
    state = torch.randn(2, 4, 3, 5)
    y, new = ssd_step_ref(
        state, kw["x"][:, 0], kw["dt"][:, 0], kw["A"], kw["B"][:, 0], kw["C"][:, 0]
    )
    assert y.dtype == torch.bfloat16 and y.shape == (2, 4, 3)
    assert new.dtype == torch.float32 and new.shape == state.shape


def _gradcheck_inputs(extra: bool) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(3)
    B_, L, H, P, G, N = 1, 6, 2, 2, 1, 2
    x = torch.randn(B_, L, H, P, generator=g, dtype=F64)
    dt = 0.1 + 0.4 * torch.rand(B_, L, H, generator=g, dtype=F64)
    A = -0.5 - torch.rand(H, generator=g, dtype=F64)
    B = torch.randn(B_, L, G, N, generator=g, dtype=F64)
    C = torch.randn(B_, L, G, N, generator=g, dtype=F64)
    D = torch.randn(H, P if extra else 1, generator=g, dtype=F64).squeeze(-1)
    h0 = torch.randn(B_, H, P, N, generator=g, dtype=F64)
    tensors = [t.requires_grad_() for t in (x, dt, A, B, C, D, h0)]
    kw: dict = {}
    if extra:
        z = torch.randn(B_, L, H, P, generator=g, dtype=F64).requires_grad_()
        tensors.append(z)
        kw = dict(
            dt_softplus=True,
            dt_bias=torch.full((H,), -1.0, dtype=F64),
            seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1]]),
        )
    return tuple(tensors), kw


@pytest.mark.parametrize("extra", [False, True], ids=["basic", "z_softplus_seq_idx"])
def test_gradcheck_chunked(extra: bool) -> None:
    tensors, kw = _gradcheck_inputs(extra)

    def fn(x, dt, A, B, C, D, h0, z=None):
        return ssd_chunked_ref(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=4,
            D=D,
            z=z,
            initial_states=h0,
            return_final_states=True,
            **kw,
        )

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-8, rtol=1e-6)


def _fp32_vs_fp64(case: Case, seed: int, a_scale: float = 1.0) -> tuple[float, float]:
    kw64 = make_inputs(case, seed=seed)
    kw64["A"] = kw64["A"] * a_scale
    kw32 = {
        k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw64.items()
    }
    a64, r64 = split(kw64)
    a32, r32 = split(kw32)
    y_ref, f_ref = ssd_sequential_ref(*a64, return_final_states=True, **r64)
    y, f = ssd_chunked_ref(*a32, chunk_size=case.chunk, return_final_states=True, **r32)
    assert y.dtype == torch.float32 and f.dtype == torch.float32
    return rel_err(y, y_ref), rel_err(f, f_ref)


def test_fp32_matches_fp64() -> None:
    case = Case(L=150, chunk=64, H=4, G=2, D="h", z=True, init=True, docs=[[70, 80], [150]])
    err_y, err_final = _fp32_vs_fp64(case, seed=4)
    assert err_y < 2e-6 and err_final < 2e-6


def test_fp32_long_chunk_strong_decay_is_accurate() -> None:
    """A 256-long chunk with exp(dt*A) down to ~exp(-8) per step: the stable segment sum keeps
    fp32 at ~1e-7 relative error (differences of chunk cumsums give ~5e-6 here)."""
    case = Case(L=256, chunk=256, H=4, G=2)
    err_y, err_final = _fp32_vs_fp64(case, seed=4, a_scale=8.0)
    assert err_y < 5e-7 and err_final < 5e-7


def test_bf16_inputs() -> None:
    case = Case(L=37, chunk=16, G=2, D="h", z=True, init=True)
    kw = make_inputs(case, dtype=torch.bfloat16, seed=5)
    args, rest = split(kw)
    y, f = ssd_chunked_ref(*args, chunk_size=16, return_final_states=True, **rest)
    y_ref, f_ref = ssd_sequential_ref(*args, return_final_states=True, **rest)
    assert y.dtype == torch.bfloat16 and f.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(f, f_ref) < 1e-5


def test_process_dt() -> None:
    dt = torch.tensor([-30.0, -1.0, 0.0, 1.0, 30.0], dtype=F64)
    bias = torch.tensor(0.5, dtype=F64)
    out = process_dt(dt, bias, dt_softplus=True, dt_limit=(0.1, 2.0))
    expected = torch.log1p(torch.exp(dt + 0.5)).clamp(0.1, 2.0)
    assert torch.allclose(out, expected)
    assert torch.equal(process_dt(dt), dt)  # default limit: no clamp, as in mamba_ssm


def test_shape_errors() -> None:
    kw = make_inputs(Case(L=8, chunk=4, H=4, G=2))
    args, rest = split(kw)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd_chunked_ref(args[0][..., :3, :], args[1][..., :3], args[2][:3], *args[3:], chunk_size=4)
    with pytest.raises(ValueError, match="initial_states"):
        ssd_chunked_ref(*args, chunk_size=4, initial_states=torch.zeros(2, 4, 3, 4, dtype=F64))
    with pytest.raises(ValueError, match="D must be"):
        ssd_chunked_ref(*args, chunk_size=4, D=torch.zeros(3, dtype=F64))
