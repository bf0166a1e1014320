"""Triton SSD kernels against the PyTorch references.

Error rule (mamba_ssm's kernel tests): against the reference in float64 (the chunked reference
on fp64 copies of the inputs; tests/kernels/test_ssd_ref.py shows it equals the sequential
recurrence to 1e-12), the kernel's
relative error (max |err| / max |ref|) must satisfy err_kernel <= 2 * err_torch + atol, where
err_torch is the chunked PyTorch reference's error with inputs of the same dtype; for outputs,
final states and every gradient. On CPU the kernels run under TRITON_INTERPRET=1 (set by
tests/conftest.py) at tiny shapes; on a GPU the `gpu` tests add real shapes and determinism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hybrid_kernels.ssd_ref import ssd_chunked_ref

triton_mod = pytest.importorskip("hybrid_kernels.ssd_triton", reason="triton is not installed")
ssd_triton = triton_mod.ssd_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# Gradients of per-head parameters are sums over batch x length of terms that cancel (dA sums
# dt * d(cumsum) over every position), so their fp32 rounding differs more between summation
# orders: they get 5x the atol.
SUMMED = {"dA", "ddt_bias", "dD"}


@dataclass
class Case:
    L: int
    H: int = 4
    G: int = 1
    P: int = 16
    N: int = 16
    batch: int = 2
    D: str | None = "hp"  # None, "h" or "hp"
    z: bool = False
    dt_proc: bool = True  # dt_bias + softplus + dt_limit
    init: bool = False
    docs: bool = False
    dtype: torch.dtype = torch.float32


def make_inputs(case: Case, device: str = DEVICE) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    b, L, H, P, G, N = case.batch, case.L, case.H, case.P, case.G, case.N
    t = {
        "x": rand(b, L, H, P).to(case.dtype),
        "dt": rand(b, L, H, scale=0.5).to(case.dtype),
        "A": -torch.rand(H, generator=gen) * 2 - 0.1,
        "B": rand(b, L, G, N).to(case.dtype),
        "C": rand(b, L, G, N).to(case.dtype),
    }
    if case.D:
        t["D"] = rand(H, P) if case.D == "hp" else rand(H)
    if case.z:
        t["z"] = rand(b, L, H, P).to(case.dtype)
    if case.dt_proc:
        t["dt_bias"] = rand(H, scale=0.3)
    if case.init:
        t["initial_states"] = rand(b, H, P, N)
    tensors = {k: v.to(device).requires_grad_(True) for k, v in t.items()}
    extra: dict = {
        "dt_softplus": case.dt_proc,
        "dt_limit": (0.01, 5.0) if case.dt_proc else (0.0, math.inf),
        "return_final_states": True,
    }
    if case.docs:  # documents of lengths ~L/3 and L/2 in row 0; a late boundary in row 1
        seq = torch.zeros(b, L, dtype=torch.long)
        seq[0, L // 3 :] = 1
        seq[0, (5 * L) // 6 :] = 3
        seq[-1, max(L - 5, 1) :] = 2
        extra["seq_idx"] = seq.to(device)
    grad_y = rand(b, L, H, P).to(device)
    grad_final = rand(b, H, P, N).to(device)
    return tensors, extra, grad_y, grad_final


def run(fn, tensors: dict, extra: dict, grad_y, grad_final) -> dict[str, torch.Tensor]:
    for v in tensors.values():
        v.grad = None
    args = {k: v for k, v in tensors.items() if k not in ("x", "dt", "A", "B", "C")}
    y, final = fn(
        tensors["x"], tensors["dt"], tensors["A"], tensors["B"], tensors["C"],
        chunk_size=16, **args, **extra,
    )  # fmt: skip
    loss = (y.double() * grad_y.double()).sum() + (final.double() * grad_final.double()).sum()
    loss.backward()
    out = {"y": y.detach(), "final": final.detach()}
    out.update({f"d{k}": v.grad.clone() for k, v in tensors.items()})
    return out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_against_references(case: Case, device: str = DEVICE) -> dict[str, tuple[float, float]]:
    tensors, extra, gy, gf = make_inputs(case, device)
    kernel = run(ssd_triton, tensors, extra, gy, gf)
    torch_ = run(ssd_chunked_ref, tensors, extra, gy, gf)
    fp64 = {k: v.detach().double().requires_grad_(True) for k, v in tensors.items()}
    exact = run(ssd_chunked_ref, fp64, extra, gy, gf)
    errors = {}
    for name, ref in exact.items():
        e_kernel, e_torch = rel_err(kernel[name], ref), rel_err(torch_[name], ref)
        errors[name] = (e_kernel, e_torch)
        assert kernel[name].dtype == torch_[name].dtype, name
        atol = ATOL[case.dtype] * (5 if name in SUMMED else 1)
        assert e_kernel <= 2 * e_torch + atol, (name, e_kernel, e_torch)
    return errors


CPU_CASES = {
    "plain": Case(L=40, D=None, dt_proc=False),
    "not_multiple_of_chunk": Case(L=100, G=2, D="h"),
    "docs_init_z": Case(L=130, G=2, z=True, init=True, docs=True),
    "exact_chunks_docs": Case(L=128, H=2, docs=True, init=True),
    "one_token": Case(L=1, init=True),
    "odd_sizes": Case(L=70, H=3, G=1, P=12, N=10, z=True, docs=True),
    # bf16 runs in the GPU tests only: Triton 3.9's CPU interpreter returns garbage for tl.dot
    # on bf16 operands (a 16x16 product is off by 1e10), while fp16 is computed correctly.
    "fp16": Case(L=80, G=2, z=True, init=True, docs=True, dtype=torch.float16),
}


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_ssd_triton_matches_references(name: str) -> None:
    check_against_references(CPU_CASES[name])


def test_ssd_triton_without_grad_and_without_final_state() -> None:
    tensors, extra, _, _ = make_inputs(Case(L=50))
    extra = {**extra, "return_final_states": False}
    args = {k: v.detach() for k, v in tensors.items()}
    with torch.no_grad():
        y = ssd_triton(**args, chunk_size=16, **extra)
        ref = ssd_chunked_ref(**args, chunk_size=16, **extra)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-5


def test_ssd_triton_rejects_fp64() -> None:
    tensors, extra, _, _ = make_inputs(Case(L=8))
    args = {k: v.detach().double() for k, v in tensors.items()}
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        ssd_triton(**args, chunk_size=16, **extra)


def test_ssd_dispatch_picks_torch_on_cpu_and_triton_when_asked() -> None:
    from hybrid import ops
    from hybrid.ops.ssd import SSD

    assert SSD.select(torch.device("cpu")).name == "torch"
    if DEVICE == "cpu":
        tensors, extra, _, _ = make_inputs(Case(L=20))
        args = {k: v.detach() for k, v in tensors.items()}
        y, _ = ops.ssd(**args, chunk_size=16, impl="triton", **extra)
        y_ref, _ = ops.ssd(**args, chunk_size=16, impl="torch", **extra)
        assert rel_err(y, y_ref) < 1e-5


def test_ssd_custom_op_traces_with_torch_compile() -> None:
    """`torch.compile(fullgraph=True)` traces through the custom op (fake shapes, autograd)."""
    tensors, extra, gy, gf = make_inputs(Case(L=20, z=True, init=True))
    compiled = torch.compile(ssd_triton, backend="aot_eager", fullgraph=True)
    got = run(compiled, tensors, extra, gy, gf)
    want = run(ssd_triton, tensors, extra, gy, gf)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_ssd_custom_op_passes_opcheck() -> None:
    tensors, extra, _, _ = make_inputs(Case(L=20, z=True, init=True, docs=True))
    t = tensors
    args = (
        t["x"], t["dt"].detach(), t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
        t["initial_states"], extra["seq_idx"].to(torch.int32), True, 0.01, 5.0, True,
    )  # fmt: skip
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(
        torch.ops.hybrid_kernels.ssd_fwd.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


# -- GPU: real shapes, low precision, determinism ---------------------------------------------

GPU_CASES = {
    "B2_L2048_H16_G2_N128_docs": Case(L=2048, H=16, G=2, P=64, N=128, init=True, docs=True, z=True),
    "B1_L1000_H8_G1_N64": Case(L=1000, batch=1, H=8, P=64, N=64),
    "bf16_B2_L4096_H32_G4_N128": Case(
        L=4096, H=32, G=4, P=64, N=128, docs=True, init=True, dtype=torch.bfloat16
    ),
    "fp16_B2_L1536_H8_N128": Case(L=1536, H=8, P=64, N=128, z=True, dtype=torch.float16),
    "bf16_N256_G8": Case(L=1024, H=32, G=8, P=64, N=256, dtype=torch.bfloat16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_ssd_triton_matches_references_gpu(name: str) -> None:
    errors = check_against_references(GPU_CASES[name], "cuda")
    print(name, {k: f"{a:.1e}/{b:.1e}" for k, (a, b) in errors.items()})


@pytest.mark.gpu
def test_ssd_triton_backward_is_deterministic() -> None:
    case = Case(L=4096, batch=2, H=32, G=1, P=64, N=128, docs=True, init=True)
    case.dtype = torch.bfloat16
    tensors, extra, gy, gf = make_inputs(case, "cuda")
    first = run(ssd_triton, tensors, extra, gy, gf)
    second = run(ssd_triton, tensors, extra, gy, gf)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("segments", [2, 4])
def test_ssd_two_level_scan_matches_one_walk(segments: int) -> None:
    """Walking segments of the sequence in parallel (chained start states) equals one walk."""
    case = Case(L=250, G=2, z=True, init=True, docs=True)
    t, extra, _, _ = make_inputs(case)
    seq = extra["seq_idx"].to(torch.int32)
    args = (
        t["x"].detach(), t["dt"].detach(), t["A"].detach(), t["B"].detach(), t["C"].detach(),
        t["D"].detach(), t["z"].detach(), t["dt_bias"].detach(), t["initial_states"].detach(),
        seq, True, 0.01, 5.0,
    )  # fmt: skip
    kw = dict(write_y=True, write_ypre=False, store_states=True)
    y1, _, fin1, st1 = triton_mod._scan_fwd(*args, **kw, segments=1)
    y2, _, fin2, st2 = triton_mod._scan_fwd(*args, **kw, segments=segments)
    assert rel_err(y2, y1) < 1e-5
    assert rel_err(fin2, fin1) < 1e-5
    assert rel_err(st2, st1) < 1e-5


@pytest.mark.parametrize("name", ["not_multiple_of_chunk", "docs_init_z", "fp16"])
def test_ssd_triton_with_precomputed_cb(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The large-N forward (C B^T computed once per chunk and group, read by the walk) and the
    wide dB/dC blocks meet the same error bound as the default path."""
    monkeypatch.setattr(triton_mod, "CB_MIN_N", 0)
    check_against_references(CPU_CASES[name])


