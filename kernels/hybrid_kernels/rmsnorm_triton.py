"""Gated, grouped RMSNorm of Mamba-2 (mamba_ssm's `RMSNormGated`) in Triton: forward and a
deterministic backward. Semantics of `hybrid_kernels.rmsnorm_ref.gated_rmsnorm_ref`:

    norm_before_gate=False:  y = norm(x * silu(z)) * w
    norm_before_gate=True:   y = norm(x) * w * silu(z)
    norm(v) = v * rstd,  rstd = 1 / sqrt(mean(v^2 over each group of S channels) + eps)

z and w are optional; `rmsnorm_triton` is the ungated single-group case.

Kernels, top-down:

* `_gated_rmsnorm_fwd_kernel` — one program per (block of rows, group) loads a BM x S tile of x
  (and z), reduces each row's group to its rstd and stores y. Nothing else is written: the
  backward recomputes rstd from the x (and z) it has to read anyway.
* `_gated_rmsnorm_bwd_kernel` — one program per (run of row blocks, group) computes dx and dz
  and accumulates the weight gradient of its run; the partial sums (one row per run) are
  reduced by `torch.sum` in a fixed order: the backward is deterministic (no atomics).

A group too wide for one tile (see `_blocks`; Mamba-2 with n_groups=1 has S = d_inner) is walked
in column chunks twice per row block: once for the row statistics, once for the outputs (the
second pass reads from cache). The backward then adds each chunk's weight-gradient terms to its
own row of partials in memory, which no other program touches.

Ops (`torch.library`, namespace `hybrid_kernels`, see `_triton_utils.library_op`):
`gated_rmsnorm_fwd` and `gated_rmsnorm_bwd`, with fake implementations, called through an
autograd Function, so `torch.compile` traces `gated_rmsnorm_triton` as opaque nodes with their
backward.

Shape legend: M rows (all leading dims), D channels, G groups, S group size (D = G * S); in
kernels BM/BS the row/column blocks. Computation is in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid_kernels._triton_utils import (
    check_launchable,
    device_guard,
    differentiable,
    interpreting,
    library_op,
    num_sms,
)

INTERPRETED = interpreting()  # how this module's kernels were decorated (see _triton_utils)
LOOP_COLS = 512  # column chunk of groups too wide for one tile (see _blocks)


# -- kernels ---------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, cols, mask, s_m, ACC: tl.constexpr):
    off = rows.to(tl.int64)[:, None] * s_m + cols[None, :]
    return tl.load(ptr + off, mask=mask, other=0.0).to(ACC)


@triton.jit
def _tile(rows, c, g, M, S, BS: tl.constexpr):
    """Columns of chunk c of group g and the mask of the (rows x columns) tile."""
    offs = c * BS + tl.arange(0, BS)
    mask_c = offs < S
    return g * S + offs, mask_c, (rows < M)[:, None] & mask_c[None, :]


@triton.jit
def _prep(x_ptr, z_ptr, dy_ptr, w_ptr, rows, cols, mask, mask_c, D, s_xm, s_zm,
          HAS_Z: tl.constexpr, HAS_W: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
          BACKWARD: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Load a tile: (x, v = the normalised input, w (1, BS), silu(z), silu'(z), dy, dyn = dy
    through the gate after the norm, dxr = dyn * w). Unused results are placeholders."""
    x = _load_rows(x_ptr, rows, cols, mask, s_xm, ACC)
    v, gate, dsilu, dy, dyn, dxr = x, x, x, x, x, x
    w = tl.zeros_like(cols[None, :]).to(ACC) + 1.0
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(ACC)[None, :]
    if HAS_Z:
        z = _load_rows(z_ptr, rows, cols, mask, s_zm, ACC)
        sig = 1.0 / (1.0 + tl.exp(-z))  # (tl.sigmoid computes in fp32 on GPU, even for fp64)
        gate = z * sig
        dsilu = sig * (1.0 + z * (1.0 - sig))
        if not NORM_BEFORE_GATE:
            v = x * gate
    if BACKWARD:
        dy = _load_rows(dy_ptr, rows, cols, mask, D, ACC)
        dyn = dy
        if HAS_Z and NORM_BEFORE_GATE:
            dyn = dy * gate
        dxr = dyn
        if HAS_W:
            dxr = dyn * w
    return x, v, w, gate, dsilu, dy, dyn, dxr


