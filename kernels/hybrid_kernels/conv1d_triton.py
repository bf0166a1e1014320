"""Depthwise causal conv1d (kernel width K <= 4) with fused SiLU, in Triton: forward and a
deterministic backward. Channels-last, semantics of `hybrid_kernels.conv1d_ref.causal_conv1d_ref`
(causal-conv1d's `causal_conv1d_fn`): bias, `seq_idx` document boundaries, initial and final
states.

    a_t = bias + sum_k w[:, k] * xp_{t-W+k} * [doc(t-W+k) == doc(t)],    y_t = silu(a_t) or a_t

where xp is x padded on the left by the W = K-1 initial states (zeros without them); padded
positions belong to the document at position 0.

Kernels, top-down:

* `_conv1d_fwd_kernel` — one program per (batch, block of positions, block of channels) computes
  the K taps from K shifted loads (the overlap is served by the cache), adds the bias, applies
  SiLU and stores y. The program of the last position block also writes the final states (the
  last W inputs; those of documents other than the last one are zero).
* `_conv1d_bwd_kernel` — one program per (batch, run of position blocks, block of channels).
  For each position p it gathers dxp_p = sum_s w[:, W-s] * da_{p+s} (+ the final-state gradient),
  recomputing the pre-activation a (and so da = dy * silu'(a)) at the shifted positions instead
  of storing it; it accumulates the weight and bias gradients of its run in registers and writes
  them as partial sums, which `torch.sum` reduces in a fixed order: the backward is deterministic
  (no atomics). The programs of the first run also write the initial-state gradient.

Ops (`torch.library`, namespace `hybrid_kernels`, see `_triton_utils.library_op`):
`causal_conv1d_fwd` and `causal_conv1d_bwd`, with fake implementations, called through an
autograd Function, so `torch.compile` traces `causal_conv1d_triton` as opaque nodes with their
backward.

Shape legend: B batch, L length, D channels, K width, W = K - 1, and in kernels BL/BD/BW the
position/channel/state blocks. Computation is in fp32 (fp64 for fp64 inputs).
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
from hybrid_kernels.conv1d_ref import _check_activation, _check_shapes

INTERPRETED = interpreting()  # how this module's kernels were decorated (see _triton_utils)
MAX_K = 4  # the weight-gradient accumulator holds up to 4 taps


# -- kernels ---------------------------------------------------------------------------------


@triton.jit
def _xp_tile(x_ptr, init_ptr, b, p, d, mask_d, L, s_xb, s_xl, s_xd, s_ib, s_id, s_iw,
             W: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Padded input at positions p (BL) x channels d (BD): x for 0 <= p < L, the initial states
    for -W <= p < 0, zero elsewhere."""
    p64 = p.to(tl.int64)
    in_x = (p >= 0) & (p < L)
    off = b * s_xb + p64[:, None] * s_xl + d[None, :] * s_xd
    v = tl.load(x_ptr + off, mask=in_x[:, None] & mask_d[None, :], other=0.0).to(ACC)
    if HAS_INIT:
        in_i = (p < 0) & (p >= -W)
        off_i = b * s_ib + d[None, :] * s_id + (p64 + W)[:, None] * s_iw
        v += tl.load(init_ptr + off_i, mask=in_i[:, None] & mask_d[None, :], other=0.0).to(ACC)
    return v


@triton.jit
def _doc(seq_ptr, b, p, L, s_sb, s_sl):
    """Document id of positions p (BL); padded positions (p < 0) take that of position 0."""
    q = tl.minimum(tl.maximum(p, 0), L - 1).to(tl.int64)
    return tl.load(seq_ptr + b * s_sb + q * s_sl)


