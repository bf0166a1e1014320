"""PyTorch references for Mamba-2's SSD (state space duality) scan.

Semantics follow mamba_ssm's `mamba_chunk_scan_combined` / `selective_state_update`:

    dt_t = clamp(softplus?(dt_t + dt_bias), *dt_limit)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t        (per head; B, C per group)
    y_t  = C_t . h_t + D * x_t ;  y_t *= silu(z_t) when z is given

`seq_idx` (B, L) marks packed documents: the state is reset wherever it changes, so no position
sees state from a position of another document; `initial_states` belong to the document at
position 0.

Three functions:
  * `ssd_chunked_ref`: the chunked SSD algorithm of the Mamba-2 paper (intra-chunk quadratic form
    with a stable segment sum, per-chunk states, inter-chunk state passing, state-to-output),
    vectorised over batch and heads; differentiable, it is the CPU training path.
  * `ssd_sequential_ref`: the token-by-token recurrence in float64, the ground truth for tests.
  * `ssd_step_ref`: one decoding step on a recurrent state.

Shape legend (suffixes of tensor names):
  B batch, L sequence length, H heads, P head dim, G groups of B/C, R heads per group (H // G),
  N state size, C chunks, Q position in a chunk (target), S position in a chunk (source).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_DT_LIMIT = (0.0, math.inf)


def process_dt(
    dt: Tensor,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
) -> Tensor:
    """dt (..., H) -> clamp(softplus?(dt + dt_bias), *dt_limit), in dt's dtype.

    As in mamba_ssm, the clamp is applied only when `dt_limit` is not the default (0, inf).
    """
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    initial_states: Tensor | None,
    seq_idx: Tensor | None,
) -> None:
    """Raise ValueError unless the shapes fit the legend (see `ssd_chunked_ref`)."""
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen):
        raise ValueError(f"ssd: B must be (batch, seqlen, ngroups, dstate), got {tuple(B.shape)}")
    ngroups, dstate = B.shape[2:]
    expected = {
        "dt": (dt, (batch, seqlen, nheads)),
        "A": (A, (nheads,)),
        "C": (C, (batch, seqlen, ngroups, dstate)),
        "z": (z, (batch, seqlen, nheads, headdim)),
        "initial_states": (initial_states, (batch, nheads, headdim, dstate)),
        "seq_idx": (seq_idx, (batch, seqlen)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"ssd: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    if nheads % ngroups != 0:
        raise ValueError(f"ssd: nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"ssd: D must be ({nheads},) or ({nheads}, {headdim}), got {D.shape}")


def _d_as_hp(D: Tensor, nheads: int, headdim: int) -> Tensor:
    """D (H) or (H, P) -> broadcastable (H, P) view."""
    return D.view(nheads, 1) if D.dim() == 1 else D.view(nheads, headdim)


def _segsum(x_XQ: Tensor, keep_XQS: Tensor | None = None) -> Tensor:
    """Stable segment sum: out[..., q, s] = sum_{k=s+1..q} x[..., k] for s <= q, else -inf.

    Built by a cumsum over a masked copy (no differences of large cumsums). `keep_XQS`
    (broadcastable boolean) additionally sets entries to -inf where it is False.
    """
    Q = x_XQ.shape[-1]
    ones_QS = torch.ones(Q, Q, dtype=torch.bool, device=x_XQ.device)
    x_XQS = torch.where(torch.tril(ones_QS, diagonal=-1), x_XQ[..., :, None], 0.0)
    seg_XQS = torch.cumsum(x_XQS, dim=-2)
    drop = ~torch.tril(ones_QS)
    if keep_XQS is not None:
        drop = drop | ~keep_XQS
    # In place is safe: cumsum's backward does not need its output.
    return seg_XQS.masked_fill_(drop, -math.inf)


def _intra_chunk(
    xdt_BCQGRP: Tensor,
    dA_BCGRQ: Tensor,
    B_BCQGN: Tensor,
    C_BCQGN: Tensor,
    seq_BCQ: Tensor | None,
) -> Tensor:
    """Diagonal blocks: y_q = sum_{s <= q, same doc} (C_q . B_s) exp(sum_{s<k<=q} dA_k) dt_s x_s."""
    keep_BC11QS = None
    if seq_BCQ is not None:
        keep_BC11QS = (seq_BCQ[..., :, None] == seq_BCQ[..., None, :])[:, :, None, None]
    decay_BCGRQS = torch.exp(_segsum(dA_BCGRQ, keep_BC11QS))
    CB_BCGQS = torch.einsum("bcqgn,bcsgn->bcgqs", C_BCQGN, B_BCQGN)
    M_BCGRQS = CB_BCGQS[:, :, :, None] * decay_BCGRQS
    return torch.einsum("bcgrqs,bcsgrp->bcqgrp", M_BCGRQS, xdt_BCQGRP)


def _sum_after(x_XQ: Tensor) -> Tensor:
    """out[..., q] = sum_{k > q} x[..., k], by a reversed cumsum (no cumsum differences)."""
    rev_XQ = torch.flip(torch.cumsum(torch.flip(x_XQ, dims=[-1]), dim=-1), dims=[-1])
    return F.pad(rev_XQ[..., 1:], (0, 1))


def _chunk_states(
    xdt_BCQGRP: Tensor,
    dA_BCGRQ: Tensor,
    B_BCQGN: Tensor,
    seq_BCQ: Tensor | None,
) -> Tensor:
    """State at each chunk's end from that chunk's inputs alone (zero state at chunk start).

    Only positions of the document active at the chunk's last position contribute.
    """
    decay_BCGRQ = torch.exp(_sum_after(dA_BCGRQ))
    if seq_BCQ is not None:
        same_BCQ = seq_BCQ == seq_BCQ[..., -1:]
        decay_BCGRQ = decay_BCGRQ * same_BCQ[:, :, None, None, :].to(decay_BCGRQ.dtype)
    w_BCQGRP = xdt_BCQGRP * decay_BCGRQ.permute(0, 1, 4, 2, 3)[..., None]
    return torch.einsum("bcqgn,bcqgrp->bcgrpn", B_BCQGN, w_BCQGRP)


def _pass_states(
    states_BCGRPN: Tensor,
    dAcs_BCGRQ: Tensor,
    init_BGRPN: Tensor,
    carry_BC: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Inter-chunk recurrence over chunk ends.

    Returns the state entering each chunk (B, C, G, R, P, N) and the final state (B, G, R, P, N).
    `carry_BC` (float 0/1) is 0 where the chunk's document differs from the previous chunk end's.
    """
    decay_BCGR = torch.exp(dAcs_BCGRQ[..., -1])
    if carry_BC is not None:
        decay_BCGR = decay_BCGR * carry_BC[:, :, None, None]
    state_BGRPN = init_BGRPN
    entering = []
    for c in range(states_BCGRPN.shape[1]):
        entering.append(state_BGRPN)
        state_BGRPN = states_BCGRPN[:, c] + decay_BCGR[:, c, :, :, None, None] * state_BGRPN
    return torch.stack(entering, dim=1), state_BGRPN


