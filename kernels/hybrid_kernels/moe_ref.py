"""Plain-PyTorch references for the MoE dispatch ops.

These are the readable definitions the fast paths (`torch._grouped_mm`, future Triton kernels)
are checked against. They know nothing of models: rows arrive already sorted by expert.

Shape legend:
    M  rows after sorting by expert (= sum of `counts`)
    E  experts
    D  input features of each expert matmul
    F  output features of each expert matmul
"""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_mm_ref(x_MD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    """Grouped matmul over contiguous row blocks, one Python loop step per expert.

    Rows `[start_e, start_e + counts[e])` of `x_MD` (with `start_e` the sum of the counts before
    `e`) are multiplied by `w_EDF[e]`. Experts with no rows are skipped. Differentiable through
    slicing and `matmul`; reads `counts` on the host (a device sync on GPU).

    Args:
        x_MD: (M, D) rows sorted by expert.
        w_EDF: (E, D, F) one weight matrix per expert.
        counts_E: (E,) integer rows per expert, summing to M.

    Returns:
        (M, F) in the dtype of the matmul of `x_MD` and `w_EDF`.
    """
    n_experts, d_in, d_out = w_EDF.shape
    assert x_MD.dim() == 2 and x_MD.shape[1] == d_in, (x_MD.shape, w_EDF.shape)
    assert counts_E.shape == (n_experts,), (counts_E.shape, n_experts)
    sizes = [int(c) for c in counts_E.tolist()]
    assert sum(sizes) == x_MD.shape[0], (sum(sizes), x_MD.shape[0])
    pieces: list[Tensor] = []
    start = 0
    for e, size in enumerate(sizes):
        if size:
            pieces.append(x_MD[start : start + size] @ w_EDF[e])
        start += size
    if not pieces:
        dtype = torch.promote_types(x_MD.dtype, w_EDF.dtype)
        return x_MD.new_zeros((0, d_out), dtype=dtype)
    return torch.cat(pieces, dim=0)


def grouped_mm_rowwise_ref(x_MD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    """The slowest, most literal form: each row times the weight of the expert that owns it."""
    expert_M = torch.repeat_interleave(torch.arange(w_EDF.shape[0]), counts_E.cpu().long())
    expert_M = expert_M.to(x_MD.device)
    return torch.einsum("md,mdf->mf", x_MD, w_EDF[expert_M])