@triton.jit
def _fwd_out(v, w, gate, rstd, HAS_Z: tl.constexpr, HAS_W: tl.constexpr,
             NORM_BEFORE_GATE: tl.constexpr):  # fmt: skip
    y = v * rstd[:, None]
    if HAS_W:
        y = y * w
    if HAS_Z and NORM_BEFORE_GATE:
        y = y * gate
    return y


@triton.jit
def _bwd_out(x, v, w, gate, dsilu, dy, dyn, dxr, rstd, cc, HAS_Z: tl.constexpr,
             HAS_W: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):  # fmt: skip
    """(dx, dz, this tile's dweight terms (BS)) from a tile and the row statistics rstd and
    cc = mean(dxhat * xhat) over the group."""
    xhat = v * rstd[:, None]
    dv = (dxr - xhat * cc[:, None]) * rstd[:, None]
    dx, dz = dv, dv
    if HAS_Z:
        if NORM_BEFORE_GATE:
            yn = xhat
            if HAS_W:
                yn = xhat * w
            dz = dy * yn * dsilu
        else:
            dx = dv * gate
            dz = dv * x * dsilu
    return dx, dz, tl.sum(dyn * xhat, axis=0)


@triton.jit
def _store_rows(ptr, rows, cols, mask, D, v):
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(ptr + off, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rmsnorm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr, M, D, S, eps: tl.float64, s_xm, s_zm,
    HAS_Z: tl.constexpr, HAS_W: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    ACC: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, NC: tl.constexpr,
):  # fmt: skip
    """Program (row block, group g): y (M, D) contiguous. A group of NC > 1 column chunks is
    read twice (sum of squares, then output) to bound the registers. `eps` is passed as
    fp64 (a plain float argument would reach the GPU as fp32) and used in ACC."""
    eps = tl.full((), eps, ACC)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    g = tl.program_id(1)
    if NC == 1:
        cols, mask_c, mask = _tile(rows, 0, g, M, S, BS)
        _, v, w, gate, _, _, _, _ = _prep(
            x_ptr, z_ptr, x_ptr, w_ptr, rows, cols, mask, mask_c, D, s_xm, s_zm,
            HAS_Z, HAS_W, NORM_BEFORE_GATE, False, ACC,
        )  # fmt: skip
        rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / S + eps)
        y = _fwd_out(v, w, gate, rstd, HAS_Z, HAS_W, NORM_BEFORE_GATE)
        _store_rows(y_ptr, rows, cols, mask, D, y)
    else:
        ss = tl.zeros((BM,), dtype=ACC)
        for c in range(NC):
            cols, mask_c, mask = _tile(rows, c, g, M, S, BS)
            _, v, _, _, _, _, _, _ = _prep(
                x_ptr, z_ptr, x_ptr, w_ptr, rows, cols, mask, mask_c, D, s_xm, s_zm,
                HAS_Z, HAS_W, NORM_BEFORE_GATE, False, ACC,
            )  # fmt: skip
            ss += tl.sum(v * v, axis=1)
        rstd = 1.0 / tl.sqrt(ss / S + eps)
        for c in range(NC):
            cols, mask_c, mask = _tile(rows, c, g, M, S, BS)
            _, v, w, gate, _, _, _, _ = _prep(
                x_ptr, z_ptr, x_ptr, w_ptr, rows, cols, mask, mask_c, D, s_xm, s_zm,
                HAS_Z, HAS_W, NORM_BEFORE_GATE, False, ACC,
            )  # fmt: skip
            y = _fwd_out(v, w, gate, rstd, HAS_Z, HAS_W, NORM_BEFORE_GATE)
            _store_rows(y_ptr, rows, cols, mask, D, y)