@pytest.mark.parametrize("cb_min_n", [0, 10**9])
def test_ssd_64bit_offsets_give_the_same_results(
    cb_min_n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernels' 64-bit offset code (taken for tensors of 2^31 elements or more) computes
    what the 32-bit code does, bit for bit: forward, final state and every gradient, with C B^T
    read (cb_min_n 0) or recomputed, documents, z, initial states and G > 1."""
    monkeypatch.setattr(triton_mod, "CB_MIN_N", cb_min_n)
    tensors, extra, gy, gf = make_inputs(Case(L=150, G=2, z=True, init=True, docs=True))
    want = run(ssd_triton, tensors, extra, gy, gf)
    monkeypatch.setattr(triton_mod, "FORCE_I64", True)
    got = run(ssd_triton, tensors, extra, gy, gf)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_ssd_64bit_offsets_in_every_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variants the tuners may choose run the same in 64-bit offsets, bit for bit: the split
    forward over two segments, and dx / dB/dC without the state sums, with C B^T read, with the
    other grid order."""
    args = _bwd_inputs(Case(L=150, H=4, G=2, z=True, docs=True))
    fwd_args = (args[0], args[4], args[5], args[6], args[7], args[8], args[2], args[9], None,
                args[10], *args[13:])  # fmt: skip
    fwd_kw = dict(write_y=True, write_ypre=True, store_states=True, split_y={}, segments=2)
    bwd_kws = [dict(state_sums=False), dict(dx_cb=True), dict(blocks_first=True)]

    def outputs() -> list:
        return [triton_mod._scan_fwd(*fwd_args, **fwd_kw)] + [
            triton_mod._chunk_bwd(*args, **kw) for kw in bwd_kws
        ]

    want = outputs()
    monkeypatch.setattr(triton_mod, "FORCE_I64", True)
    for got_set, want_set in zip(outputs(), want):
        for a, b in zip(got_set, want_set):
            assert torch.equal(a, b)


def test_needs_i64_measures_the_strided_span() -> None:
    """64-bit offsets are chosen when a tensor (or the strided view the kernel reads, e.g. x
    inside in_proj's output) spans 2^31 elements or more, and only then."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    assert not triton_mod._needs_i64(torch.empty(2, 1024, 64, 64, **meta), None)
    assert triton_mod._needs_i64(torch.empty(1, 2**17, 128, 128, **meta))  # 2^31 elements
    wide = torch.empty(1, 2**17, 17000, **meta)[..., :8192].view(1, 2**17, 128, 64)
    assert wide.numel() < 2**31 and triton_mod._needs_i64(wide)


@pytest.mark.gpu
def test_ssd_past_2_31_elements_matches_two_halves_gpu() -> None:
    """At L = 2^17, 192 heads, N = 128 the backward's per-chunk states hold 1.5 x 2^31
    elements (bf16, 6.4 GB; about 35 GB in all): the full sequence gives the y, final state and
    dx (second half) of the two halves run one after the other (the second starting from the
    first's final state; each half's states stay below 2^31). 32-bit offsets would wrap."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    L, H, P, N, bf = 2**17, 192, 64, 128, torch.bfloat16

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(bf)

    x, dt = rand(1, L, H, P), rand(1, L, H, scale=0.5)
    B, C, dy = rand(1, L, 1, N), rand(1, L, 1, N), rand(1, L, H, P)
    A = -torch.rand(H, generator=gen, device="cuda") - 0.1
    kw = dict(dt_softplus=True, return_final_states=True)
    full = [t.clone().requires_grad_(True) for t in (x, dt, B, C)]
    y, final = ssd_triton(full[0], full[1], A, full[2], full[3], **kw)
    y.backward(dy)
    h = L // 2
    y1, mid = ssd_triton(x[:, :h], dt[:, :h], A, B[:, :h], C[:, :h], **kw)
    half = [t[:, h:].clone().requires_grad_(True) for t in (x, dt, B, C)]
    y2, final2 = ssd_triton(half[0], half[1], A, half[2], half[3], initial_states=mid, **kw)
    y2.backward(dy[:, h:])
    assert rel_err(y[:, :h], y1) < 1e-2 and rel_err(y[:, h:], y2) < 1e-2
    assert rel_err(final, final2) < 1e-2
    for name, a, b in zip(("dx", "ddt", "dB", "dC"), full, half):  # second half's gradients
        assert rel_err(a.grad[:, h:], b.grad) < 1e-2, name


SPLIT_CASES = {
    "docs_init_z_N32": Case(L=130, G=2, N=32, z=True, init=True, docs=True),
    "fp16_N48": Case(L=80, G=2, N=48, z=True, docs=True, dtype=torch.float16),
    "N10_stays_whole": CPU_CASES["odd_sizes"],  # halves of 8 would be too small: not split
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
@pytest.mark.parametrize("min_cb", [0, 10**9])
def test_ssd_triton_with_split_state(
    name: str, min_cb: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walks holding their state as two N halves (the N = 256 launch; N = 48 leaves the
    second half partly masked), with C B^T read or recomputed, meet the same error bound."""
    monkeypatch.setattr(triton_mod, "SPLIT_MIN_N", 0)
    monkeypatch.setattr(triton_mod, "CB_MIN_N", min_cb)
    check_against_references(SPLIT_CASES[name])


@pytest.mark.parametrize("segments", [1, 3])
def test_ssd_split_state_walk_matches_whole_state(segments: int) -> None:
    """Split or whole state, the walk gives the same y, final state and per-chunk states."""
    case = Case(L=250, G=2, N=32, z=True, init=True, docs=True)
    t, extra, _, _ = make_inputs(case)
    d = {k: v.detach() for k, v in t.items()}
    args = (d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], d["z"], d["dt_bias"],
            d["initial_states"], extra["seq_idx"].to(torch.int32), True, 0.01, 5.0)  # fmt: skip
    kw = dict(write_y=True, write_ypre=False, store_states=True, segments=segments)
    whole = triton_mod._scan_fwd(*args, **kw, split_n=False)
    split = triton_mod._scan_fwd(*args, **kw, split_n=True)
    for a, b in zip(whole, split):
        if a is not None:
            assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize("N", [32, 48])
def test_ssd_state_gradient_walk_halves_match_whole(N: int) -> None:
    """The state-gradient walk holding its gradient as two N halves (N = 48: the second half
    partly masked) gives the per-chunk state gradients and the initial-state gradient of the
    whole-state walk, with a final-state gradient, z and documents."""
    case = Case(L=150, H=4, G=2, N=N, z=True, docs=True)
    t, extra, gy, gf = make_inputs(case)
    dt, A, C, z, dtb = (t[k].detach() for k in ("dt", "A", "C", "z", "dt_bias"))
    args = (gy, gf, z, dt, A, C, dtb, extra["seq_idx"].to(torch.int32), True, 0.01, 5.0, 4, 16)
    whole = triton_mod._dstates(*args, split_n=False)
    halves = triton_mod._dstates(*args, split_n=True)
    for a, b in zip(whole, halves):
        assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize("L, G, N", [(100, 2, 32), (64, 1, 10), (150, 3, 80)])
def test_chunk_cb_kernel_matches_torch(L: int, G: int, N: int) -> None:
    """The per-chunk C B^T kernel equals fp64 batched products of the zero-padded chunks."""
    B = torch.randn(2, L, G, N, dtype=torch.float32, device=DEVICE)
    C = torch.randn(2, L, G, N, dtype=torch.float32, device=DEVICE)
    Q = triton_mod.FWD_CHUNK
    nchunks = -(-L // Q)

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (B, L, G, N) -> (B, nchunks, G, Q, N)
        t = torch.nn.functional.pad(t.double(), (0, 0, 0, 0, 0, nchunks * Q - L))
        return t.view(2, nchunks, Q, G, N).transpose(2, 3)

    want = blocks(C) @ blocks(B).transpose(-1, -2)
    got = triton_mod._chunk_cb(B, C, Q)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("min_n", [0, 10**9])
def test_ssd_triton_cb_paths_gpu(min_n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_mod, "CB_MIN_N", min_n)
    check_against_references(GPU_CASES["bf16_B2_L4096_H32_G4_N128"], "cuda")


def test_ssd_grids_past_65535_chunks_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """With more chunks (or sequences x heads) than a grid's second and third axes hold
    (65535; here made 1), the dB/dC, dx and split-forward y kernels put the chunks, and the
    walks the (sequence, head) programs, on the first axis: bit-equal results, with several P
    blocks, a three-segment walk from initial states, N halves, dB/dC head splits and N blocks,
    and 64-bit offsets."""
    case = Case(L=5 * 64 - 7, H=3, P=32, N=32, z=True, docs=True, init=True)
    t, extra, gy, gf = make_inputs(case)
    d = {k: v.detach() for k, v in t.items()}
    seq = extra["seq_idx"].to(torch.int32)
    fwd_args = (d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], d["z"], d["dt_bias"],
                d["initial_states"], seq, True, 0.01, 5.0)  # fmt: skip
    fwd_kws = [
        dict(write_y=True, write_ypre=True, store_states=True, segments=3, block_p=16),
        dict(write_y=True, write_ypre=True, store_states=False, split_y={}, segments=2),
    ]
    ds_args = (gy, gf, d["z"], d["dt"], d["A"], d["C"], d["dt_bias"], seq, True, 0.01, 5.0,
               case.H, case.P)  # fmt: skip
    ds_kws = [dict(block_p=16), dict(block_p=16, split_n=True)]
    bwd_args = _bwd_inputs(Case(L=150, H=4, G=2, N=32, z=True, docs=True))
    bwd_kws = [{}, dict(dbc_block_n=16, dbc_min_programs=10**6)]  # 2 N blocks, 2 head splits

    def outputs() -> list:
        return (
            [triton_mod._scan_fwd(*fwd_args, **kw) for kw in fwd_kws]
            + [triton_mod._dstates(*ds_args, **kw) for kw in ds_kws]
            + [triton_mod._chunk_bwd(*bwd_args, **kw) for kw in bwd_kws]
        )

    want = outputs()
    monkeypatch.setattr(triton_mod, "_GRID_YZ", 1)
    for i64 in (False, True):
        monkeypatch.setattr(triton_mod, "FORCE_I64", i64)
        for got_set, want_set in zip(outputs(), want):
            for a, b in zip(got_set, want_set):
                assert (a is None and b is None) or torch.equal(a, b), i64


@pytest.mark.parametrize("heads_first, blocks_first", [(True, True), (False, False)])
def test_ssd_backward_grid_orders_agree(heads_first: bool, blocks_first: bool) -> None:
    """The backward kernels' program orders (heads of a chunk side by side share its B and C
    in the L2) give the same gradients, bit for bit: no program's work depends on when it
    runs."""
    args = _bwd_inputs(Case(L=150, H=4, G=2, z=True, docs=True))
    ref = triton_mod._chunk_bwd(*args, heads_first=not heads_first, blocks_first=not blocks_first)
    other = triton_mod._chunk_bwd(*args, heads_first=heads_first, blocks_first=blocks_first)
    for a, b in zip(ref, other):
        assert torch.equal(a, b)


def test_ssd_backward_with_read_cb_matches_recomputed() -> None:
    """The dx kernel reading C B^T from `_chunk_cb` gives the gradients of the one that
    contracts it per head (fp32 inputs: the same sums in another order)."""
    args = _bwd_inputs(Case(L=150, H=4, G=2, z=True, docs=True))
    ref = triton_mod._chunk_bwd(*args, dx_cb=False)
    got = triton_mod._chunk_bwd(*args, dx_cb=True)
    for a, b in zip(ref, got):
        assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize(
    "N, dbc_block_n, min_programs, docs", [(48, 16, 264, True), (80, 32, 1, False)]
)
def test_ssd_backward_state_sums_match_dx_reading_states(
    N: int, dbc_block_n: int, min_programs: int, docs: bool
) -> None:
    """dx taking the entering state's terms summed over N from the dB/dC kernel (its N blocks
    and head splits: 3 blocks of 16, masked blocks of 32, one head a split) gives the
    gradients of the dx kernel that reads the states itself (fp32: the same sums in another
    order). With slow decays a chunk's entering state reaches its end, so <dS, Hprev> counts."""
    args = _bwd_inputs(Case(L=150, H=4, G=2, N=N, z=True, docs=docs), a_scale=0.02)
    kw = dict(dbc_block_n=dbc_block_n, dbc_min_programs=min_programs)
    ref = triton_mod._chunk_bwd(*args, state_sums=False, **kw)
    for dx_cb in (False, True):
        got = triton_mod._chunk_bwd(*args, state_sums=True, dx_cb=dx_cb, **kw)
        for a, b in zip(ref, got):
            assert rel_err(b, a) < 1e-5, dx_cb


def test_ssd_backward_candidates_agree() -> None:
    """Every dx / dB/dC variant the backward's tuner may choose gives the default's gradients
    (fp32: the same sums in other orders), with or without the state sums and C B^T read or
    not; the candidate lists (at N >= 128 the walks' (P, N) tiles whole or in halves, which
    test_ssd_split_state_walk_matches_whole_state and
    test_ssd_state_gradient_walk_halves_match_whole compare); short
    sequences take the defaults untimed."""
    configs = triton_mod._bwd_configs(32, triton_mod.TUNE_MIN_CHUNKS)
    assert configs["dx"][0] == {} and len(configs["dx"]) == 4
    assert configs["states"] == configs["dstates"] == [{}]
    big = triton_mod._bwd_configs(256, triton_mod.TUNE_MIN_CHUNKS)
    assert big["states"][1] == {"split_n": False} and big["dstates"][1] == {"split_n": True}
    assert all(v == [{}] for v in triton_mod._bwd_configs(256, 2).values())
    args = _bwd_inputs(Case(L=150, H=4, G=2, N=32, z=True, docs=True), a_scale=0.02)
    ref = triton_mod._chunk_bwd(*args)
    for cfg in configs["dx"][1:]:
        for a, b in zip(ref, triton_mod._chunk_bwd(*args, **cfg)):
            assert rel_err(b, a) < 1e-5, cfg


@pytest.mark.gpu
def test_ssd_tuned_launches_match_references_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the launch tuners on (as in training), the launches they choose for the forward
    (walk or split forward) and each backward piece meet the references' error bound."""
    monkeypatch.setenv("HYBRID_KERNELS_TUNE", "1")
    check_against_references(GPU_CASES["bf16_N256_G8"], "cuda")
    check_against_references(GPU_CASES["bf16_B2_L4096_H32_G4_N128"], "cuda")


def _bwd_inputs(case: Case, a_scale: float = 1.0) -> tuple:
    """The chunk backward's inputs (ypre, per-chunk states and state gradients from the
    other kernels) for a case with z (and documents when it has them). `a_scale` < 1 slows
    the decay, so that states carry across whole chunks (at the cases' A a state decays
    by about e^-45 over a 64-position chunk)."""
    t, extra, gy, _ = make_inputs(case)
    x, dt, A, B, C, D, z, dtb = (t[k].detach() for k in ("x", "dt", "A", "B", "C", "D", "z",
                                                         "dt_bias"))  # fmt: skip
    A = A * a_scale
    seq = extra["seq_idx"].to(torch.int32) if case.docs else None
    proc = (True, 0.01, 5.0)
    _, ypre, _, _ = triton_mod._scan_fwd(
        x, dt, A, B, C, D, z, dtb, None, seq, *proc, write_y=True, write_ypre=True,
        store_states=False,
    )  # fmt: skip
    _, _, _, states = triton_mod._scan_fwd(
        x, dt, A, B, C, None, None, dtb, None, seq, *proc, write_y=False, write_ypre=False,
        store_states=True, chunk=triton_mod.KERNEL_CHUNK,
    )  # fmt: skip
    dstates, _ = triton_mod._dstates(gy, None, z, dt, A, C, dtb, seq, *proc, case.H, case.P)
    return (x, gy, z, ypre, dt, A, B, C, D, dtb, seq, states, dstates, *proc)


def test_ssd_forward_walk_candidates_agree() -> None:
    """Every launch the forward's tuner may choose (segments, P blocks, C B^T read or
    recomputed) computes the same y and final state, to fp32 rounding."""
    chunks = triton_mod.TUNE_MIN_CHUNKS + 1
    case = Case(L=chunks * triton_mod.FWD_CHUNK - 5, H=2, batch=1, z=True, docs=True)
    t, extra, _, _ = make_inputs(case)
    d = {k: v.detach() for k, v in t.items()}
    args = (d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], d["z"], d["dt_bias"], None,
            extra["seq_idx"].to(torch.int32), True, 0.01, 5.0)  # fmt: skip
    configs = triton_mod._walk_configs(1, case.H, chunks, case.P, case.N, 264)
    assert configs[0] == {} and {c.get("segments") for c in configs[1:]} == {1, 2}
    assert {c.get("num_stages") for c in configs[1:]} == {None, 1}
    # a GPU whose slots the heads alone fill gets no segmented candidates
    assert {c.get("segments") for c in triton_mod._walk_configs(1, 8, chunks, 16, 16, 8)} == {
        None,
        1,
    }
    kw = dict(write_y=True, write_ypre=True, store_states=False)
    y0, ypre0, fin0, _ = triton_mod._scan_fwd(*args, **kw)
    for cfg in configs[1:]:
        y, ypre, fin, _ = triton_mod._scan_fwd(*args, **kw, **cfg)
        assert rel_err(y, y0) < 1e-5 and rel_err(ypre, ypre0) < 1e-5, cfg
        assert rel_err(fin, fin0) < 1e-5, cfg