def _state_to_output(
    prev_BCGRPN: Tensor,
    dAcs_BCGRQ: Tensor,
    C_BCQGN: Tensor,
    see_BCQ: Tensor | None,
) -> Tensor:
    """Off-diagonal part: y_q = C_q . (exp(sum_{k<=q} dA_k) * state entering the chunk).

    `see_BCQ` (bool) marks positions of the document that the entering state belongs to.
    """
    decay_BCGRQ = torch.exp(dAcs_BCGRQ)
    if see_BCQ is not None:
        decay_BCGRQ = decay_BCGRQ * see_BCQ[:, :, None, None, :].to(decay_BCGRQ.dtype)
    y_BCQGRP = torch.einsum("bcqgn,bcgrpn->bcqgrp", C_BCQGN, prev_BCGRPN)
    return y_BCQGRP * decay_BCGRQ.permute(0, 1, 4, 2, 3)[..., None]


def _to_chunks(t_BL: Tensor, Q: int) -> Tensor:
    """(B, L, ...) -> (B, C, Q, ...), zero-padding L up to a multiple of Q."""
    pad = (-t_BL.shape[1]) % Q
    if pad:
        t_BL = torch.cat([t_BL, t_BL.new_zeros(t_BL.shape[0], pad, *t_BL.shape[2:])], dim=1)
    return t_BL.unflatten(1, (-1, Q))