@triton.jit
def _gated_rmsnorm_bwd_kernel(
    dy_ptr, x_ptr, z_ptr, w_ptr, dx_ptr, dz_ptr, dw_part_ptr, M, D, S, eps: tl.float64,
    s_xm, s_zm,
    HAS_Z: tl.constexpr, HAS_W: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    ACC: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, NC: tl.constexpr,
    ITERS: tl.constexpr,
):  # fmt: skip
    """Program (run r of ITERS row blocks, group g): dx and dz (M, D) contiguous, partial
    dweight (n_runs, D) in fp32 (or fp64); this program alone writes its row of partials (with
    NC > 1 column chunks it adds to it, so the buffer starts at zero). `eps` as forward."""
    eps = tl.full((), eps, ACC)
    r = tl.program_id(0)
    g = tl.program_id(1)
    dw_acc = tl.zeros((BS,), dtype=ACC)
    for i in range(ITERS):
        rows = (r * ITERS + i) * BM + tl.arange(0, BM)
        if NC == 1:
            cols, mask_c, mask = _tile(rows, 0, g, M, S, BS)
            x, v, w, gate, dsilu, dy, dyn, dxr = _prep(
                x_ptr, z_ptr, dy_ptr, w_ptr, rows, cols, mask, mask_c, D, s_xm, s_zm,
                HAS_Z, HAS_W, NORM_BEFORE_GATE, True, ACC,
            )  # fmt: skip
            rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / S + eps)
            cc = tl.sum(dxr * v, axis=1) * rstd / S
            dx, dz, dw = _bwd_out(x, v, w, gate, dsilu, dy, dyn, dxr, rstd, cc, HAS_Z, HAS_W,
                                  NORM_BEFORE_GATE)  # fmt: skip
            _store_rows(dx_ptr, rows, cols, mask, D, dx)
            if HAS_Z:
                _store_rows(dz_ptr, rows, cols, mask, D, dz)
            dw_acc += dw
        else:
            ss = tl.zeros((BM,), dtype=ACC)
            sdv = tl.zeros((BM,), dtype=ACC)
            for c in range(NC):
                cols, mask_c, mask = _tile(rows, c, g, M, S, BS)
                _, v, _, _, _, _, _, dxr = _prep(
                    x_ptr, z_ptr, dy_ptr, w_ptr, rows, cols, mask, mask_c, D, s_xm, s_zm,
                    HAS_Z, HAS_W, NORM_BEFORE_GATE, True, ACC,
                )  # fmt: skip
                ss += tl.sum(v * v, axis=1)
                sdv += tl.sum(dxr * v, axis=1)
            rstd = 1.0 / tl.sqrt(ss / S + eps)
            cc = sdv * rstd / S
            for c in range(NC):
                cols, mask_c, mask = _tile(rows, c, g, M, S, BS)
                x, v, w, gate, dsilu, dy, dyn, dxr = _prep(
                    x_ptr, z_ptr, dy_ptr, w_ptr, rows, cols, mask, mask_c, D, s_xm, s_zm,
                    HAS_Z, HAS_W, NORM_BEFORE_GATE, True, ACC,
                )  # fmt: skip
                dx, dz, dw = _bwd_out(x, v, w, gate, dsilu, dy, dyn, dxr, rstd, cc, HAS_Z,
                                      HAS_W, NORM_BEFORE_GATE)  # fmt: skip
                _store_rows(dx_ptr, rows, cols, mask, D, dx)
                if HAS_Z:
                    _store_rows(dz_ptr, rows, cols, mask, D, dz)
                if HAS_W:
                    dw_ptrs = dw_part_ptr + r * D + cols
                    tl.store(dw_ptrs, tl.load(dw_ptrs, mask=mask_c) + dw, mask=mask_c)
    if HAS_W and NC == 1:
        cols, mask_c, _ = _tile(tl.arange(0, BM), 0, g, M, S, BS)
        tl.store(dw_part_ptr + r * D + cols, dw_acc, mask=mask_c)


