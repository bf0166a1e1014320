"""Mamba-2 SSD scan in Triton: forward and a deterministic backward (no atomics).

Semantics are those of `hybrid_kernels.ssd_ref.ssd_chunked_ref` (and mamba_ssm's
`mamba_chunk_scan_combined`): dt processing (bias, softplus, clamp), A (H), B and C per group,
D (H) or (H, P), optional z gate, initial and final states, `seq_idx` document boundaries.

Kernels, top-down:

* `_ssd_scan_fwd_kernel` — one program per (batch, head, block of P) walks the chunks in order,
  keeping the running state (P x N, fp32) in registers. Per chunk it computes the intra-chunk
  quadratic form (C B^T masked by the decay), adds the entering state's contribution C h, and
  updates the state with the chunk's own inputs. The forward therefore reads x, dt, B, C once
  and writes only y (and the final state): no per-chunk states go to memory. With
  `STORE_STATES` it instead writes the state entering every chunk, which the backward uses.
* `_chunk_cb_kernel` — C B^T of every chunk and group, read by the walk when N is large.
* `_ssd_chunk_y_kernel` — the split forward's second half: every chunk's y at once from the
  states a walk with `STORE_STATES` wrote (a tuner candidate next to the single walk).
* `_ssd_dstate_bwd_kernel` — the same walk in reverse for the state gradient: it writes the
  gradient flowing into each chunk's end state and returns the initial-state gradient.
* `_ssd_dbc_bwd_kernel` — one program per (split of a group's heads, chunk, block of N)
  accumulates dB and dC over the heads of its split in registers, and (by default) sums over
  its N block the two terms of the entering state that dx needs.
* `_ssd_dx_bwd_kernel` — one program per (chunk, head): dx, ddt (through softplus/clamp), dz,
  and partial sums of dA and dD. Partial sums over splits, N blocks, chunks and batch are
  reduced in a fixed order (`torch.sum`), so two backward passes give bitwise-equal gradients.

Offsets are 32-bit unless a tensor spans 2^31 elements or more (long sequences, wide in_proj
views, per-chunk states at large N): then the launchers set I64 and the kernels widen the batch,
head and group indices and the positions, from which every offset is built (`_needs_i64`).

The kernels chunk the sequence in blocks of `KERNEL_CHUNK` positions, whatever `chunk_size` the
caller gives: the SSD result does not depend on the chunk size.

Shape legend: B batch, L length, H heads, P head dim, G groups, R heads per group, N state size,
C chunks, Q positions of a chunk (rows), S positions of a chunk (columns).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid_kernels._triton_utils import differentiable, library_op
from hybrid_kernels._tuning import LaunchTuner
from hybrid_kernels.ssd_ref import _check_shapes

KERNEL_CHUNK = 64  # chunk of the backward kernels (and of the states they recompute)
FWD_CHUNK = 64  # chunk of the forward scan
CB_MIN_N = 256  # from this N on, the forward walk reads C B^T computed once per chunk and group
SPLIT_MIN_N = 256  # from this N on, the walks hold their state as two N halves
DEFAULT_DT_LIMIT = (0.0, math.inf)
_GRID_YZ = 65535  # CUDA's limit on a grid's second and third dimensions


@triton.jit
def _process_dt(dt, bias, dt_min, dt_max, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr):
    """dt + bias -> (softplus? and clamp?, derivative of that with respect to dt)."""
    grad = tl.full(dt.shape, 1.0, tl.float32)
    u = dt + bias
    if SOFTPLUS:
        e = tl.exp(tl.minimum(u, 20.0))
        sp = tl.where(u <= 20.0, tl.log(1.0 + e), u)
        grad = tl.where(u <= 20.0, e / (1.0 + e), 1.0)
        u = sp
    if CLAMP:
        inside = (u >= dt_min) & (u <= dt_max)
        grad = tl.where(inside, grad, 0.0)
        u = tl.minimum(tl.maximum(u, dt_min), dt_max)
    return u, grad


@triton.jit
def _pos(c, Q: tl.constexpr, I64: tl.constexpr):
    """Positions of chunk c; int64 with I64, so that offsets built from them (and from the
    batch index, which `_index` widens too) are 64-bit."""
    if I64:
        c = tl.cast(c, tl.int64)
    return c * Q + tl.arange(0, Q)


@triton.jit
def _index(i, I64: tl.constexpr):
    """`i` as int64 with I64 (tensors of 2^31 elements or more), else as it is."""
    if I64:
        i = tl.cast(i, tl.int64)
    return i


@triton.jit
def _chunk_head(nchunks, R, HEADS_FIRST: tl.constexpr, I64: tl.constexpr):
    """(b, c, h, g, b * C + c) of a program over (h, b * C + c), or over (b * C + c, h)
    without HEADS_FIRST."""
    if HEADS_FIRST:
        h = tl.program_id(0)
        pid_bc = tl.program_id(1)
    else:
        pid_bc = tl.program_id(0)
        h = tl.program_id(1)
    h = _index(h, I64)  # (h times a head stride passes 2^31 in head-major views)
    return _index(pid_bc // nchunks, I64), pid_bc % nchunks, h, h // R, pid_bc


@triton.jit
def _load_chunk_dt(
    dt_ptr, dtb_ptr, b, h, c, L, H, dt_min, dt_max,
    Q: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    I64: tl.constexpr,
):  # fmt: skip
    """Chunk c of head h from a contiguous raw dt (B, L, H): (pos, valid, processed dt (zero
    past L), d processed / d raw). Positions are int64 with I64 (`_needs_i64`)."""
    pos = _pos(c, Q, I64)
    valid = pos < L
    raw = tl.load(dt_ptr + (b * L + pos) * H + h, mask=valid, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_DTB:
        bias = tl.load(dtb_ptr + h).to(tl.float32)
    dt, grad = _process_dt(raw, bias, dt_min, dt_max, SOFTPLUS, CLAMP)
    return pos, valid, tl.where(valid, dt, 0.0), grad


@triton.jit
def _last(v, offs, Q: tl.constexpr):
    """The value at the last position of a chunk vector."""
    return tl.sum(tl.where(offs == Q - 1, v, 0.0), axis=0)


@triton.jit
def _o_off(b, pos, h, offs_p, L, H, P):
    """Offsets into a contiguous (B, L, H, P) tensor for rows `pos` of head h."""
    return ((b * L + pos[:, None]) * H + h) * P + offs_p[None, :]


@triton.jit
def _cb_off(b, c, g, offs_q, nchunks, G, Q: tl.constexpr):
    """Offsets of chunk c, group g in a contiguous (B, C, G, Q, Q) tensor of C B^T."""
    return (((b * nchunks + c) * G + g) * Q + offs_q[:, None]) * Q + offs_q[None, :]


@triton.jit
def _st_off(b, c, h, offs_p, offs_n, nchunks, H, P, N):
    """Offsets into a contiguous (B, C, H, P, N) per-chunk state tensor."""
    return (((b * nchunks + c) * H + h) * P + offs_p[:, None]) * N + offs_n[None, :]


@triton.jit
def _load_d(D_ptr, h, P, offs_p, mask_p, HAS_D: tl.constexpr, D_PER_P: tl.constexpr):
    """D of head h as a (1, BP) row (D per (H, P)) or a scalar (D per H); 0 without D."""
    Dv = 0.0
    if HAS_D:
        if D_PER_P:
            Dv = tl.load(D_ptr + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
    return Dv


@triton.jit
def _store_y(y, xm, Dv, y_ptr, ypre_ptr, z_ptr, b, pos, h, offs_p, row_mask, L, H, P,
             s_z_b, s_z_l, s_z_h, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
             WRITE_YPRE: tl.constexpr):  # fmt: skip
    """Store a chunk's y (Q, BP) of head h: plus D x, kept before the gate with WRITE_YPRE,
    then gated by z * sigmoid(z)."""
    if HAS_D:
        y += xm.to(tl.float32) * Dv
    o_off = _o_off(b, pos, h, offs_p, L, H, P)
    if HAS_Z:
        if WRITE_YPRE:
            tl.store(ypre_ptr + o_off, y.to(ypre_ptr.dtype.element_ty), mask=row_mask)
        z_off = b * s_z_b + pos[:, None] * s_z_l + h * s_z_h + offs_p[None, :]
        zv = tl.load(z_ptr + z_off, mask=row_mask, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + o_off, y.to(y_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _walk_start(init_ptr, ends_ptr, decay_ptr, glob_off, mask_pn, b, h, seg, n_seg, seg_size, H,
                HAS_INIT: tl.constexpr, CHAIN: tl.constexpr, BP: tl.constexpr,
                BN: tl.constexpr):  # fmt: skip
    """The state entering segment `seg` at the (P, N) places `glob_off` of a (B, H, P, N) state:
    the initial state (or zero), carried through the first pass's segment ends with CHAIN."""
    if HAS_INIT:
        state = tl.load(init_ptr + glob_off, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BP, BN), dtype=tl.float32)
    if CHAIN:
        for j in range(0, seg):
            j_off = (b * n_seg + j).to(tl.int64)
            end = tl.load(ends_ptr + j_off * seg_size + glob_off - b * seg_size, mask=mask_pn,
                          other=0.0)  # fmt: skip
            state = state * tl.load(decay_ptr + j_off * H + h) + end
    return state


@triton.jit
def _walk_end(final_ptr, state, glob_off, mask_pn, b, seg, n_seg, seg_size,
              WRITE_DECAY: tl.constexpr, WRITE_FINAL: tl.constexpr):  # fmt: skip
    """Store the state leaving a segment: per segment (first pass) or the final one."""
    if WRITE_DECAY:
        seg_off = (b * n_seg + seg).to(tl.int64) * seg_size + glob_off - b * seg_size
        tl.store(final_ptr + seg_off, state, mask=mask_pn)
    elif WRITE_FINAL:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if seg == n_seg - 1:
            tl.store(final_ptr + glob_off, state, mask=mask_pn)