@triton.jit
def _pre_act(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, b, q, d, mask_d, L,
             s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl,
             K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
             HAS_INIT: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Pre-activation a at positions q (BL) x channels d (BD), in ACC."""
    W: tl.constexpr = K - 1
    acc = tl.zeros((q.shape[0], d.shape[0]), dtype=ACC)
    if HAS_SEQ:
        doc_q = _doc(seq_ptr, b, q, L, s_sb, s_sl)
    for k in tl.static_range(K):
        p = q - W + k
        v = _xp_tile(x_ptr, init_ptr, b, p, d, mask_d, L, s_xb, s_xl, s_xd, s_ib, s_id, s_iw,
                     W, HAS_INIT, ACC)  # fmt: skip
        if HAS_SEQ:
            same = _doc(seq_ptr, b, p, L, s_sb, s_sl) == doc_q
            v = tl.where(same[:, None], v, 0.0)
        w_k = tl.load(w_ptr + d * s_wd + k * s_wk, mask=mask_d, other=0.0).to(ACC)
        acc += v * w_k[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, y_ptr, final_ptr,
    L, D, s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
    SILU: tl.constexpr, ACC: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
    BW: tl.constexpr,
):  # fmt: skip
    """Program (b, position block, channel block): y (B, L, D) contiguous; the last position
    block also writes the final states (B, D, W) contiguous."""
    W: tl.constexpr = K - 1
    b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    t = pid_l * BL + tl.arange(0, BL)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    mask_d = d < D
    a = _pre_act(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, b, t, d, mask_d, L,
                 s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl,
                 K, HAS_BIAS, HAS_SEQ, HAS_INIT, ACC)  # fmt: skip
    if SILU:
        a = a / (1.0 + tl.exp(-a))  # silu; tl.sigmoid is fp32 on GPU even for fp64
    off_y = (b * L + t.to(tl.int64))[:, None] * D + d[None, :]
    tl.store(y_ptr + off_y, a.to(y_ptr.dtype.element_ty), mask=(t < L)[:, None] & mask_d[None, :])
    if W > 0:  # noqa: SIM102 (a compile-time test around a run-time one)
        if pid_l == tl.num_programs(1) - 1:
            j = tl.arange(0, BW)
            p = L - W + j
            v = _xp_tile(x_ptr, init_ptr, b, p, d, mask_d, L, s_xb, s_xl, s_xd, s_ib, s_id, s_iw,
                         W, HAS_INIT, ACC)  # fmt: skip
            if HAS_SEQ:
                last = _doc(seq_ptr, b, L - 1 + 0 * j, L, s_sb, s_sl)
                v = tl.where((_doc(seq_ptr, b, p, L, s_sb, s_sl) == last)[:, None], v, 0.0)
            off_f = (b * D + d[None, :]) * W + j[:, None]
            mask_f = (j < W)[:, None] & mask_d[None, :]
            tl.store(final_ptr + off_f, v.to(final_ptr.dtype.element_ty), mask=mask_f)


@triton.jit
def _da(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dy_ptr, da_ptr, b, q, d, mask_d, L, D,
        s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
        SILU: tl.constexpr, DA_MEM: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Gradient of the pre-activation at positions q (zero outside 0 <= q < L): read from
    `da_ptr` (B, L, D) when DA_MEM, else recomputed from dy and, with the SiLU, x."""
    valid = (q >= 0) & (q < L)
    off = (b * L + q.to(tl.int64))[:, None] * D + d[None, :]
    if DA_MEM:
        return tl.load(da_ptr + off, mask=valid[:, None] & mask_d[None, :], other=0.0).to(ACC)
    g = tl.load(dy_ptr + off, mask=valid[:, None] & mask_d[None, :], other=0.0).to(ACC)
    if SILU:
        a = _pre_act(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, b, q, d, mask_d, L,
                     s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl,
                     K, HAS_BIAS, HAS_SEQ, HAS_INIT, ACC)  # fmt: skip
        sig = 1.0 / (1.0 + tl.exp(-a))
        g = g * sig * (1.0 + a * (1.0 - sig))
    return g


@triton.jit
def _dxp(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dy_ptr, da_ptr, dfinal_ptr, b, p, d,
         mask_d, L, D, s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl, s_fb, s_fd,
         s_fw, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
         HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, SILU: tl.constexpr,
         DA_MEM: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Gradient of the padded input at positions p (BL): sum over the outputs that read it,
    plus the final-state gradient. Also returns da at p (the s = 0 term)."""
    W: tl.constexpr = K - 1
    acc = tl.zeros((p.shape[0], d.shape[0]), dtype=ACC)
    da0 = tl.zeros((p.shape[0], d.shape[0]), dtype=ACC)
    if HAS_SEQ:
        doc_p = _doc(seq_ptr, b, p, L, s_sb, s_sl)
    for s in tl.static_range(K):
        q = p + s
        g = _da(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dy_ptr, da_ptr, b, q, d, mask_d, L,
                D, s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl,
                K, HAS_BIAS, HAS_SEQ, HAS_INIT, SILU, DA_MEM, ACC)  # fmt: skip
        if s == 0:
            da0 = g
        if HAS_SEQ:
            g = tl.where((_doc(seq_ptr, b, q, L, s_sb, s_sl) == doc_p)[:, None], g, 0.0)
        w_k = tl.load(w_ptr + d * s_wd + (W - s) * s_wk, mask=mask_d, other=0.0).to(ACC)
        acc += g * w_k[None, :]
    if HAS_DFINAL:
        j = p - (L - W)
        in_f = (j >= 0) & (j < W) & (p < L)
        off = b * s_fb + d[None, :] * s_fd + j.to(tl.int64)[:, None] * s_fw
        g = tl.load(dfinal_ptr + off, mask=in_f[:, None] & mask_d[None, :], other=0.0).to(ACC)
        if HAS_SEQ:
            last = _doc(seq_ptr, b, L - 1 + 0 * p, L, s_sb, s_sl)
            g = tl.where((doc_p == last)[:, None], g, 0.0)
        acc += g
    return acc, da0


@triton.jit
def _conv1d_da_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dy_ptr, da_ptr, L, D,
    s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
    ACC: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Program (b, position block, channel block): the pre-activation gradient da = dy *
    silu'(a) into `da_ptr` (B, L, D), so the backward reads it K times instead of recomputing
    the convolution K times."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BL + tl.arange(0, BL)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    mask_d = d < D
    g = _da(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dy_ptr, da_ptr, b, t, d, mask_d, L, D,
            s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl,
            K, HAS_BIAS, HAS_SEQ, HAS_INIT, True, False, ACC)  # fmt: skip
    off = (b * L + t.to(tl.int64))[:, None] * D + d[None, :]
    tl.store(da_ptr + off, g.to(da_ptr.dtype.element_ty), mask=(t < L)[:, None] & mask_d[None, :])


@triton.jit
def _conv1d_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dy_ptr, da_ptr, dfinal_ptr,
    dx_ptr, dinit_ptr, dw_part_ptr, db_part_ptr,
    L, D, n_runs,
    s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw, s_sb, s_sl, s_fb, s_fd, s_fw,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_DFINAL: tl.constexpr, SILU: tl.constexpr, DA_MEM: tl.constexpr, ACC: tl.constexpr,
    BL: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    """Program (b, run r of ITERS position blocks, channel block): dx (B, L, D) contiguous,
    partial dweight (B * n_runs, K, D) and dbias (B * n_runs, D) in fp32 (or fp64); the
    programs of run 0 also write dinit (B, D, W)."""
    W: tl.constexpr = K - 1
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    mask_d = d < D
    kk = tl.arange(0, BK)
    # per-row accumulators, reduced over rows once at the end (a reduction across the rows of a
    # tile synchronises the warps; doing it every iteration made this kernel 10x slower)
    dw_acc = tl.zeros((BK, BL, BD), dtype=ACC)
    db_acc = tl.zeros((BL, BD), dtype=ACC)
    for i in range(ITERS):
        t = (r * ITERS + i) * BL + tl.arange(0, BL)
        dxv, da = _dxp(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dy_ptr, da_ptr, dfinal_ptr,
                       b, t, d, mask_d, L, D, s_xb, s_xl, s_xd, s_wd, s_wk, s_ib, s_id, s_iw,
                       s_sb, s_sl, s_fb, s_fd, s_fw, K, HAS_BIAS, HAS_SEQ, HAS_INIT,
                       HAS_DFINAL, SILU, DA_MEM, ACC)  # fmt: skip
        off = (b * L + t.to(tl.int64))[:, None] * D + d[None, :]
        tl.store(dx_ptr + off, dxv.to(dx_ptr.dtype.element_ty),
                 mask=(t < L)[:, None] & mask_d[None, :])  # fmt: skip
        db_acc += da
        if HAS_SEQ:
            doc_t = _doc(seq_ptr, b, t, L, s_sb, s_sl)
        for k in tl.static_range(K):
            p = t - W + k
            v = _xp_tile(x_ptr, init_ptr, b, p, d, mask_d, L, s_xb, s_xl, s_xd, s_ib, s_id,
                         s_iw, W, HAS_INIT, ACC)  # fmt: skip
            if HAS_SEQ:
                v = tl.where((_doc(seq_ptr, b, p, L, s_sb, s_sl) == doc_t)[:, None], v, 0.0)
            dw_acc += tl.where(kk[:, None, None] == k, (da * v)[None, :, :], 0.0)
    part = b * n_runs + r
    off_w = (part * K + kk[:, None]) * D + d[None, :]
    tl.store(dw_part_ptr + off_w, tl.sum(dw_acc, axis=1), mask=(kk < K)[:, None] & mask_d[None, :])
    if HAS_BIAS:
        tl.store(db_part_ptr + part * D + d, tl.sum(db_acc, axis=0), mask=mask_d)
    if HAS_INIT:  # noqa: SIM102 (a compile-time test around a run-time one)
        if r == 0:
            p = tl.arange(0, BW) - W
            dxv, _ = _dxp(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dy_ptr, da_ptr,
                          dfinal_ptr, b, p, d, mask_d, L, D, s_xb, s_xl, s_xd, s_wd, s_wk, s_ib,
                          s_id, s_iw, s_sb, s_sl, s_fb, s_fd, s_fw, K, HAS_BIAS, HAS_SEQ,
                          HAS_INIT, HAS_DFINAL, SILU, DA_MEM, ACC)  # fmt: skip
            off_i = (b * D + d[None, :]) * W + (p + W)[:, None]
            tl.store(dinit_ptr + off_i, dxv.to(dinit_ptr.dtype.element_ty),
                     mask=(p < 0)[:, None] & mask_d[None, :])  # fmt: skip


# -- launchers -------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(D: int, W: int) -> tuple[int, int, int]:
    """(BL, BD, BW): 8 positions x 128 channels per program of 4 warps, which compiles for sm_90
    to 64 (forward) and ~150 (backward) registers a thread without spills; small blocks under
    the interpreter so that tiny tests cross block edges."""
    BW = max(triton.next_power_of_2(max(W, 1)), 2)
    if INTERPRETED:
        return 8, 16, BW
    return 8, min(128, max(16, triton.next_power_of_2(D))), BW


def _iters(batch: int, n_lblocks: int, n_dblocks: int, device: torch.device) -> int:
    """Position blocks per backward program: enough programs to fill the GPU, few partial sums.
    A function of the shape and device only, so the reduction order is fixed."""
    if INTERPRETED:
        return 2
    programs_wanted = 4 * num_sms(device)
    iters = (batch * n_lblocks * n_dblocks) // programs_wanted
    return max(1, min(iters, 16, n_lblocks))


def _strides(x: Tensor, weight: Tensor, seq_idx: Tensor | None, init: Tensor | None) -> list:
    return [
        *x.stride(),
        *weight.stride(),
        *(init.stride() if init is not None else (0, 0, 0)),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
    ]


def _conv1d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    seq_idx: Tensor | None,
    initial_states: Tensor | None,
    silu: bool,
) -> tuple[Tensor, Tensor]:
    """x (B, L, D), weight (D, K) -> (y (B, L, D), final states (B, D, K-1)), both in x's dtype."""
    _check_shapes(x, weight, bias, seq_idx, initial_states)
    check_launchable(x, INTERPRETED, "causal_conv1d_triton")
    batch, L, D = x.shape
    K = weight.shape[1]
    W = K - 1
    y = x.new_empty(batch, L, D)
    final = x.new_empty(batch, D, W)
    if batch * L * D == 0:  # nothing to convolve; with L = 0 the final states are the initial
        return y, initial_states.clone() if initial_states is not None else final.zero_()
    BL, BD, BW = _blocks(D, W)
    grid = (batch, triton.cdiv(L, BL), triton.cdiv(D, BD))
    with device_guard(x):
        _conv1d_fwd_kernel[grid](
            x, weight, bias, seq_idx, initial_states, y, final,
            L, D, *_strides(x, weight, seq_idx, initial_states),
            K=K, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
            HAS_INIT=initial_states is not None, SILU=silu, ACC=_acc_dtype(x.dtype),
            BL=BL, BD=BD, BW=BW, num_warps=4,
        )  # fmt: skip
    return y, final


def _conv1d_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    seq_idx: Tensor | None,
    initial_states: Tensor | None,
    dy: Tensor,
    dfinal: Tensor | None,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients (dx (B, L, D), dweight (D, K), dbias (D) or None, dinit (B, D, K-1) or None)
    from dy (B, L, D) and the final-state gradient dfinal (B, D, K-1) or None."""
    _check_shapes(x, weight, bias, seq_idx, initial_states)
    check_launchable(x, INTERPRETED, "causal_conv1d_triton")
    batch, L, D = x.shape
    K = weight.shape[1]
    W = K - 1
    if tuple(dy.shape) != (batch, L, D):
        raise ValueError(f"causal_conv1d bwd: dy must be {(batch, L, D)}, got {tuple(dy.shape)}")
    if dfinal is not None and tuple(dfinal.shape) != (batch, D, W):
        raise ValueError(f"causal_conv1d bwd: dfinal must be {(batch, D, W)}")
    dy = dy.contiguous()
    if batch * L * D == 0:
        dinit = None
        if initial_states is not None:
            dinit = (
                torch.zeros_like(initial_states)
                if dfinal is None
                else dfinal.to(x.dtype, copy=True)
            )
        db = torch.zeros_like(bias) if bias is not None else None
        return torch.zeros_like(dy, dtype=x.dtype), torch.zeros_like(weight), db, dinit
    has_dfinal = dfinal is not None and W > 0
    BL, BD, BW = _blocks(D, W)
    n_lblocks, n_dblocks = triton.cdiv(L, BL), triton.cdiv(D, BD)
    iters = _iters(batch, n_lblocks, n_dblocks, x.device)
    n_runs = triton.cdiv(n_lblocks, iters)
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.empty_like(dy, dtype=x.dtype)
    dinit = initial_states.new_empty(batch, D, W) if initial_states is not None else None
    dw_part = x.new_empty(batch * n_runs, K, D, dtype=acc_t)
    db_part = x.new_empty(batch * n_runs, D, dtype=acc_t) if bias is not None else None
    grid = (batch, n_runs, n_dblocks)
    strides = _strides(x, weight, seq_idx, initial_states)
    flags = dict(K=K, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
                 HAS_INIT=initial_states is not None, ACC=_acc_dtype(x.dtype))  # fmt: skip
    da = None
    with device_guard(x):
        if silu:  # the SiLU's gradient needs the convolution: compute it once, not K times
            da = torch.empty(batch, L, D, device=x.device, dtype=acc_t)
            _conv1d_da_kernel[(batch, n_lblocks, n_dblocks)](
                x, weight, bias, seq_idx, initial_states, dy, da, L, D, *strides,
                BL=BL, BD=BD, num_warps=4, **flags,
            )  # fmt: skip
        _conv1d_bwd_kernel[grid](
            x, weight, bias, seq_idx, initial_states, dy, da, dfinal if has_dfinal else None,
            dx, dinit, dw_part, db_part, L, D, n_runs, *strides,
            *(dfinal.stride() if has_dfinal else (0, 0, 0)),
            HAS_DFINAL=has_dfinal, SILU=silu, DA_MEM=da is not None,
            BL=BL, BD=BD, BW=BW, BK=MAX_K, ITERS=iters, num_warps=4, **flags,
        )  # fmt: skip
    dweight = dw_part.sum(0).t().to(weight.dtype).contiguous()
    dbias = db_part.sum(0).to(bias.dtype) if db_part is not None else None
    return dx, dweight, dbias, dinit


# -- ops and autograd ------------------------------------------------------------------------


def _conv1d_fwd_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    seq_idx: Tensor | None,
    initial_states: Tensor | None,
    silu: bool,
) -> tuple[Tensor, Tensor]:
    return _conv1d_fwd(x, weight, bias, seq_idx, initial_states, silu)


def _conv1d_fwd_fake(x, weight, bias, seq_idx, initial_states, silu):
    batch, L, D = x.shape
    return x.new_empty(batch, L, D), x.new_empty(batch, D, weight.shape[1] - 1)


def _conv1d_bwd_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    seq_idx: Tensor | None,
    initial_states: Tensor | None,
    dy: Tensor,
    dfinal: Tensor | None,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias, dinit); absent inputs get distinct empty tensors (custom-op
    outputs may be neither None nor aliases)."""
    dx, dw, db, dinit = _conv1d_bwd(x, weight, bias, seq_idx, initial_states, dy, dfinal, silu)
    empty = x.new_empty(0)
    return dx, dw, db if db is not None else empty, dinit if dinit is not None else empty.clone()


def _conv1d_bwd_fake(x, weight, bias, seq_idx, initial_states, dy, dfinal, silu):
    batch, L, D = x.shape
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    dinit = initial_states.new_empty(initial_states.shape) if initial_states is not None else None
    return (
        x.new_empty(batch, L, D),
        weight.new_empty(weight.shape),
        db,
        dinit if dinit is not None else x.new_empty(0),
    )


_conv1d_fwd_op = library_op("causal_conv1d_fwd", _conv1d_fwd_impl, _conv1d_fwd_fake)
_conv1d_bwd_op = library_op("causal_conv1d_bwd", _conv1d_bwd_impl, _conv1d_bwd_fake)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, seq_idx, initial_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu


def _backward(ctx, dy, dfinal):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dw, db, dinit = _conv1d_bwd_op(
        x, weight, bias, seq_idx, initial_states, dy, dfinal, ctx.silu
    )
    return (
        dx,
        dw,
        db if bias is not None else None,
        None,
        dinit if initial_states is not None else None,
        None,
    )


_conv1d = differentiable(_conv1d_fwd_op, _setup_context, _backward)


# -- public function -------------------------------------------------------------------------


def causal_conv1d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    seq_idx: Tensor | None = None,
    activation: str | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal conv1d in Triton; same arguments and results as `causal_conv1d_ref`.

    Args:
        x: (B, L, D), any strides (channels-last with unit channel stride is fastest).
        weight: (D, K), 1 <= K <= 4. bias: (D). seq_idx: (B, L) integer document ids.
        activation: None or "silu" ("swish" is an alias). initial_states: (B, D, K-1), the
        K-1 inputs before position 0 (oldest first).
    Returns:
        y (B, L, D) in x's dtype; with `return_final_states` also the last K-1 inputs
        (B, D, K-1) in x's dtype (inputs of documents other than the last are zero).
    Differentiable in x, weight, bias and initial_states; the backward is deterministic.
    Computes in fp32 (fp64 for fp64 inputs).
    """
    _check_shapes(x, weight, bias, seq_idx, initial_states)
    _check_activation(activation)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"causal_conv1d_triton: x must be a float tensor, got {x.dtype}")
    if seq_idx is not None and (seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool):
        raise ValueError(f"causal_conv1d_triton: seq_idx must be integer, got {seq_idx.dtype}")
    if initial_states is not None:
        initial_states = initial_states.to(x.dtype)
    y, final = _conv1d(x, weight, bias, seq_idx, initial_states, activation is not None)
    return (y, final) if return_final_states else y


__all__ = ["INTERPRETED", "causal_conv1d_triton"]