def _doc_masks(seq_idx_BL: Tensor, Q: int) -> tuple[Tensor, Tensor, Tensor]:
    """seq_idx (B, L) -> (seq_BCQ, carry_BC bool, see_BCQ bool).

    The padded tail repeats the last document. The state entering chunk c belongs to document
    prev_BC[c]: the document at the previous chunk's last position (for c = 0, the document at
    position 0, which owns initial_states). carry: chunk c continues that document to its end;
    see: position q belongs to that document.
    """
    pad = (-seq_idx_BL.shape[1]) % Q
    seq_BL = torch.cat([seq_idx_BL, seq_idx_BL[:, -1:].expand(-1, pad)], dim=1)
    seq_BCQ = seq_BL.unflatten(1, (-1, Q))
    end_BC = seq_BCQ[..., -1]
    prev_BC = torch.cat([seq_BCQ[:, :1, 0], end_BC[:, :-1]], dim=1)
    return seq_BCQ, end_BC == prev_BC, seq_BCQ == prev_BC[..., None]


def ssd_chunked_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan (Mamba-2), differentiable; computes in fp32 (fp64 for fp64 inputs).

    Args:
        x: (B, L, H, P). dt: (B, L, H). A: (H), negative. B, C: (B, L, G, N), H % G == 0; head h
        uses group h // (H // G). D: (H) or (H, P). z: (B, L, H, P). dt_bias: (H).
        initial_states: (B, H, P, N). seq_idx: (B, L) integer, non-decreasing per row.
        chunk_size: Q; L need not be a multiple of it.
    Returns:
        y (B, L, H, P) in x's dtype; with `return_final_states` also the final state
        (B, H, P, N) in the compute dtype (that of the last document when seq_idx is given).
    """
    _check_shapes(x, dt, A, B, C, D, z, initial_states, seq_idx)
    ct = _compute_dtype(x.dtype)
    batch, seqlen, H, P = x.shape
    G, N = B.shape[2:]
    R, Q = H // G, chunk_size
    if Q <= 0:
        raise ValueError(f"ssd: chunk_size must be positive, got {chunk_size}")
    dt_BLH = process_dt(dt.to(ct), dt_bias, dt_softplus, dt_limit)
    # Padding to whole chunks puts dt = 0 there: the padded tail neither decays nor feeds the state.
    xdt_BCQGRP = _to_chunks(x.to(ct) * dt_BLH[..., None], Q).unflatten(-2, (G, R))
    dA_BCGRQ = _to_chunks(dt_BLH * A.to(ct), Q).unflatten(-1, (G, R)).permute(0, 1, 3, 4, 2)
    B_BCQGN, C_BCQGN = _to_chunks(B.to(ct), Q), _to_chunks(C.to(ct), Q)
    dAcs_BCGRQ = torch.cumsum(dA_BCGRQ, dim=-1)
    seq_BCQ = carry_BC = see_BCQ = None
    if seq_idx is not None:
        seq_BCQ, carry_BC, see_BCQ = _doc_masks(seq_idx, Q)
        carry_BC = carry_BC.to(ct)
    if initial_states is None:
        init_BGRPN = x.new_zeros(batch, G, R, P, N, dtype=ct)
    else:
        init_BGRPN = initial_states.to(ct).view(batch, G, R, P, N)

    y_BCQGRP = _intra_chunk(xdt_BCQGRP, dA_BCGRQ, B_BCQGN, C_BCQGN, seq_BCQ)
    states_BCGRPN = _chunk_states(xdt_BCQGRP, dA_BCGRQ, B_BCQGN, seq_BCQ)
    prev_BCGRPN, final_BGRPN = _pass_states(states_BCGRPN, dAcs_BCGRQ, init_BGRPN, carry_BC)
    y_BCQGRP = y_BCQGRP + _state_to_output(prev_BCGRPN, dAcs_BCGRQ, C_BCQGN, see_BCQ)

    y_BLHP = y_BCQGRP.flatten(1, 2).flatten(2, 3)[:, :seqlen]
    y_BLHP = _finish_output(y_BLHP, x, D, z)
    if return_final_states:
        return y_BLHP, final_BGRPN.reshape(batch, H, P, N)
    return y_BLHP


def _finish_output(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y (..., H, P) in the compute dtype -> (y + D x) * silu(z), cast to x's dtype."""
    H, P = x.shape[-2:]
    if D is not None:
        y = y + x.to(y.dtype) * _d_as_hp(D, H, P).to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(x.dtype)