@triton.jit
def _ssd_scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, init_ptr, seq_ptr, cb_ptr,
    y_ptr, ypre_ptr, final_ptr, states_ptr, decay_ptr, ends_ptr,
    L, H, P, N, R, G, nchunks, seg_chunks, n_seg, dt_min, dt_max,
    s_x_b, s_x_l, s_x_h, s_B_b, s_B_l, s_B_g, s_z_b, s_z_l, s_z_h,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_YPRE: tl.constexpr, STORE_STATES: tl.constexpr,
    WRITE_FINAL: tl.constexpr, WRITE_DECAY: tl.constexpr, HAS_CB: tl.constexpr,
    CHAIN: tl.constexpr, NS: tl.constexpr,
    Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, I64: tl.constexpr,
    BH_AXIS: tl.constexpr,
):  # fmt: skip
    """Program (P block, b * H + h, segment): walk the segment's chunks, carrying the state in
    registers. Segments of `seg_chunks` chunks let several programs walk one sequence (`n_seg`
    of them): a first pass (WRITE_DECAY, from a zero state) stores each segment's end state
    (B, n_seg, H, P, N) in `final_ptr` and the factor (B, n_seg, H) by which the segment scales
    the state entering it; the second pass (CHAIN) starts segment s from the initial state
    (B, H, P, N) carried through the end states and decays of segments 0 .. s-1 (`ends_ptr`,
    `decay_ptr`), and its last segment writes the final state (B, H, P, N).
    With NS = 2 the state is held as two (BP, BN / 2) halves, s0 and s1, and B and C are read
    and consumed half by half: fewer registers are live at once (N = 256 spilled otherwise)."""
    pid_p = tl.program_id(1 - BH_AXIS)  # BH_AXIS 0: more than 65535 sequences x heads
    pid_bh = tl.program_id(BH_AXIS)
    seg = tl.program_id(2)
    c_start = seg * seg_chunks
    c_end = tl.minimum(c_start + seg_chunks, nchunks)
    b = _index(pid_bh // H, I64)
    h = _index(pid_bh % H, I64)
    g = h // R
    offs_q = tl.arange(0, Q)
    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < P
    offs_n0 = tl.arange(0, BN // NS)
    mask_n0 = offs_n0 < N
    mask_pn0 = mask_p[:, None] & mask_n0[None, :]
    A = tl.load(A_ptr + h).to(tl.float32)
    glob_p = ((b * H + h) * P + offs_p[:, None]) * N  # (B, H, P, N) without the N offset
    seg_size = H * P * N
    s0 = _walk_start(init_ptr, ends_ptr, decay_ptr, glob_p + offs_n0[None, :], mask_pn0, b, h,
                     seg, n_seg, seg_size, H, HAS_INIT, CHAIN, BP, BN // NS)  # fmt: skip
    if NS == 2:
        offs_n1 = BN // 2 + offs_n0
        mask_n1 = offs_n1 < N
        mask_pn1 = mask_p[:, None] & mask_n1[None, :]
        s1 = _walk_start(init_ptr, ends_ptr, decay_ptr, glob_p + offs_n1[None, :], mask_pn1, b,
                         h, seg, n_seg, seg_size, H, HAS_INIT, CHAIN, BP, BN // 2)  # fmt: skip
    if HAS_SEQ:
        prev_doc = tl.load(seq_ptr + b * L + tl.maximum(c_start * Q - 1, 0))
    Dv = _load_d(D_ptr, h, P, offs_p, mask_p, HAS_D, D_PER_P)
    causal = offs_q[:, None] >= offs_q[None, :]
    decay = 1.0
    for c in range(c_start, c_end):
        pos, valid, dt, _ = _load_chunk_dt(
            dt_ptr, dtb_ptr, b, h, c, L, H, dt_min, dt_max, Q, HAS_DTB, SOFTPLUS, CLAMP, I64
        )
        cs = tl.cumsum(dt * A, axis=0)
        cl = _last(cs, offs_q, Q)
        row_mask = valid[:, None] & mask_p[None, :]
        x_off = b * s_x_b + pos[:, None] * s_x_l + h * s_x_h + offs_p[None, :]
        xm = tl.load(x_ptr + x_off, mask=row_mask, other=0.0)
        bc_row = b * s_B_b + pos[:, None] * s_B_l + g * s_B_g  # + the N offsets
        bc_mask0 = valid[:, None] & mask_n0[None, :]
        if STORE_STATES:
            st_p = (((b * nchunks + c) * H + h) * P + offs_p[:, None]) * N  # (B, C, H, P, N)
            tl.store(states_ptr + st_p + offs_n0[None, :],
                     s0.to(states_ptr.dtype.element_ty), mask=mask_pn0)  # fmt: skip
            if NS == 2:
                tl.store(states_ptr + st_p + offs_n1[None, :],
                         s1.to(states_ptr.dtype.element_ty), mask=mask_pn1)  # fmt: skip
        w = tl.exp(cl - cs) * dt
        if HAS_SEQ:
            seq = tl.load(seq_ptr + b * L + tl.minimum(pos, L - 1))
            seq_last = tl.max(seq, axis=0)
            w = tl.where(seq == seq_last, w, 0.0)
        if WRITE_Y:
            # off = C h (the entering state's part), and C B^T unless it is read, per N half
            C0 = tl.load(C_ptr + bc_row + offs_n0[None, :], mask=bc_mask0, other=0.0)
            off = tl.dot(C0, tl.trans(s0.to(C0.dtype)), input_precision=PREC)
            if not HAS_CB:
                B0 = tl.load(B_ptr + bc_row + offs_n0[None, :], mask=bc_mask0, other=0.0)
                CB = tl.dot(C0, tl.trans(B0), input_precision=PREC)
            if NS == 2:
                bc_mask1 = valid[:, None] & mask_n1[None, :]
                C1 = tl.load(C_ptr + bc_row + offs_n1[None, :], mask=bc_mask1, other=0.0)
                off = tl.dot(C1, tl.trans(s1.to(C1.dtype)), acc=off, input_precision=PREC)
                if not HAS_CB:
                    B1 = tl.load(B_ptr + bc_row + offs_n1[None, :], mask=bc_mask1, other=0.0)
                    CB = tl.dot(C1, tl.trans(B1), acc=CB, input_precision=PREC)
            if HAS_CB:
                CB = tl.load(cb_ptr + _cb_off(b, c, g, offs_q, nchunks, G, Q))
            keep = causal
            if HAS_SEQ:
                keep = keep & (seq[:, None] == seq[None, :])
            scale = tl.exp(cs)
            if HAS_SEQ:
                scale = tl.where(seq == prev_doc, scale, 0.0)
            M = CB * tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf"))) * dt[None, :]
            y = tl.dot(M.to(xm.dtype), xm, acc=off * scale[:, None], input_precision=PREC)
            _store_y(y, xm, Dv, y_ptr, ypre_ptr, z_ptr, b, pos, h, offs_p, row_mask, L, H, P,
                     s_z_b, s_z_l, s_z_h, HAS_D, HAS_Z, WRITE_YPRE)  # fmt: skip
        xw = tl.trans((xm.to(tl.float32) * w[:, None]).to(xm.dtype))
        carry = tl.exp(cl)
        if HAS_SEQ:
            carry = tl.where(seq_last == prev_doc, carry, 0.0)
            prev_doc = seq_last
        # B is read only now when C B^T came precomputed: B and C are never live together.
        if HAS_CB or not WRITE_Y:
            B0 = tl.load(B_ptr + bc_row + offs_n0[None, :], mask=bc_mask0, other=0.0)
        s0 = tl.dot(xw, B0, acc=s0 * carry, input_precision=PREC)
        if NS == 2:
            if HAS_CB or not WRITE_Y:
                bc_mask1 = valid[:, None] & mask_n1[None, :]
                B1 = tl.load(B_ptr + bc_row + offs_n1[None, :], mask=bc_mask1, other=0.0)
            s1 = tl.dot(xw, B1, acc=s1 * carry, input_precision=PREC)
        decay = decay * carry
    _walk_end(final_ptr, s0, glob_p + offs_n0[None, :], mask_pn0, b, seg, n_seg, seg_size,
              WRITE_DECAY, WRITE_FINAL)  # fmt: skip
    if NS == 2:
        _walk_end(final_ptr, s1, glob_p + offs_n1[None, :], mask_pn1, b, seg, n_seg, seg_size,
                  WRITE_DECAY, WRITE_FINAL)  # fmt: skip
    if WRITE_DECAY:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if pid_p == 0:
            tl.store(decay_ptr + (b * n_seg + seg) * H + h, decay)


@triton.jit
def _chunk_cb_kernel(
    B_ptr, C_ptr, cb_ptr, L, N, G, nchunks, s_B_b, s_B_l, s_B_g,
    Q: tl.constexpr, BNK: tl.constexpr, PREC: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Program (b * C + c, g): C B^T of chunk c and group g into a (B, C, G, Q, Q) tensor,
    contracting N in blocks of BNK; rows and columns past L are zero. B and C share strides."""
    pid_bc = tl.program_id(0)
    g = tl.program_id(1)
    b = _index(pid_bc // nchunks, I64)
    c = pid_bc % nchunks
    g = _index(g, I64)
    offs_q = tl.arange(0, Q)
    pos = _pos(c, Q, I64)
    valid = pos < L
    CB = tl.zeros((Q, Q), dtype=tl.float32)
    for n0 in range(0, N, BNK):
        offs_n = n0 + tl.arange(0, BNK)
        mask = valid[:, None] & (offs_n < N)[None, :]
        off = b * s_B_b + pos[:, None] * s_B_l + g * s_B_g + offs_n[None, :]
        Cm = tl.load(C_ptr + off, mask=mask, other=0.0)
        Bm = tl.load(B_ptr + off, mask=mask, other=0.0)
        CB += tl.dot(Cm, tl.trans(Bm), input_precision=PREC)
    tl.store(cb_ptr + _cb_off(b, c, g, offs_q, nchunks, G, Q), CB)


@triton.jit
def _ssd_chunk_y_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, seq_ptr, states_ptr, cb_ptr,
    y_ptr, ypre_ptr,
    L, H, P, N, R, G, nchunks, dt_min, dt_max,
    s_x_b, s_x_l, s_x_h, s_B_b, s_B_l, s_B_g, s_z_b, s_z_l, s_z_h,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, HAS_SEQ: tl.constexpr,
    WRITE_YPRE: tl.constexpr, HAS_CB: tl.constexpr, HEADS_FIRST: tl.constexpr,
    Q: tl.constexpr, BP: tl.constexpr, BNK: tl.constexpr, PREC: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Program (h, b * C + c), or (b * C + c, h) without HEADS_FIRST: y of chunk c and head h
    from the state entering the chunk, read from `states` (B, C, H, P, N) that a state-only
    walk stored: y = C h scaled by the decay from the chunk's start, plus the masked C B^T x,
    plus D x, gated by z. The chunks are independent, so all run at once (the split forward:
    one short walk, then this). The same sums as the walk's y, which also rounds the state to
    the inputs' dtype for its product. With HEADS_FIRST a chunk's heads run side by side and
    share its C (and C B^T) in the L2."""
    b, c, h, g, _ = _chunk_head(nchunks, R, HEADS_FIRST, I64)
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BP)
    mask_p = offs_p < P
    A = tl.load(A_ptr + h).to(tl.float32)
    pos, valid, dt, _ = _load_chunk_dt(
        dt_ptr, dtb_ptr, b, h, c, L, H, dt_min, dt_max, Q, HAS_DTB, SOFTPLUS, CLAMP, I64
    )
    row_mask = valid[:, None] & mask_p[None, :]
    off = tl.zeros((Q, BP), dtype=tl.float32)  # C h, over N in blocks of BNK
    if HAS_CB:
        CB = tl.load(cb_ptr + _cb_off(b, c, g, offs_q, nchunks, G, Q))
    else:
        CB = tl.zeros((Q, Q), dtype=tl.float32)
    for n0 in range(0, N, BNK):
        offs_n = n0 + tl.arange(0, BNK)
        mask_n = offs_n < N
        bc_off = b * s_B_b + pos[:, None] * s_B_l + g * s_B_g + offs_n[None, :]
        Cm = tl.load(C_ptr + bc_off, mask=valid[:, None] & mask_n[None, :], other=0.0)
        st = tl.load(states_ptr + _st_off(b, c, h, offs_p, offs_n, nchunks, H, P, N),
                     mask=mask_p[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
        off = tl.dot(Cm, tl.trans(st.to(Cm.dtype)), acc=off, input_precision=PREC)
        if not HAS_CB:
            Bm = tl.load(B_ptr + bc_off, mask=valid[:, None] & mask_n[None, :], other=0.0)
            CB = tl.dot(Cm, tl.trans(Bm), acc=CB, input_precision=PREC)
    cs = tl.cumsum(dt * A, axis=0)
    keep = offs_q[:, None] >= offs_q[None, :]
    scale = tl.exp(cs)
    if HAS_SEQ:
        seq = tl.load(seq_ptr + b * L + tl.minimum(pos, L - 1))
        prev_doc = tl.load(seq_ptr + b * L + tl.maximum(c * Q - 1, 0))
        keep = keep & (seq[:, None] == seq[None, :])
        scale = tl.where(seq == prev_doc, scale, 0.0)
    x_off = b * s_x_b + pos[:, None] * s_x_l + h * s_x_h + offs_p[None, :]
    xm = tl.load(x_ptr + x_off, mask=row_mask, other=0.0)
    M = CB * tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf"))) * dt[None, :]
    y = tl.dot(M.to(xm.dtype), xm, acc=off * scale[:, None], input_precision=PREC)
    Dv = _load_d(D_ptr, h, P, offs_p, mask_p, HAS_D, D_PER_P)
    _store_y(y, xm, Dv, y_ptr, ypre_ptr, z_ptr, b, pos, h, offs_p, row_mask, L, H, P,
             s_z_b, s_z_l, s_z_h, HAS_D, HAS_Z, WRITE_YPRE)  # fmt: skip


@triton.jit
def _ssd_dstate_bwd_kernel(
    dy_ptr, z_ptr, dt_ptr, A_ptr, C_ptr, dtb_ptr, seq_ptr, dfinal_ptr, dstates_ptr, dinit_ptr,
    L, H, P, N, R, nchunks, dt_min, dt_max,
    s_B_b, s_B_l, s_B_g, s_z_b, s_z_l, s_z_h,
    HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr, WRITE_DINIT: tl.constexpr,
    NS: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
    I64: tl.constexpr, BH_AXIS: tl.constexpr,
):  # fmt: skip
    """dstates[c] = d loss / d (state at the end of chunk c), walking the chunks backwards.
    With NS = 2 the gradient is held and updated as two N halves (as the forward walk)."""
    pid_p = tl.program_id(1 - BH_AXIS)  # BH_AXIS 0: more than 65535 sequences x heads
    pid_bh = tl.program_id(BH_AXIS)
    b = _index(pid_bh // H, I64)
    h = _index(pid_bh % H, I64)
    g = h // R
    offs_q = tl.arange(0, Q)
    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < P
    offs_n0 = tl.arange(0, BN // NS)
    mask_pn0 = mask_p[:, None] & (offs_n0 < N)[None, :]
    A = tl.load(A_ptr + h).to(tl.float32)
    fin_p = ((b * H + h) * P + offs_p[:, None]) * N  # (B, H, P, N) without the N offset
    if HAS_DFINAL:
        dH0 = tl.load(dfinal_ptr + fin_p + offs_n0[None, :], mask=mask_pn0, other=0.0)
    else:
        dH0 = tl.zeros((BP, BN // NS), dtype=tl.float32)
    if NS == 2:
        offs_n1 = BN // 2 + offs_n0
        mask_pn1 = mask_p[:, None] & (offs_n1 < N)[None, :]
        if HAS_DFINAL:
            dH1 = tl.load(dfinal_ptr + fin_p + offs_n1[None, :], mask=mask_pn1, other=0.0)
        else:
            dH1 = tl.zeros((BP, BN // 2), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        st_p = (((b * nchunks + c) * H + h) * P + offs_p[:, None]) * N  # (B, C, H, P, N)
        tl.store(dstates_ptr + st_p + offs_n0[None, :],
                 dH0.to(dstates_ptr.dtype.element_ty), mask=mask_pn0)  # fmt: skip
        if NS == 2:
            tl.store(dstates_ptr + st_p + offs_n1[None, :],
                     dH1.to(dstates_ptr.dtype.element_ty), mask=mask_pn1)  # fmt: skip
        pos, valid, dt, _ = _load_chunk_dt(
            dt_ptr, dtb_ptr, b, h, c, L, H, dt_min, dt_max, Q, HAS_DTB, SOFTPLUS, CLAMP, I64
        )
        cs = tl.cumsum(dt * A, axis=0)
        cl = _last(cs, offs_q, Q)
        row_mask = valid[:, None] & mask_p[None, :]
        dy = tl.load(dy_ptr + _o_off(b, pos, h, offs_p, L, H, P), mask=row_mask, other=0.0)
        dy = dy.to(tl.float32)
        if HAS_Z:
            z_off = b * s_z_b + pos[:, None] * s_z_l + h * s_z_h + offs_p[None, :]
            zv = tl.load(z_ptr + z_off, mask=row_mask, other=0.0).to(tl.float32)
            dy = dy * zv * tl.sigmoid(zv)
        scale = tl.exp(cs)
        carry = tl.exp(cl)
        if HAS_SEQ:
            seq = tl.load(seq_ptr + b * L + tl.minimum(pos, L - 1))
            prev_doc = tl.load(seq_ptr + b * L + tl.maximum(c * Q - 1, 0))
            scale = tl.where(seq == prev_doc, scale, 0.0)
            carry = tl.where(tl.max(seq, axis=0) == prev_doc, carry, 0.0)
        bc_row = b * s_B_b + pos[:, None] * s_B_l + g * s_B_g  # + the N offsets
        C0 = tl.load(C_ptr + bc_row + offs_n0[None, :],
                     mask=valid[:, None] & (offs_n0 < N)[None, :], other=0.0)  # fmt: skip
        dys = tl.trans((dy * scale[:, None]).to(C0.dtype))
        dH0 = tl.dot(dys, C0, acc=dH0 * carry, input_precision=PREC)
        if NS == 2:
            C1 = tl.load(C_ptr + bc_row + offs_n1[None, :],
                         mask=valid[:, None] & (offs_n1 < N)[None, :], other=0.0)  # fmt: skip
            dH1 = tl.dot(dys, C1, acc=dH1 * carry, input_precision=PREC)
    if WRITE_DINIT:
        tl.store(dinit_ptr + fin_p + offs_n0[None, :], dH0, mask=mask_pn0)
        if NS == 2:
            tl.store(dinit_ptr + fin_p + offs_n1[None, :], dH1, mask=mask_pn1)


@triton.jit
def _chunk_decays(seq_ptr, b, c, pos, L, cs, cl, offs_q, Q: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Decays of one chunk and head, document masks applied: E (Q, S) intra-chunk, gS (into
    the chunk's end state), scale (from the entering state), carry (entering -> end state)."""
    keep = offs_q[:, None] >= offs_q[None, :]
    gS = tl.exp(cl - cs)
    scale = tl.exp(cs)
    carry = tl.exp(cl)
    if HAS_SEQ:
        seq = tl.load(seq_ptr + b * L + tl.minimum(pos, L - 1))
        seq_last = tl.max(seq, axis=0)
        prev_doc = tl.load(seq_ptr + b * L + tl.maximum(c * Q - 1, 0))
        keep = keep & (seq[:, None] == seq[None, :])
        gS = tl.where(seq == seq_last, gS, 0.0)
        scale = tl.where(seq == prev_doc, scale, 0.0)
        carry = tl.where(seq_last == prev_doc, carry, 0.0)
    E = tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf")))
    return E, gS, scale, carry


@triton.jit
def _load_dy(dy_ptr, z_ptr, ypre_ptr, dz_ptr, o_off, z_off, row_mask, HAS_Z: tl.constexpr,
             WRITE_DZ: tl.constexpr):  # fmt: skip
    """dy of the ungated output (dy * silu(z)); with WRITE_DZ also stores dz."""
    dy = tl.load(dy_ptr + o_off, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + z_off, mask=row_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(zv)
        if WRITE_DZ:
            ypre = tl.load(ypre_ptr + o_off, mask=row_mask, other=0.0).to(tl.float32)
            dz = dy * ypre * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + o_off, dz.to(dz_ptr.dtype.element_ty), mask=row_mask)
        dy = dy * zv * sig
    return dy


@triton.jit
def _ssd_dx_bwd_kernel(
    x_ptr, dy_ptr, z_ptr, ypre_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dtb_ptr, seq_ptr,
    states_ptr, dstates_ptr, cb_ptr, csum_ptr, hsum_ptr, dx_ptr, dz_ptr, ddt_ptr, dA_ptr, dD_ptr,
    L, H, P, N, R, G, nchunks, NB, dt_min, dt_max,
    s_x_b, s_x_l, s_x_h, s_B_b, s_B_l, s_B_g, s_z_b, s_z_l, s_z_h,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_CB: tl.constexpr,
    SUMS: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BNK: tl.constexpr,
    PREC: tl.constexpr, HEADS_FIRST: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Program (b * C + c, h), or (h, b * C + c) with HEADS_FIRST (a chunk's heads run side
    by side and share its B and C in the L2): dx, dz, ddt (raw dt) of chunk c and head h, and
    the partial sums of dA (B * C, H) and dD (B * C, H, P). dB and dC are
    `_ssd_dbc_bwd_kernel`'s. Contractions over N run in blocks of BNK to keep the tiles small;
    with HAS_CB, C B^T is read from `_chunk_cb_kernel`'s (B, C, G, Q, Q) output instead.
    With SUMS the entering states are not read: the two terms that need them (the state
    part of d(cumsum) per position, and <dS, Hprev>) come summed over N by `_ssd_dbc_bwd_kernel`
    as NB partials each (its N blocks), so only the state gradients are contracted here."""
    b, c, h, g, pid_bc = _chunk_head(nchunks, R, HEADS_FIRST, I64)
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BP)
    mask_p = offs_p < P
    A = tl.load(A_ptr + h).to(tl.float32)
    pos, valid, dt, dgrad = _load_chunk_dt(
        dt_ptr, dtb_ptr, b, h, c, L, H, dt_min, dt_max, Q, HAS_DTB, SOFTPLUS, CLAMP, I64
    )
    row_mask = valid[:, None] & mask_p[None, :]
    # N contractions: CB = C B^T (unless read), sB = B dS^T, CH = C Hprev^T, hs = <dS, Hprev>
    # (CH and hs: unless SUMS).
    if HAS_CB:
        CB = tl.load(cb_ptr + _cb_off(b, c, g, offs_q, nchunks, G, Q))
    else:
        CB = tl.zeros((Q, Q), dtype=tl.float32)
    sB = tl.zeros((Q, BP), dtype=tl.float32)
    CH = tl.zeros((Q, BP), dtype=tl.float32)
    hs = tl.zeros((BP,), dtype=tl.float32)
    for n0 in range(0, N, BNK):
        offs_n = n0 + tl.arange(0, BNK)
        mask_n = offs_n < N
        bc_off = b * s_B_b + pos[:, None] * s_B_l + g * s_B_g + offs_n[None, :]
        Bm = tl.load(B_ptr + bc_off, mask=valid[:, None] & mask_n[None, :], other=0.0)
        if not HAS_CB or not SUMS:
            Cm = tl.load(C_ptr + bc_off, mask=valid[:, None] & mask_n[None, :], other=0.0)
        st_off = _st_off(b, c, h, offs_p, offs_n, nchunks, H, P, N)
        if not SUMS:
            Hprev = tl.load(states_ptr + st_off, mask=mask_p[:, None] & mask_n[None, :],
                            other=0.0)  # fmt: skip
        dS = tl.load(dstates_ptr + st_off, mask=mask_p[:, None] & mask_n[None, :], other=0.0)
        if not HAS_CB:
            CB += tl.dot(Cm, tl.trans(Bm), input_precision=PREC)
        sB += tl.dot(Bm, tl.trans(dS.to(Bm.dtype)), input_precision=PREC)
        if not SUMS:
            CH += tl.dot(Cm, tl.trans(Hprev.to(Cm.dtype)), input_precision=PREC)
            hs += tl.sum(dS.to(tl.float32) * Hprev.to(tl.float32), axis=1)
    cs = tl.cumsum(dt * A, axis=0)
    cl = _last(cs, offs_q, Q)
    E, gS, scale, carry = _chunk_decays(seq_ptr, b, c, pos, L, cs, cl, offs_q, Q, HAS_SEQ)
    if SUMS:  # dB/dC's partial sums over its N blocks, in a fixed order
        batch = tl.num_programs(1 if HEADS_FIRST else 0) // nchunks
        dcs_state = tl.zeros((Q,), dtype=tl.float32)
        hs_all = 0.0
        for nb in range(NB):
            dcs_state += tl.load(csum_ptr + ((nb * batch + b) * L + pos) * H + h, mask=valid,
                                 other=0.0)  # fmt: skip
            hs_all += tl.load(hsum_ptr + ((nb * batch + b) * nchunks + c) * H + h)
    x_off = b * s_x_b + pos[:, None] * s_x_l + h * s_x_h + offs_p[None, :]
    o_off = _o_off(b, pos, h, offs_p, L, H, P)
    z_off = b * s_z_b + pos[:, None] * s_z_l + h * s_z_h + offs_p[None, :]
    xm = tl.load(x_ptr + x_off, mask=row_mask, other=0.0)
    dy = _load_dy(dy_ptr, z_ptr, ypre_ptr, dz_ptr, o_off, z_off, row_mask, HAS_Z, True)
    xf = xm.to(tl.float32)
    dyc = dy.to(xm.dtype)
    # Each (Q, Q) / (Q, P) tile is consumed as soon as it can be, to keep few of them live:
    # dcs (the derivative with respect to the in-chunk cumsum of dt * A) takes the entering
    # state's term first (CH), then the end state's (sB), the intra-chunk one last.
    if SUMS:
        dcs = dcs_state
    else:
        dcs = scale * tl.sum(dy * CH, axis=1)
    U = gS * dt * tl.sum(xf * sB, axis=1)
    # dx = dt * (intra + state terms) + D dy; ddt's explicit part is x . (those terms).
    CBE = CB * E
    gx = tl.dot(tl.trans(CBE.to(xm.dtype)), dyc, input_precision=PREC)
    gx += gS[:, None] * sB
    dx = dt[:, None] * gx
    ddt_x = tl.sum(xf * gx, axis=1)
    if HAS_D:
        dx += dy * _load_d(D_ptr, h, P, offs_p, mask_p, HAS_D, D_PER_P)
        tl.store(dD_ptr + (pid_bc * H + h) * P + offs_p, tl.sum(dy * xf, axis=0), mask=mask_p)
    tl.store(dx_ptr + o_off, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
    W = tl.dot(dyc, tl.trans(xm), input_precision=PREC) * CBE * dt[None, :]
    dcs += tl.sum(W, axis=1) - tl.sum(W, axis=0)
    dcs -= U
    if not SUMS:
        hs_all = tl.sum(hs, axis=0)
    at_end = tl.sum(U, axis=0) + carry * hs_all
    dcs += tl.where(offs_q == Q - 1, at_end, 0.0)
    da = tl.cumsum(dcs, axis=0, reverse=True)
    ddt = (ddt_x + A * da) * dgrad
    tl.store(ddt_ptr + (b * L + pos) * H + h, ddt, mask=valid)
    tl.store(dA_ptr + pid_bc * H + h, tl.sum(da * dt, axis=0))


@triton.jit
def _ssd_dbc_bwd_kernel(
    x_ptr, dy_ptr, z_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, dtb_ptr, seq_ptr,
    states_ptr, dstates_ptr, dB_ptr, dC_ptr, csum_ptr, hsum_ptr,
    L, H, P, N, R, G, nchunks, heads_per_split, dt_min, dt_max,
    s_x_b, s_x_l, s_x_h, s_B_b, s_B_l, s_B_g, s_z_b, s_z_l, s_z_h,
    HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    HAS_SEQ: tl.constexpr, WRITE_SUMS: tl.constexpr,
    Q: tl.constexpr, BP: tl.constexpr, BNB: tl.constexpr, PREC: tl.constexpr,
    ORDER: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Program (split, b * C + c, g * n_blocks + n_block) with ORDER 0, (g * n_blocks +
    n_block, split, b * C + c) with ORDER 1 (the N blocks that read the same x and dy run side
    by side), (b * C + c, split, g * n_blocks + n_block) with ORDER 2 (for more than 65535
    chunks in all, which only a grid's first axis holds):
    dB and dC of chunk c on one block of N, summed over the heads of one split of group g,
    into partials (splits, B, L, G, N) fp32. With WRITE_SUMS, per head and this N block
    also the dx kernel's terms of the entering state (which it then does not read):
    scale * sum_n C (dy Hprev)[:, n] per position into csum (n_blocks, B, L, H), and
    <dS, Hprev> into hsum (n_blocks, B, C, H)."""
    if ORDER == 0:
        pid_s, pid_bc, pid_gn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        batch = tl.num_programs(1) // nchunks
    elif ORDER == 1:
        pid_gn, pid_s, pid_bc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        batch = tl.num_programs(2) // nchunks
    else:
        pid_bc, pid_s, pid_gn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        batch = tl.num_programs(0) // nchunks
    n_blocks = tl.cdiv(N, BNB)
    g = _index(pid_gn // n_blocks, I64)
    nb = pid_gn % n_blocks
    b = _index(pid_bc // nchunks, I64)
    c = pid_bc % nchunks
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BP)
    offs_n = nb * BNB + tl.arange(0, BNB)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]
    pos = _pos(c, Q, I64)
    valid = pos < L
    row_mask = valid[:, None] & mask_p[None, :]
    bc_mask = valid[:, None] & mask_n[None, :]
    bc_off = b * s_B_b + pos[:, None] * s_B_l + g * s_B_g + offs_n[None, :]
    Bm = tl.load(B_ptr + bc_off, mask=bc_mask, other=0.0)
    Cm = tl.load(C_ptr + bc_off, mask=bc_mask, other=0.0)
    dB_acc = tl.zeros((Q, BNB), dtype=tl.float32)
    dC_acc = tl.zeros((Q, BNB), dtype=tl.float32)
    dCB_acc = tl.zeros((Q, Q), dtype=tl.float32)
    h_start = g * R + pid_s * heads_per_split
    h_end = tl.minimum(h_start + heads_per_split, (g + 1) * R)
    for h in range(h_start, h_end):
        A = tl.load(A_ptr + h).to(tl.float32)
        _, _, dt, _ = _load_chunk_dt(
            dt_ptr, dtb_ptr, b, h, c, L, H, dt_min, dt_max, Q, HAS_DTB, SOFTPLUS, CLAMP, I64
        )
        cs = tl.cumsum(dt * A, axis=0)
        cl = _last(cs, offs_q, Q)
        E, gS, scale, _ = _chunk_decays(seq_ptr, b, c, pos, L, cs, cl, offs_q, Q, HAS_SEQ)
        x_off = b * s_x_b + pos[:, None] * s_x_l + h * s_x_h + offs_p[None, :]
        o_off = _o_off(b, pos, h, offs_p, L, H, P)
        z_off = b * s_z_b + pos[:, None] * s_z_l + h * s_z_h + offs_p[None, :]
        xm = tl.load(x_ptr + x_off, mask=row_mask, other=0.0)
        dyc = _load_dy(dy_ptr, z_ptr, z_ptr, z_ptr, o_off, z_off, row_mask, HAS_Z, False)
        dyc = dyc.to(xm.dtype)
        st_off = _st_off(b, c, h, offs_p, offs_n, nchunks, H, P, N)
        Hprev = tl.load(states_ptr + st_off, mask=mask_pn, other=0.0)
        dS = tl.load(dstates_ptr + st_off, mask=mask_pn, other=0.0)
        if WRITE_SUMS:  # <dS, Hprev> as the trace of dS Hprev^T (no register copies)
            dSH = tl.dot(dS.to(xm.dtype), tl.trans(Hprev.to(xm.dtype)), input_precision=PREC)
            hs = tl.sum(tl.sum(tl.where(offs_p[:, None] == offs_p[None, :], dSH, 0.0), axis=1))
            tl.store(hsum_ptr + ((nb * batch + b) * nchunks + c) * H + h, hs)
        # the group's heads share B and C: sum d(C B^T) over heads, contract with B, C once
        dCB_acc += tl.dot(dyc, tl.trans(xm), input_precision=PREC) * E * dt[None, :]
        dyH = scale[:, None] * tl.dot(dyc, Hprev.to(xm.dtype), input_precision=PREC)
        dC_acc += dyH
        if WRITE_SUMS:
            sum_off = ((nb * batch + b) * L + pos) * H + h
            tl.store(csum_ptr + sum_off, tl.sum(dyH * Cm.to(tl.float32), axis=1), mask=valid)
        dB_acc += (gS * dt)[:, None] * tl.dot(xm, dS.to(xm.dtype), input_precision=PREC)
    dCB = dCB_acc.to(Bm.dtype)
    dC_acc += tl.dot(dCB, Bm, input_precision=PREC)
    dB_acc += tl.dot(tl.trans(dCB), Cm, input_precision=PREC)
    dst = (((pid_s * batch + b) * L + pos[:, None]) * G + g) * N + offs_n[None, :]
    tl.store(dB_ptr + dst, dB_acc, mask=bc_mask)
    tl.store(dC_ptr + dst, dC_acc, mask=bc_mask)


# -- launchers -------------------------------------------------------------------------------


def _blocks(P: int, N: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))


def _prec(dtype: torch.dtype) -> str:
    """fp32 inputs keep fp32 dot products (no TF32), so fp32 results match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


FORCE_I64 = False  # tests: run the 64-bit offset code at any size


def _span(t: Tensor) -> int:
    """Elements from a tensor's first to its last, strides included (a view spans its base)."""
    if t.is_contiguous() or t.numel() == 0:
        return t.numel()
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


def _needs_i64(*tensors: Tensor | None) -> bool:
    """Whether a kernel's offsets into these tensors may pass 2^31 - 1 elements (long
    sequences, wide in_proj views, per-chunk states at large N): then it computes them in 64
    bits (I64). Only then: 64-bit offsets cost registers the walks do not have to spare."""
    return FORCE_I64 or any(t is not None and _span(t) > 2**31 - 1 for t in tensors)


def _bh_axis(sequences_x_heads: int) -> int:
    """Grid axis of the walks' (sequence, head) programs: 1 (P blocks of one head side by side
    on axis 0), or 0 when there are more than a grid's second axis holds (65535)."""
    return 1 if sequences_x_heads <= _GRID_YZ else 0


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _Null()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _fwd_p_block(batch: int, H: int, BP_full: int, device: torch.device) -> int:
    """Block of P for the chunk-walking kernels: the smallest whose programs (batch x heads x
    P blocks) fit in one wave of two programs per SM, else the whole of P. Smaller blocks add
    parallelism for few sequences but recompute C B^T once per block."""
    slots = 2 * _sm_count(device)
    BP = 16
    while BP_full > BP and batch * H * triton.cdiv(BP_full, BP) > slots:
        BP *= 2
    return min(BP, BP_full)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any value gives the same results
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rows(t: Tensor | None) -> Tensor | None:
    """Make the last dim unit-stride (the kernels index rows by stride, columns densely)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _flags(D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool,
           dt_min: float, dt_max: float, seq_idx: Tensor | None) -> dict:  # fmt: skip
    return dict(
        HAS_D=D is not None,
        D_PER_P=D is not None and D.dim() == 2,
        HAS_Z=z is not None,
        HAS_DTB=dt_bias is not None,
        SOFTPLUS=dt_softplus,
        CLAMP=(dt_min, dt_max) != DEFAULT_DT_LIMIT,
        HAS_SEQ=seq_idx is not None,
    )


def _use_cb(N: int, cb: bool | None) -> bool:
    """Whether the forward walk takes C B^T from `_chunk_cb` (once per chunk and group) instead
    of recomputing it in every head's program: pays off when N is large (H100, B2 L8192 H256
    G8 N256: 3.18 ms against 4.4). The dx kernel measured faster recomputing it (session 3:
    6.0 ms against 7.0 or more), so it does by default; its tuner also tries reading it."""
    return cb if cb is not None else N >= CB_MIN_N


def _split_n(BN: int, split_n: bool | None) -> bool:
    """Whether the walk holds its state as two N halves (default from N = 256 on, where the
    whole (P, N) state, B and C tiles do not fit the registers together)."""
    want = BN >= SPLIT_MIN_N if split_n is None else split_n
    return want and BN >= 32  # halves of at least 16 (the dot products' smallest K)


def _chunk_cb(B: Tensor, C: Tensor, chunk: int) -> Tensor:
    """C B^T within every chunk and group: (B, nchunks, G, Q, Q) fp32, zero past L. One
    program per (chunk, group) reads B and C where they lie (no padded or fp32 copies)."""
    batch, L, G, N = B.shape
    nchunks = triton.cdiv(L, chunk)
    cb = torch.empty(batch, nchunks, G, chunk, chunk, device=B.device, dtype=torch.float32)
    with _device_ctx(B):
        _chunk_cb_kernel[(batch * nchunks, G)](
            B, C, cb, L, N, G, nchunks, B.stride(0), B.stride(1), B.stride(2),
            Q=chunk, BNK=min(64, max(16, triton.next_power_of_2(N))), PREC=_prec(B.dtype),
            I64=_needs_i64(B, C, cb),
        )  # fmt: skip
    return cb


def _scan_fwd(x, dt, A, B, C, D, z, dt_bias, init, seq_idx, dt_softplus, dt_min, dt_max,
              *, write_y: bool, write_ypre: bool, store_states: bool, chunk: int = FWD_CHUNK,
              block_p: int | None = None, segments: int | None = None, num_warps: int = 4,
              num_stages: int | None = None, cb: bool | None = None,
              split_n: bool | None = None, split_y: dict | None = None):  # fmt: skip
    """Launch `_ssd_scan_fwd_kernel`. Returns (y, ypre, final (B, H, P, N) fp32, states
    (B, C, H, P, N) entering each chunk of `chunk` positions when `store_states`).

    With few sequences x heads, the sequence is cut into segments walked in parallel (a
    two-level scan): a first launch gives each segment's end state from a zero start and its
    decay, a short loop here chains them into every segment's true start state, and a second
    launch walks the segments again from those starts.

    With `split_y` (keywords of `_chunk_y`) y is not computed by the walk: a walk that only
    carries the state stores it per chunk, and `_ssd_chunk_y_kernel` computes every chunk's y
    from it in parallel (the split forward).
    """
    if split_y is not None and write_y:
        walk = dict(chunk=chunk, block_p=block_p, segments=segments, split_n=split_n,
                    **_STATES_LAUNCH[B.shape[-1] >= CB_MIN_N])  # fmt: skip
        _, _, final, states = _scan_fwd(
            x, dt, A, B, C, None, None, dt_bias, init, seq_idx, dt_softplus, dt_min, dt_max,
            write_y=False, write_ypre=False, store_states=True, **walk,
        )  # fmt: skip
        y, ypre = _chunk_y(
            x, dt, A, B, C, D, z, dt_bias, seq_idx, states, dt_softplus, dt_min, dt_max,
            write_ypre=write_ypre, chunk=chunk, cb=_use_cb(B.shape[-1], cb), **split_y,
        )  # fmt: skip
        return y, ypre, final, states if store_states else None
    batch, L, H, P = x.shape
    G, N = B.shape[2:]
    nchunks = triton.cdiv(L, chunk)
    BPfull, BN = _blocks(P, N)
    if num_stages is None:  # software-pipelined loads pay off while two stages fit (N <= 128)
        num_stages = 2 if write_y and BN <= 128 else 1
    S = segments or _segments(batch, H, nchunks, x.device)
    BP = block_p or _fwd_p_block(batch * S, H, BPfull, x.device)
    seg_chunks = triton.cdiv(nchunks, S)
    S = triton.cdiv(nchunks, seg_chunks)
    f32 = dict(device=x.device, dtype=torch.float32)
    launch = functools.partial(
        _launch_scan, x, dt, A, B, C, D, z, dt_bias, seq_idx, dt_softplus, dt_min, dt_max,
        chunk=chunk, BP=BP, BN=BN, seg_chunks=seg_chunks, S=S, num_warps=num_warps,
        num_stages=num_stages, NS=2 if _split_n(BN, split_n) else 1,
    )  # fmt: skip
    CB = _chunk_cb(B, C, chunk) if write_y and _use_cb(N, cb) else None
    ends = decay = None
    if S > 1:  # the last segment's end is the final state, which the second pass writes
        ends = torch.empty(batch, S, H, P, N, **f32)
        decay = torch.empty(batch, S, H, **f32)
        launch(None, final=ends, decay=decay, programs=S - 1)
    y = torch.empty(batch, L, H, P, device=x.device, dtype=x.dtype) if write_y else None
    ypre = torch.empty_like(y) if write_ypre else None
    states = None
    if store_states:
        states = torch.empty(batch, nchunks, H, P, N, device=x.device, dtype=x.dtype)
    final = torch.empty(batch, H, P, N, **f32)
    launch(init, y=y, ypre=ypre, states=states, final=final, cb=CB, ends=ends, decay=decay)
    return y, ypre, final, states


def _launch_scan(x, dt, A, B, C, D, z, dt_bias, seq_idx, dt_softplus, dt_min, dt_max, init,
                 *, chunk, BP, BN, seg_chunks, S, num_warps, num_stages, NS, y=None, ypre=None,
                 states=None, final=None, decay=None, cb=None, ends=None,
                 programs=None):  # fmt: skip
    """One pass of `_ssd_scan_fwd_kernel` over `programs` (default S) segments: the first
    pass of a two-level walk when `decay` is given without `ends`, the second with `ends`."""
    batch, L, H, P = x.shape
    G, N = B.shape[2:]
    bh_axis = _bh_axis(batch * H)
    grid = (triton.cdiv(P, BP), batch * H)[:: 1 if bh_axis else -1] + (programs or S,)
    first_pass = decay is not None and ends is None
    with _device_ctx(x):
        _ssd_scan_fwd_kernel[grid](
            x, dt, A, B, C, D, z, dt_bias, init, seq_idx, cb, y, ypre, final, states, decay,
            ends, L, H, P, N, H // G, G, triton.cdiv(L, chunk), seg_chunks, S, dt_min, dt_max,
            x.stride(0), x.stride(1), x.stride(2),
            B.stride(0), B.stride(1), B.stride(2),
            *(z.stride()[:3] if z is not None else (0, 0, 0)),
            HAS_INIT=init is not None, WRITE_Y=y is not None, WRITE_YPRE=ypre is not None,
            STORE_STATES=states is not None, WRITE_FINAL=final is not None,
            WRITE_DECAY=first_pass, HAS_CB=cb is not None, CHAIN=ends is not None, NS=NS,
            Q=chunk, BP=BP, BN=BN, PREC=_prec(x.dtype),
            I64=_needs_i64(x, dt, B, C, z, init, seq_idx, cb, y, ypre, final, states, ends),
            BH_AXIS=bh_axis,
            **_flags(D, z, dt_bias, dt_softplus, dt_min, dt_max, seq_idx),
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip


def _chunk_y(x, dt, A, B, C, D, z, dt_bias, seq_idx, states, dt_softplus, dt_min, dt_max,
             *, write_ypre: bool, chunk: int, cb: bool, block_n: int = 128, num_warps: int = 4,
             num_stages: int = 2) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Launch `_ssd_chunk_y_kernel` over every (chunk, head): (y, ypre or None). `states`
    (B, C, H, P, N) are the states entering each chunk of `chunk` positions; `cb` reads
    C B^T from `_chunk_cb` instead of contracting it in every head's program."""
    batch, L, H, P = x.shape
    G, N = B.shape[2:]
    nchunks = triton.cdiv(L, chunk)
    BP, BN = _blocks(P, N)
    CB = _chunk_cb(B, C, chunk) if cb else None
    y = torch.empty(batch, L, H, P, device=x.device, dtype=x.dtype)
    ypre = torch.empty_like(y) if write_ypre and z is not None else None
    heads_first = batch * nchunks <= _GRID_YZ
    grid = (H, batch * nchunks) if heads_first else (batch * nchunks, H)
    with _device_ctx(x):
        _ssd_chunk_y_kernel[grid](
            x, dt, A, B, C, D, z, dt_bias, seq_idx, states, CB, y, ypre,
            L, H, P, N, H // G, G, nchunks, dt_min, dt_max,
            x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
            *(z.stride()[:3] if z is not None else (0, 0, 0)),
            WRITE_YPRE=ypre is not None, HAS_CB=cb, HEADS_FIRST=heads_first,
            Q=chunk, BP=BP, BNK=min(block_n, BN), PREC=_prec(x.dtype),
            I64=_needs_i64(x, dt, B, C, z, seq_idx, states, CB, y, ypre),
            **_flags(D, z, dt_bias, dt_softplus, dt_min, dt_max, seq_idx),
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return y, ypre


def _segments(batch: int, H: int, nchunks: int, device: torch.device) -> int:
    """Segments per sequence for the chunk walk: enough walks to fill two programs per SM, at
    most 8, each at least 16 chunks long."""
    slots = 2 * _sm_count(device)
    S = 1
    while S < 8 and batch * H * S * 2 <= slots and nchunks // (S * 2) >= 16:
        S *= 2
    return S


_WALK_TUNER = LaunchTuner("ssd forward walk", source=__file__)
# `_chunk_y` launches the tuner tries for the split forward (untimed: the N-block width, warps
# and load pipelining of a kernel that contracts C with a (P, N) state read from memory)
SPLIT_Y_LAUNCHES = (
    dict(block_n=128, num_warps=4, num_stages=2),
    dict(block_n=64, num_warps=4, num_stages=3),
    dict(block_n=128, num_warps=8, num_stages=2),
)
TUNE_MIN_CHUNKS = 16  # shorter sequences take the heuristic launch untimed


def _walk_configs(batch: int, H: int, nchunks: int, P: int, N: int, slots: int) -> list[dict]:
    """Launch candidates of the forward walk: the heuristic one first (`_segments`,
    `_fwd_p_block`, `_use_cb`, `_split_n`), then segments x P blocks x C B^T read or
    recomputed, and per segment count the other load-pipelining depth and (N >= 128) the
    state whole or in N halves, halves also on 8 warps; from N = 128 on also the split forward
    (`SPLIT_Y_LAUNCHES`, and the first with the other C B^T choice). Which wins depends on the
    GPU and on batch x heads x length (walks are latency-bound; more segments or smaller P
    blocks add programs, precomputed C B^T removes a product a step). Segment counts whose
    walks would more than fill the GPU's `slots` (two programs per SM) without them are not
    tried."""
    configs = [{}]
    if nchunks < TUNE_MIN_CHUNKS:
        return configs
    BPfull, BN = _blocks(P, N)
    for S in (1, 2, 4):
        if S > 1 and (nchunks // S < 8 or batch * H * S // 2 >= slots):
            continue
        for BP in sorted({min(32, BPfull), BPfull}):
            configs += [dict(segments=S, block_p=BP, cb=cb) for cb in (False, True)]
        # the other pipelining depth (default: 2 stages up to N = 128, else 1)
        configs.append(dict(segments=S, block_p=BPfull, cb=False, num_stages=1 + (N > 128)))
        if BN >= 128:  # the state held whole or in two N halves (the default's other choice)
            split = not _split_n(BN, None)
            configs.append(dict(segments=S, block_p=BPfull, split_n=split))
            if split or BN >= SPLIT_MIN_N:  # halves on 8 warps: fewer registers a thread
                configs.append(dict(segments=S, block_p=BPfull, split_n=True, num_warps=8))
    if BN >= 128:  # the split forward (state-only walk, then all chunks' y at once)
        configs += [dict(split_y=y) for y in SPLIT_Y_LAUNCHES]
        configs.append(dict(split_y=SPLIT_Y_LAUNCHES[0], cb=not _use_cb(N, None)))
        # at chunk 128: half the states to store and read, (128, 128) tiles on 8 warps
        configs.append(dict(split_y=dict(block_n=64, num_warps=8, num_stages=2), chunk=128))
    return configs


def _length_bucket(nchunks: int) -> int:
    """The chunk count rounded down to a power of two: lengths within one share their tuned
    launches, and the tuners' keys and candidate lists use it, not the exact count (a stored
    choice then means the same in every process)."""
    return 1 << (nchunks.bit_length() - 1)


def _tuned_fwd(x, dt, A, B, C, D, z, dt_bias, init, seq_idx, dt_softplus, dt_min, dt_max,
               write_ypre: bool):  # fmt: skip
    """`_scan_fwd` writing y, with the launch `_WALK_TUNER` measured fastest for this shape
    (on its first use on this GPU model, then from the tuner's cache; lengths share a choice
    within a power of two of chunks)."""
    batch, L, H, P = x.shape
    G, N = B.shape[2:]
    nchunks = _length_bucket(triton.cdiv(L, FWD_CHUNK))
    args = (x, dt, A, B, C, D, z, dt_bias, init, seq_idx, dt_softplus, dt_min, dt_max)
    kw = dict(write_y=True, write_ypre=write_ypre, store_states=False)
    key = (batch, H, P, G, N, nchunks, x.dtype, z is not None, seq_idx is not None,
           init is not None, write_ypre)  # fmt: skip
    configs = functools.partial(_walk_configs, batch, H, nchunks, P, N, 2 * _sm_count(x.device))
    best = _WALK_TUNER.choose(key, configs, lambda c: _scan_fwd(*args, **kw, **c), x.device)
    return _scan_fwd(*args, **kw, **best)


def _dstates(dy, dfinal, z, dt, A, C, dt_bias, seq_idx, dt_softplus, dt_min, dt_max, H, P,
             *, block_p: int | None = None, num_warps: int = 4, num_stages: int = 2,
             split_n: bool = False):  # fmt: skip
    """Launch `_ssd_dstate_bwd_kernel`. Returns (dstates (B, C, H, P, N), dinit fp32).
    `split_n` holds the gradient as two N halves (off by default: at N = 256 neither way
    spills since the gradient is updated in place, and the halves are not timed yet)."""
    batch, L = dt.shape[:2]
    G, N = C.shape[2:]
    Q = KERNEL_CHUNK
    nchunks = triton.cdiv(L, Q)
    BPfull, BN = _blocks(P, N)
    BP = block_p or _fwd_p_block(batch, H, BPfull, dy.device)
    dstates = torch.empty(batch, nchunks, H, P, N, device=dy.device, dtype=C.dtype)
    dinit = torch.empty(batch, H, P, N, device=dy.device, dtype=torch.float32)
    bh_axis = _bh_axis(batch * H)
    grid = (triton.cdiv(P, BP), batch * H)[:: 1 if bh_axis else -1]
    with _device_ctx(dy):
        _ssd_dstate_bwd_kernel[grid](
            dy, z, dt, A, C, dt_bias, seq_idx, dfinal, dstates, dinit,
            L, H, P, N, H // G, nchunks, dt_min, dt_max,
            C.stride(0), C.stride(1), C.stride(2),
            *(z.stride()[:3] if z is not None else (0, 0, 0)),
            HAS_Z=z is not None, HAS_DTB=dt_bias is not None, SOFTPLUS=dt_softplus,
            CLAMP=(dt_min, dt_max) != DEFAULT_DT_LIMIT, HAS_SEQ=seq_idx is not None,
            HAS_DFINAL=dfinal is not None, WRITE_DINIT=True, NS=2 if split_n and BN >= 32 else 1,
            Q=Q, BP=BP, BN=BN, PREC=_prec(C.dtype),
            I64=_needs_i64(dy, z, dt, C, seq_idx, dfinal, dstates, dinit), BH_AXIS=bh_axis,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return dstates, dinit


def _heads_per_split(programs: int, R: int, min_programs: int) -> int:
    """Split each group's heads over enough programs to fill a GPU; dB / dC partial sums over
    splits are reduced afterwards (deterministically)."""
    splits = max(1, min(R, triton.cdiv(min_programs, programs)))
    return triton.cdiv(R, splits)


def _chunk_bwd(x, dy, z, ypre, dt, A, B, C, D, dt_bias, seq_idx, states, dstates,
               dt_softplus, dt_min, dt_max, *, num_warps: int = 4, num_stages: int = 1,
               dx_block_n: int = 64, dbc_block_n: int = 128, dbc_warps: int = 8,
               dbc_stages: int = 2, dbc_min_programs: int = 264,
               heads_first: bool = True, blocks_first: bool = False, dx_cb: bool = False,
               state_sums: bool = True, run_dx: bool = True,
               run_dbc: bool = True):  # fmt: skip
    """Launch `_ssd_dbc_bwd_kernel` and `_ssd_dx_bwd_kernel`; reduce their partial sums.
    dB/dC launch: N blocks of 128 on 8 warps (H100 sweeps: 0.45 ms against 0.70 with blocks
    of 64 on 4 warps at B4 L4096 H64 G1 N128; 3.3 against 5.4 ms at B2 L8192 H256 G8 N256).
    With `state_sums` dB/dC also sums the entering state's terms over N for dx, so dx reads
    the per-chunk state gradients but not the states (a (P, N) tile and an N contraction less
    per program). `run_dx` / `run_dbc` let tools/tune_ssd.py time one kernel alone (dx alone
    then reads unset sums: for timing only)."""
    batch, L, H, P = x.shape
    G, N = B.shape[2:]
    R = H // G
    Q = KERNEL_CHUNK
    nchunks = triton.cdiv(L, Q)
    BP, BN = _blocks(P, N)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty(batch, L, H, P, device=x.device, dtype=x.dtype)
    dz = torch.empty(batch, L, H, P, device=x.device, dtype=z.dtype) if z is not None else None
    ddt = torch.empty(batch, L, H, **f32)
    dA = torch.empty(batch * nchunks, H, **f32)
    dD = torch.empty(batch * nchunks, H, P, **f32) if D is not None else None
    flags = _flags(D, z, dt_bias, dt_softplus, dt_min, dt_max, seq_idx)
    strides = (
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
        *(z.stride()[:3] if z is not None else (0, 0, 0)),
    )  # fmt: skip
    BNB = min(dbc_block_n, BN)
    n_blocks = triton.cdiv(N, BNB)
    hps = _heads_per_split(batch * nchunks * G * n_blocks, R, dbc_min_programs)
    splits = triton.cdiv(R, hps)
    dB = torch.empty(splits, batch, L, G, N, **f32)
    dC = torch.empty(splits, batch, L, G, N, **f32)
    csum = torch.empty(n_blocks, batch, L, H, **f32) if state_sums else None
    hsum = torch.empty(n_blocks, batch, nchunks, H, **f32) if state_sums else None
    CB = _chunk_cb(B, C, Q) if dx_cb and run_dx else None
    i64 = _needs_i64(x, dy, z, ypre, dt, B, C, seq_idx, states, dstates, dB, dC, csum, hsum, CB,
                     dx, dz, ddt, dA, dD)  # fmt: skip
    with _device_ctx(x):
        if run_dbc:
            order = 2 if batch * nchunks > _GRID_YZ else int(blocks_first)
            grid = [(splits, batch * nchunks, G * n_blocks),
                    (G * n_blocks, splits, batch * nchunks),
                    (batch * nchunks, splits, G * n_blocks)][order]  # fmt: skip
            _ssd_dbc_bwd_kernel[grid](
                x, dy, z, dt, A, B, C, dt_bias, seq_idx, states, dstates, dB, dC, csum, hsum,
                L, H, P, N, R, G, nchunks, hps, dt_min, dt_max, *strides,
                HAS_Z=flags["HAS_Z"], HAS_DTB=flags["HAS_DTB"], SOFTPLUS=flags["SOFTPLUS"],
                CLAMP=flags["CLAMP"], HAS_SEQ=flags["HAS_SEQ"], WRITE_SUMS=state_sums,
                Q=Q, BP=BP, BNB=BNB, PREC=_prec(x.dtype), ORDER=order, I64=i64,
                num_warps=dbc_warps, num_stages=dbc_stages,
            )  # fmt: skip
        if run_dx:
            heads_first = heads_first and batch * nchunks <= _GRID_YZ
            grid = (H, batch * nchunks) if heads_first else (batch * nchunks, H)
            _ssd_dx_bwd_kernel[grid](
                x, dy, z, ypre, dt, A, B, C, D, dt_bias, seq_idx, states, dstates, CB, csum,
                hsum, dx, dz, ddt, dA, dD, L, H, P, N, R, G, nchunks, n_blocks, dt_min, dt_max,
                *strides, Q=Q, BP=BP, BNK=min(dx_block_n, BN), PREC=_prec(x.dtype), **flags,
                HAS_CB=dx_cb, SUMS=state_sums, I64=i64,
                HEADS_FIRST=heads_first, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    dD_sum = None
    if D is not None:
        dD_sum = dD.sum(0)
        dD_sum = dD_sum if D.dim() == 2 else dD_sum.sum(-1)
    return dx, dz, ddt, dB.sum(0), dC.sum(0), dA.sum(0), dD_sum


# -- ops and autograd ------------------------------------------------------------------------
# `hybrid_kernels::ssd_fwd` / `ssd_bwd` are opaque to torch.compile (fake implementations give
# the shapes), so a compiled model calls the kernels as they are (`_triton_utils.library_op`).


def _ssd_fwd_impl(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
    z: Tensor | None, dt_bias: Tensor | None, initial_states: Tensor | None,
    seq_idx: Tensor | None, dt_softplus: bool, dt_min: float, dt_max: float, keep_ypre: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """-> (y (B, L, H, P), y before the z gate (or an empty tensor), final state fp32)."""
    y, ypre, final, _ = _tuned_fwd(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min, dt_max,
        keep_ypre and z is not None,
    )  # fmt: skip
    return y, ypre if ypre is not None else x.new_empty(0), final


def _ssd_fwd_fake(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min,
                  dt_max, keep_ypre):  # fmt: skip
    batch, _, H, P = x.shape
    N = B.shape[-1]
    ypre = torch.empty_like(x) if keep_ypre and z is not None else x.new_empty(0)
    return torch.empty_like(x), ypre, x.new_empty(batch, H, P, N, dtype=torch.float32)


# The backward's state recompute, by N >= CB_MIN_N (tools/tune_ssd.py on an H100: at B2 L8192
# H256 G8 N256, 4 warps and 2 stages 1.35 ms against 1.69 for 8 and 3; the dx kernel with
# 128-wide N blocks 5.89 against 6.04 for 64).
_STATES_LAUNCH = {False: dict(num_warps=8, num_stages=3), True: dict(num_warps=4, num_stages=2)}


# The backward's pieces choose their variants as the forward does (first use, per shape): the
# state recompute walk and the state-gradient walk hold their (P, N) tile whole or as N halves;
# dx takes the entering state's terms from dB/dC (`state_sums`) or reads the states itself, and
# C B^T from `_chunk_cb` or contracted per head. The first candidate is the default.
_BWD_TUNERS = {
    name: LaunchTuner(f"ssd backward {name}", source=__file__)
    for name in ("states", "dstates", "dx")
}


def _bwd_configs(N: int, nchunks: int) -> dict[str, list[dict]]:
    """Candidates of each backward piece (the default first); the default alone for short
    sequences (fewer than `TUNE_MIN_CHUNKS` chunks), where timing would cost more than it saves."""
    BN = _blocks(1, N)[1]
    if nchunks < TUNE_MIN_CHUNKS:
        return {"states": [{}], "dstates": [{}], "dx": [{}]}
    halves = [{}, dict(split_n=not _split_n(BN, None))] if BN >= 128 else [{}]
    return {
        "states": halves,
        "dstates": [{}, dict(split_n=True)] if BN >= 128 else [{}],
        "dx": [{}, dict(state_sums=False), dict(dx_cb=True), dict(state_sums=False, dx_cb=True)],
    }


def _ssd_bwd_impl(
    dy: Tensor, dfinal: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, ypre: Tensor | None, dt_bias: Tensor | None,
    initial_states: Tensor | None, seq_idx: Tensor | None, dt_softplus: bool, dt_min: float,
    dt_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """-> (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit); empty tensors for absent inputs."""
    batch, L, H, P = x.shape
    G, N = B.shape[2:]
    large_n = N >= CB_MIN_N
    dy = dy.contiguous()
    nchunks = _length_bucket(triton.cdiv(L, KERNEL_CHUNK))
    key = (batch, H, P, G, N, nchunks, x.dtype, z is not None, seq_idx is not None,
           initial_states is not None)  # fmt: skip

    def tuned(name: str, run) -> dict:
        configs = lambda: _bwd_configs(N, nchunks)[name]  # noqa: E731
        return _BWD_TUNERS[name].choose(key, configs, run, x.device)

    proc = (dt_softplus, dt_min, dt_max)
    walk = dict(write_y=False, write_ypre=False, store_states=True, chunk=KERNEL_CHUNK,
                **_STATES_LAUNCH[large_n])  # fmt: skip

    def states_walk(c: dict) -> tuple:  # (a candidate's launch settings replace the walk's)
        return _scan_fwd(x, dt, A, B, C, None, None, dt_bias, initial_states, seq_idx, *proc,
                         **{**walk, **c})  # fmt: skip

    _, _, _, states = states_walk(tuned("states", states_walk))

    def dstates_walk(c: dict) -> tuple:
        return _dstates(dy, dfinal, z, dt, A, C, dt_bias, seq_idx, *proc, H, P, **c)

    dstates, dinit = dstates_walk(tuned("dstates", dstates_walk))

    def chunk_bwd(c: dict) -> tuple:
        return _chunk_bwd(x, dy, z, ypre, dt, A, B, C, D, dt_bias, seq_idx, states, dstates,
                          *proc, dx_block_n=128 if large_n else 64, **c)  # fmt: skip

    dx, dz, ddt, dB, dC, dA, dD = chunk_bwd(tuned("dx", chunk_bwd))
    ddt_bias = ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None

    def out(g: Tensor | None, t: Tensor | None) -> Tensor:
        # Absent inputs get distinct empty tensors (custom-op outputs may not alias).
        return g.to(t.dtype) if g is not None and t is not None else x.new_empty(0)

    return (
        dx,
        out(ddt, dt),
        out(dA, A),
        out(dB, B),
        out(dC, C),
        out(dD, D),
        out(dz, z),
        out(ddt_bias, dt_bias),
        out(dinit, initial_states),
    )


def _ssd_bwd_fake(dy, dfinal, x, dt, A, B, C, D, z, ypre, dt_bias, initial_states, seq_idx,
                  dt_softplus, dt_min, dt_max):  # fmt: skip
    def like(t: Tensor | None) -> Tensor:
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    return (
        torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B),
        torch.empty_like(C), like(D), like(z), like(dt_bias), like(initial_states),
    )  # fmt: skip


_ssd_fwd_op = library_op("ssd_fwd", _ssd_fwd_impl, _ssd_fwd_fake)
_ssd_bwd_op = library_op("ssd_bwd", _ssd_bwd_impl, _ssd_bwd_fake)


def _setup_context(ctx, inputs, output) -> None:
    x, dt, A, B, C, D, z, dt_bias, init, seq_idx, softplus, dt_min, dt_max, _ = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, output[1], dt_bias, init, seq_idx)
    ctx.args = (softplus, dt_min, dt_max)
    ctx.has_z = z is not None


def _backward(ctx, dy, _dypre, dfinal):
    x, dt, A, B, C, D, z, ypre, dt_bias, init, seq_idx = ctx.saved_tensors
    grads = _ssd_bwd_op(
        dy, dfinal, x, dt, A, B, C, D, z, ypre if ctx.has_z else None, dt_bias, init, seq_idx,
        *ctx.args,
    )  # fmt: skip
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = grads

    def opt(g: Tensor, t: Tensor | None) -> Tensor | None:
        return g if t is not None else None

    return (dx, ddt, dA, dB, dC, opt(dD, D), opt(dz, z), opt(ddt_bias, dt_bias),
            opt(dinit, init), None, None, None, None, None)  # fmt: skip


_ssd = differentiable(_ssd_fwd_op, _setup_context, _backward)


# -- public function -------------------------------------------------------------------------


def ssd_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int | None = None,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan in Triton; same arguments and results as `ssd_chunked_ref`.

    Shapes: x (B, L, H, P), dt (B, L, H), A (H), B and C (B, L, G, N), D (H) or (H, P),
    z (B, L, H, P), dt_bias (H), initial_states (B, H, P, N), seq_idx (B, L). Returns y
    (B, L, H, P) in x's dtype [and the final state (B, H, P, N) in fp32]. Inputs may be fp32,
    bf16 or fp16 (accumulation in fp32); `chunk_size` is accepted for interface parity and the
    kernels use their own chunk (`KERNEL_CHUNK`). Differentiable; the backward is deterministic.
    """
    _check_shapes(x, dt, A, B, C, D, z, initial_states, seq_idx)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"ssd_triton: x must be fp32, bf16 or fp16, got {x.dtype}")
    x, z = _rows(x), _rows(z)
    B, C = B.to(x.dtype), C.to(x.dtype)
    if B.stride() != C.stride() or B.stride(-1) != 1:
        B, C = B.contiguous(), C.contiguous()
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    dt_min, dt_max = float(dt_limit[0]), float(dt_limit[1])
    y, _, final = _ssd(
        x, dt.contiguous(), A.contiguous(), B, C,
        D.contiguous() if D is not None else None, z,
        dt_bias.contiguous() if dt_bias is not None else None,
        initial_states.contiguous() if initial_states is not None else None, seq,
        bool(dt_softplus), dt_min, dt_max, torch.is_grad_enabled(),
    )  # fmt: skip
    return (y, final) if return_final_states else y


__all__ = ["FWD_CHUNK", "KERNEL_CHUNK", "ssd_triton"]