@pytest.mark.parametrize(
    "N, split_y, extra_kw",
    [
        (32, dict(block_n=16), dict(cb=True)),  # two N blocks, C B^T read
        (48, dict(block_n=32, num_warps=8), dict(cb=False, segments=2)),  # a masked N block
        (16, {}, dict(cb=False)),  # one block
        (32, dict(block_n=16, num_warps=8), dict(cb=True, chunk=128)),  # chunks of 128
    ],
)
def test_ssd_split_forward_matches_the_walk(N: int, split_y: dict, extra_kw: dict) -> None:
    """The split forward (a state-only walk storing the per-chunk states, then every chunk's y
    from them at once) gives the walk's y, y before the gate, final state and states, with
    documents, z, initial states, G > 1 and a length that is not a multiple of the chunk."""
    case = Case(L=150, G=2, N=N, z=True, init=True, docs=True)
    t, extra, _, _ = make_inputs(case)
    d = {k: v.detach() for k, v in t.items()}
    args = (d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], d["z"], d["dt_bias"],
            d["initial_states"], extra["seq_idx"].to(torch.int32), True, 0.01, 5.0)  # fmt: skip
    kw = dict(write_y=True, write_ypre=True, store_states=True, **extra_kw)
    want = triton_mod._scan_fwd(*args, **kw)
    got = triton_mod._scan_fwd(*args, **kw, split_y=split_y)
    for name, a, b in zip(("y", "ypre", "final", "states"), got, want):
        assert rel_err(a, b) < 1e-5, name