# -- launchers -------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(group_size: int, backward: bool) -> tuple[int, int, int, int]:
    """(BM rows, BS columns, NC column chunks per group, num_warps) of a program. A group of
    up to MAX_COLS columns is one chunk, in tiles of about `elems` elements; a wider one is
    walked in chunks of LOOP_COLS columns, `loop_rows` rows at a time. The sizes keep the
    kernels under ~128 registers a thread on sm_90 (no spills). Under the interpreter, tiny
    blocks so that small tests take both paths."""
    if INTERPRETED:
        max_cols, loop_cols, loop_rows, elems, per_thread = 8, 8, 4, 32, 32
    elif backward:
        max_cols, loop_cols, loop_rows, elems, per_thread = 4096, LOOP_COLS, 2, 1024, 4
    else:
        max_cols, loop_cols, loop_rows, elems, per_thread = 8192, LOOP_COLS, 8, 4096, 16
    if group_size <= max_cols:
        BS = triton.next_power_of_2(group_size)
        BM = max(1, min(64, elems // BS))
    else:
        BS, BM = loop_cols, loop_rows
    num_warps = min(max(BM * BS // (32 * per_thread), 1), 16)
    return BM, BS, triton.cdiv(group_size, BS), num_warps


def _iters(n_mblocks: int, G: int, device: torch.device) -> int:
    """Row blocks per backward program: enough programs to fill the GPU, few partial sums.
    A function of the shape and device only, so the reduction order is fixed."""
    if INTERPRETED:
        return 2
    iters = (n_mblocks * G) // (4 * num_sms(device))
    return max(1, min(iters, 64, n_mblocks))


def _as_rows(t: Tensor, D: int) -> Tensor:
    """(..., D) -> (M, D) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: Tensor, z: Tensor | None, weight: Tensor | None, group_size: int) -> None:
    D = x.shape[-1]
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gated_rmsnorm: z {tuple(z.shape)} must match x {tuple(x.shape)}")
    if weight is not None and tuple(weight.shape) != (D,):
        raise ValueError(f"gated_rmsnorm: weight must have shape ({D},), got {tuple(weight.shape)}")
    if group_size <= 0 or D % group_size != 0:
        raise ValueError(f"rmsnorm: group_size ({group_size}) must divide the last dim ({D})")
    check_launchable(x, INTERPRETED, "gated_rmsnorm_triton")


def _gated_rmsnorm_fwd(
    x: Tensor, z: Tensor | None, weight: Tensor | None, eps: float, group_size: int,
    norm_before_gate: bool,
) -> Tensor:  # fmt: skip
    """x, z (..., D), weight (D) -> y (..., D) contiguous in x's dtype."""
    _check(x, z, weight, group_size)
    D = x.shape[-1]
    x2 = _as_rows(x, D)
    z2 = _as_rows(z, D) if z is not None else None
    M, G = x2.shape[0], D // group_size
    y = x.new_empty(x.shape)
    if M * D == 0:
        return y
    BM, BS, NC, num_warps = _blocks(group_size, backward=False)
    with device_guard(x):
        _gated_rmsnorm_fwd_kernel[(triton.cdiv(M, BM), G)](
            x2, z2, weight, y, M, D, group_size, eps, x2.stride(0),
            z2.stride(0) if z2 is not None else 0,
            HAS_Z=z is not None, HAS_W=weight is not None, NORM_BEFORE_GATE=norm_before_gate,
            ACC=_acc_dtype(x.dtype), BM=BM, BS=BS, NC=NC, num_warps=num_warps,
        )  # fmt: skip
    return y


def _gated_rmsnorm_bwd(
    dy: Tensor, x: Tensor, z: Tensor | None, weight: Tensor | None, eps: float,
    group_size: int, norm_before_gate: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """dy (..., D) -> (dx (..., D), dz (..., D) or None, dweight (D) or None)."""
    _check(x, z, weight, group_size)
    if dy.shape != x.shape:
        raise ValueError(f"gated_rmsnorm bwd: dy {tuple(dy.shape)} must match x {tuple(x.shape)}")
    D = x.shape[-1]
    x2 = _as_rows(x, D)
    z2 = _as_rows(z, D) if z is not None else None
    dy2 = dy.reshape(-1, D).contiguous()
    M, G = x2.shape[0], D // group_size
    dx = x.new_empty(x.shape)
    dz = z.new_empty(z.shape) if z is not None else None
    BM, BS, NC, num_warps = _blocks(group_size, backward=True)
    n_mblocks = triton.cdiv(M, BM)
    iters = _iters(n_mblocks, G, x.device)
    n_runs = triton.cdiv(n_mblocks, iters)
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    dw_part = x.new_zeros(n_runs, D, dtype=acc_t) if weight is not None else None
    if M * D > 0:
        with device_guard(x):
            _gated_rmsnorm_bwd_kernel[(n_runs, G)](
                dy2, x2, z2, weight, dx, dz, dw_part, M, D, group_size, eps, x2.stride(0),
                z2.stride(0) if z2 is not None else 0,
                HAS_Z=z is not None, HAS_W=weight is not None,
                NORM_BEFORE_GATE=norm_before_gate, ACC=_acc_dtype(x.dtype), BM=BM, BS=BS,
                NC=NC, ITERS=iters, num_warps=num_warps,
            )  # fmt: skip
    dw = dw_part.sum(0).to(weight.dtype) if dw_part is not None else None
    return dx, dz, dw


# -- ops and autograd ------------------------------------------------------------------------


def _gated_rmsnorm_fwd_impl(
    x: Tensor, z: Tensor | None, weight: Tensor | None, eps: float, group_size: int,
    norm_before_gate: bool,
) -> Tensor:  # fmt: skip
    return _gated_rmsnorm_fwd(x, z, weight, eps, group_size, norm_before_gate)


def _gated_rmsnorm_fwd_fake(x, z, weight, eps, group_size, norm_before_gate):
    return x.new_empty(x.shape)


def _gated_rmsnorm_bwd_impl(
    dy: Tensor, x: Tensor, z: Tensor | None, weight: Tensor | None, eps: float,
    group_size: int, norm_before_gate: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """-> (dx, dz, dweight); absent inputs get distinct empty tensors (custom-op outputs may be
    neither None nor aliases)."""
    dx, dz, dw = _gated_rmsnorm_bwd(dy, x, z, weight, eps, group_size, norm_before_gate)
    return dx, dz if dz is not None else x.new_empty(0), dw if dw is not None else x.new_empty(0)


def _gated_rmsnorm_bwd_fake(dy, x, z, weight, eps, group_size, norm_before_gate):
    dz = z.new_empty(z.shape) if z is not None else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    return x.new_empty(x.shape), dz, dw


_gated_rmsnorm_fwd_op = library_op(
    "gated_rmsnorm_fwd", _gated_rmsnorm_fwd_impl, _gated_rmsnorm_fwd_fake
)
_gated_rmsnorm_bwd_op = library_op(
    "gated_rmsnorm_bwd", _gated_rmsnorm_bwd_impl, _gated_rmsnorm_bwd_fake
)


def _setup_context(ctx, inputs, output) -> None:
    x, z, weight, eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, z, weight)
    ctx.args = (eps, group_size, norm_before_gate)


def _backward(ctx, dy):
    x, z, weight = ctx.saved_tensors
    dx, dz, dw = _gated_rmsnorm_bwd_op(dy, x, z, weight, *ctx.args)
    return dx, dz if z is not None else None, dw if weight is not None else None, None, None, None


_gated_rmsnorm = differentiable(_gated_rmsnorm_fwd_op, _setup_context, _backward)


# -- public functions ------------------------------------------------------------------------


def gated_rmsnorm_triton(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    eps: float = 1e-5,
    *,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Gated RMSNorm per group of `group_size` channels in Triton; same arguments and results as
    `gated_rmsnorm_ref`.

    Args:
        x: (..., D). z: (..., D) gate or None. weight: (D) or None.
        group_size: channels per group (D // n_groups); None means the whole last dim.
        norm_before_gate: gate after normalising instead of before.
    Returns:
        (..., D) in x's dtype, contiguous. Differentiable in x, z and weight; the backward is
        deterministic. Computes in fp32 (fp64 for fp64 inputs).
    """
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"gated_rmsnorm_triton: x must be a float tensor, got {x.dtype}")
    group_size = group_size if group_size is not None else x.shape[-1]
    _check(x, z, weight, group_size)
    return _gated_rmsnorm(x, z, weight, float(eps), int(group_size), bool(norm_before_gate))


def rmsnorm_triton(x: Tensor, weight: Tensor | None, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dim in Triton: x (..., D), weight (D) or None -> (..., D) in x's
    dtype; same results as `rmsnorm_ref`."""
    return gated_rmsnorm_triton(x, None, weight, eps)


__all__ = ["INTERPRETED", "gated_rmsnorm_triton", "rmsnorm_triton"]