def _recurrence_step(
    state_BHPN: Tensor,
    x_BHP: Tensor,
    dt_BH: Tensor,
    A_H: Tensor,
    B_BGN: Tensor,
    C_BGN: Tensor,
) -> tuple[Tensor, Tensor]:
    """One step of h = exp(dt A) h + dt x (outer) B ; y = C . h, all in state's dtype (no D/z)."""
    R = x_BHP.shape[1] // B_BGN.shape[1]
    B_BHN = B_BGN.repeat_interleave(R, dim=1)
    C_BHN = C_BGN.repeat_interleave(R, dim=1)
    decay_BH = torch.exp(dt_BH * A_H)
    update_BHPN = (dt_BH[..., None] * x_BHP)[..., None] * B_BHN[:, :, None, :]
    state_BHPN = decay_BH[..., None, None] * state_BHPN + update_BHPN
    y_BHP = torch.einsum("bhpn,bhn->bhp", state_BHPN, C_BHN)
    return y_BHP, state_BHPN


def ssd_sequential_ref(
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
    """Token-by-token SSD recurrence computed in float64: the ground truth for tests.

    Same arguments and shapes as `ssd_chunked_ref` (`chunk_size` is accepted and ignored). Returns
    y in x's dtype; the final state in fp64 for fp64 inputs, else fp32.
    """
    _check_shapes(x, dt, A, B, C, D, z, initial_states, seq_idx)
    f64 = torch.float64
    batch, seqlen, H, P = x.shape
    N = B.shape[-1]
    dt_BLH = process_dt(dt.to(f64), dt_bias, dt_softplus, dt_limit)
    x64, A64, B64, C64 = x.to(f64), A.to(f64), B.to(f64), C.to(f64)
    if initial_states is None:
        state_BHPN = x.new_zeros(batch, H, P, N, dtype=f64)
    else:
        state_BHPN = initial_states.to(f64)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            same_B = (seq_idx[:, t] == seq_idx[:, t - 1]).to(f64)
            state_BHPN = state_BHPN * same_B[:, None, None, None]
        y_BHP, state_BHPN = _recurrence_step(
            state_BHPN, x64[:, t], dt_BLH[:, t], A64, B64[:, t], C64[:, t]
        )
        ys.append(y_BHP)
    y_BLHP = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, H, P, dtype=f64)
    y_BLHP = _finish_output(y_BLHP, x, D, z)
    if return_final_states:
        return y_BLHP, state_BHPN.to(_compute_dtype(x.dtype))
    return y_BLHP


def ssd_step_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
) -> tuple[Tensor, Tensor]:
    """One decoding step of the SSD recurrence; `state` is not modified.

    Args:
        state: (B, H, P, N), fp32 (or fp64). x: (B, H, P). dt: (B, H). A: (H). B, C: (B, G, N).
        D: (H) or (H, P). z: (B, H, P). dt_bias: (H).
    Returns:
        y (B, H, P) in x's dtype, new state (B, H, P, N) in state's dtype.
    """
    batch, H, P = x.shape
    if state.shape[:3] != (batch, H, P) or B.shape != C.shape or B.shape[-1] != state.shape[-1]:
        raise ValueError(
            f"ssd_step: shapes do not fit: state {tuple(state.shape)}, x {tuple(x.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if H % B.shape[1] != 0:
        raise ValueError(f"ssd_step: nheads ({H}) must be a multiple of ngroups ({B.shape[1]})")
    ct = _compute_dtype(state.dtype)
    dt_BH = process_dt(dt.to(ct), dt_bias, dt_softplus, dt_limit)
    y_BHP, new_BHPN = _recurrence_step(state.to(ct), x.to(ct), dt_BH, A.to(ct), B.to(ct), C.to(ct))
    return _finish_output(y_BHP, x, D, z), new_BHPN.to(state.dtype)


__all__ = ["process_dt", "ssd_chunked_ref", "ssd_sequential_ref", "ssd_step_ref"]
