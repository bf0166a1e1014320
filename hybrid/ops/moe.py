"""Token dispatch for dropless (sort-based) mixture of experts.

The flow for T tokens, each routed to K experts:

    order_M, counts_E = sort_by_expert(expert_idx_TK, E)       # stable sort of the T*K picks
    x_MD = x_TD[order_M // K]                                   # (permute does these two)
    h_MF = grouped_mm(x_MD, w_EDF, counts_E)                    # one matmul per row block
    y_TD = unpermute(y_MD, order_M, weights_TK, T)              # weight and sum the K picks

An *assignment* is one (token, slot) pair, numbered `t * K + k` in the flattened (T, K) routing
tensors; `order_M` lists the kept assignments grouped by expert (ascending expert id, and inside
one expert in assignment order, so earlier tokens come first). With a capacity, assignments
whose rank inside their expert is >= capacity are dropped: they are absent from `order_M` and
contribute nothing to the output.

Shape legend:
    T  tokens (batch * sequence, flattened)
    K  experts per token (top_k)
    E  experts
    M  kept assignments (= T*K when dropless)
    D  model width
    F  expert hidden width
"""

from __future__ import annotations

import functools
import logging

import torch
from hybrid_kernels.moe_ref import grouped_mm_ref
from torch import Tensor

logger = logging.getLogger(__name__)

# torch._grouped_mm needs 16-byte aligned strides: multiples of 8 bf16 elements.
_GROUPED_MM_ALIGN = 8


def sort_by_expert(
    expert_idx_TK: Tensor, n_experts: int, capacity: int | None = None
) -> tuple[Tensor, Tensor]:
    """Group the T*K assignments by expert (stable), dropping those beyond `capacity`.

    Args:
        expert_idx_TK: (T, K) integer expert ids in [0, n_experts).
        n_experts: E.
        capacity: the most assignments an expert keeps; None keeps all (dropless). Dropping
            compacts the index on the host (a device sync on GPU).

    Returns:
        order_M: (M,) int64 flat assignment indices (`t * K + k`), grouped by expert.
        counts_E: (E,) int64 kept assignments per expert (sums to M).
    """
    flat_A = expert_idx_TK.reshape(-1)
    order_A = torch.argsort(flat_A, stable=True)
    counts_E = torch.bincount(flat_A, minlength=n_experts)
    if capacity is None:
        return order_A, counts_E
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_A = torch.arange(flat_A.numel(), device=flat_A.device) - starts_E[flat_A[order_A]]
    keep_A = rank_A < capacity
    return order_A[keep_A], counts_E.clamp(max=capacity)