def test_forward_tuner_tries_the_split_forward_from_n128() -> None:
    """From N = 128 on the forward's candidates include the split forward (each y launch of
    `SPLIT_Y_LAUNCHES`, and one with the other C B^T choice); below, the walk alone."""
    big = triton_mod._walk_configs(2, 64, 64, 64, 128, 264)
    split = [c for c in big if "split_y" in c]
    assert [c["split_y"] for c in split[:3]] == list(triton_mod.SPLIT_Y_LAUNCHES)
    assert split[3]["cb"] is not triton_mod._use_cb(128, None)
    assert split[4]["chunk"] == 128
    assert not any("split_y" in c for c in triton_mod._walk_configs(2, 64, 64, 64, 64, 264))


def test_ssd_backward_walk_candidates_chosen_through_the_tuners_agree(monkeypatch) -> None:
    """The backward's state walks under the other candidate their tuners offer from N = 128 on
    (the (P, N) tile whole or in N halves), chosen through the tuners as in training, give the
    default's gradients (fp32 rounding)."""
    monkeypatch.setattr(triton_mod, "TUNE_MIN_CHUNKS", 1)
    case = Case(L=70, H=2, G=1, P=32, N=128, batch=1, z=True, docs=True, init=True)
    t, extra, gy, gf = make_inputs(case)
    chosen = []

    def grads(i: int) -> dict[str, torch.Tensor]:
        def choose(key, configs, run_config, device) -> dict:
            chosen.append(configs()[i])
            return chosen[-1]

        for name in ("states", "dstates"):
            monkeypatch.setattr(triton_mod._BWD_TUNERS[name], "choose", choose)
        return run(ssd_triton, t, extra, gy, gf)

    ref, got = grads(0), grads(1)
    assert chosen == [{}, {}, {"split_n": True}, {"split_n": True}]
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-5, k


def test_tuner_keys_and_candidates_depend_on_the_length_bucket_only(monkeypatch) -> None:
    """Lengths within a power of two of chunks share a key, and their candidate lists are the
    same (a choice stored by a process that saw one length is a candidate for the others)."""
    assert [triton_mod._length_bucket(n) for n in (1, 15, 16, 31, 32, 63)] == [1, 8, 16, 16, 32, 32]
    seen = []

    def choose(key, configs, run_config, device) -> dict:
        seen.append((key, configs()))
        return {}

    monkeypatch.setattr(triton_mod._WALK_TUNER, "choose", choose)
    for nchunks in (17, 31):
        case = Case(L=nchunks * triton_mod.FWD_CHUNK - 3, H=2, batch=1, N=16)
        t, extra, _, _ = make_inputs(case)
        d = {k: v.detach() for k, v in t.items()}
        triton_mod._tuned_fwd(d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], None,
                              d["dt_bias"], None, None, True, 0.01, 5.0, False)  # fmt: skip
    assert seen[0] == seen[1] and len(seen[0][1]) > 1