def permute(
    x_TD: Tensor, expert_idx_TK: Tensor, n_experts: int, *, capacity: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Gather a copy of each token per kept assignment, grouped by expert.

    Args:
        x_TD: (T, D) tokens.
        expert_idx_TK: (T, K) expert ids.
        n_experts: E.
        capacity: see `sort_by_expert`.

    Returns:
        x_MD: (M, D) token rows, experts in contiguous blocks of `counts_E` rows.
        order_M: (M,) flat assignment index of each row (for `unpermute`).
        counts_E: (E,) rows per expert.
    """
    assert x_TD.dim() == 2 and expert_idx_TK.shape[0] == x_TD.shape[0], (
        x_TD.shape,
        expert_idx_TK.shape,
    )
    order_M, counts_E = sort_by_expert(expert_idx_TK, n_experts, capacity)
    x_MD = x_TD[order_M // expert_idx_TK.shape[1]]
    return x_MD, order_M, counts_E


def unpermute(y_MD: Tensor, order_M: Tensor, weights_TK: Tensor, n_tokens: int) -> Tensor:
    """Weight each expert output by its routing weight and sum the K outputs of each token.

    Deterministic (no atomics): the rows are first copied to their assignment slots in a
    (T*K, D) buffer (dropped assignments stay zero), then contracted with the weights. The
    contraction runs in float32 for low-precision inputs (float64 stays float64), which costs a
    (T*K, D) float32 temporary; the result is cast back to `y_MD.dtype`.

    Args:
        y_MD: (M, D) expert outputs in `permute` order.
        order_M: (M,) flat assignment indices from `permute`.
        weights_TK: (T, K) routing weights.
        n_tokens: T.

    Returns:
        y_TD: (T, D) in the dtype of `y_MD`.
    """
    n_slots = weights_TK.shape[1]
    assert weights_TK.shape[0] == n_tokens, (weights_TK.shape, n_tokens)
    assert order_M.shape[0] == y_MD.shape[0], (order_M.shape, y_MD.shape)
    acc_dtype = torch.promote_types(y_MD.dtype, torch.float32)
    y_AD = y_MD.new_zeros((n_tokens * n_slots, y_MD.shape[1])).index_copy(0, order_M, y_MD)
    y_TKD = y_AD.view(n_tokens, n_slots, -1).to(acc_dtype)
    # an elementwise product and a sum over the K slots: as an einsum this became a batched
    # matmul of T (1 x K) @ (K x D) products, which cuBLAS ran at 1.2 ms a layer (H100 profile)
    y_TD = (y_TKD * weights_TK.to(acc_dtype).unsqueeze(-1)).sum(dim=1)
    return y_TD.to(y_MD.dtype)


def _autocast_operands(x_MD: Tensor, w_EDF: Tensor) -> tuple[Tensor, Tensor]:
    """Under autocast, run in the autocast dtype (fp32 master weights cast as for a matmul)."""
    device = x_MD.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return x_MD.to(dtype), w_EDF.to(dtype)
    return x_MD, w_EDF


def grouped_mm(x_MD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    """Per-expert matmul over contiguous row blocks: rows of expert e times `w_EDF[e]`.

    Uses `torch._grouped_mm` (int32 cumulative offsets) for bf16 CUDA tensors it accepts, and
    otherwise the per-expert loop `hybrid_kernels.moe_ref.grouped_mm_ref` (differentiable
    through autograd; syncs to read `counts_E`). The choice is logged once per reason.

    Args:
        x_MD: (M, D) rows sorted by expert.
        w_EDF: (E, D, F) expert weights.
        counts_E: (E,) rows per expert, summing to M.

    Returns:
        (M, F).
    """
    x_MD, w_EDF = _autocast_operands(x_MD, w_EDF)
    use_fused, reason = grouped_mm_backend(x_MD, w_EDF)
    _log_choice("torch._grouped_mm" if use_fused else "per-expert loop", reason)
    if use_fused:
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_MD.contiguous(), w_EDF.contiguous(), offs=offs_E)
    return grouped_mm_ref(x_MD, w_EDF, counts_E)


def grouped_mm_backend(x_MD: Tensor, w_EDF: Tensor) -> tuple[bool, str]:
    """Whether `grouped_mm` can use `torch._grouped_mm` for these operands, and why (not).

    Its constraints (aten `_grouped_mm`, torch 2.8-2.13): CUDA, both operands bf16, strides
    that are multiples of 16 bytes (D and F multiples of 8, also for the transposed operands of
    the backward), and before torch 2.9 a compute-capability-9.x GPU (no fallback kernel).
    """
    if not (x_MD.is_cuda and w_EDF.is_cuda):
        return False, "tensors are not on CUDA"
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no _grouped_mm"
    if x_MD.dtype != torch.bfloat16 or w_EDF.dtype != torch.bfloat16:
        return False, f"dtypes {x_MD.dtype}/{w_EDF.dtype} are not both bfloat16"
    d_in, d_out = w_EDF.shape[1], w_EDF.shape[2]
    if d_in % _GROUPED_MM_ALIGN or d_out % _GROUPED_MM_ALIGN:
        return False, f"widths {d_in}x{d_out} are not multiples of {_GROUPED_MM_ALIGN}"
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 9):
        major, _ = torch.cuda.get_device_capability(x_MD.device)
        if major != 9:
            return False, f"torch {torch.__version__} supports _grouped_mm on sm90 only"
    return True, "bf16 CUDA operands with aligned widths"


@functools.cache
def _log_choice(backend: str, reason: str) -> None:
    logger.info("grouped_mm: using %s (%s)", backend, reason)
