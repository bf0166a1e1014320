"""MoE dispatch ops: sort/permute/unpermute and the grouped matmul.

Legend: T tokens, K experts per token, E experts, M kept assignments, D/F widths.
"""

from __future__ import annotations

import pytest
import torch
from hybrid_kernels.moe_ref import grouped_mm_ref, grouped_mm_rowwise_ref

from hybrid.ops.moe import grouped_mm, grouped_mm_backend, permute, sort_by_expert, unpermute


def _routing(T: int, K: int, E: int, seed: int = 0) -> torch.Tensor:
    """(T, K) distinct random experts per token."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])


def _naive_grouped(x_MD, w_EDF, counts_E):
    out = []
    expert = 0
    seen = 0
    for m in range(x_MD.shape[0]):
        while seen + counts_E[expert] <= m:
            seen += int(counts_E[expert])
            expert += 1
        out.append(sum(x_MD[m, d] * w_EDF[expert, d] for d in range(x_MD.shape[1])))
    return torch.stack(out) if out else x_MD.new_zeros(0, w_EDF.shape[2])


@pytest.mark.parametrize(
    "counts", [[3, 0, 2, 5], [0, 0, 0, 10], [1, 1, 1, 1], [0, 0, 0, 0], [7, 0, 0, 0]]
)
def test_grouped_mm_loop_matches_per_row(counts):
    g = torch.Generator().manual_seed(1)
    counts_E = torch.tensor(counts)
    x_MD = torch.randn(int(counts_E.sum()), 5, generator=g, dtype=torch.float64)
    w_EDF = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    expected = _naive_grouped(x_MD, w_EDF, counts_E)
    torch.testing.assert_close(grouped_mm_ref(x_MD, w_EDF, counts_E), expected)
    torch.testing.assert_close(grouped_mm(x_MD, w_EDF, counts_E), expected)
    torch.testing.assert_close(grouped_mm_rowwise_ref(x_MD, w_EDF, counts_E), expected)


def test_grouped_mm_loop_is_differentiable():
    g = torch.Generator().manual_seed(2)
    counts_E = torch.tensor([2, 0, 3])
    x_MD = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w_EDF = torch.randn(3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: grouped_mm(x, w, counts_E), (x_MD, w_EDF))


def test_grouped_mm_backend_on_cpu_is_the_loop():
    use, reason = grouped_mm_backend(
        torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(2, 8, 8, dtype=torch.bfloat16)
    )
    assert not use and "CUDA" in reason


def test_sort_by_expert_is_stable_and_counts():
    idx_TK = _routing(T=9, K=2, E=5)
    order_M, counts_E = sort_by_expert(idx_TK, 5)
    flat = idx_TK.reshape(-1)
    assert torch.equal(counts_E, torch.bincount(flat, minlength=5))
    expected = [a for e in range(5) for a in range(flat.numel()) if flat[a] == e]
    assert order_M.tolist() == expected


def test_permute_unpermute_round_trip():
    T, K, E, D = 11, 3, 6, 4
    g = torch.Generator().manual_seed(3)
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    idx_TK = _routing(T, K, E, seed=3)
    w_TK = torch.rand(T, K, generator=g, dtype=torch.float64)
    x_MD, order_M, counts_E = permute(x_TD, idx_TK, E)
    assert x_MD.shape == (T * K, D) and int(counts_E.sum()) == T * K
    # Rows are grouped by expert and each is a copy of its token.
    assert torch.equal(idx_TK.reshape(-1)[order_M], torch.sort(idx_TK.reshape(-1)).values)
    assert torch.equal(x_MD, x_TD[order_M // K])
    y_TD = unpermute(x_MD, order_M, w_TK, T)
    torch.testing.assert_close(y_TD, x_TD * w_TK.sum(-1, keepdim=True), rtol=1e-12, atol=1e-12)


def test_unpermute_ignores_slot_order():
    T, K, E, D = 7, 3, 5, 4
    g = torch.Generator().manual_seed(4)
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    idx_TK = _routing(T, K, E, seed=4)
    w_TK = torch.rand(T, K, generator=g, dtype=torch.float64)
    w_EDF = torch.randn(E, D, D, generator=g, dtype=torch.float64)

    def run(idx, w):
        x_MD, order_M, counts_E = permute(x_TD, idx, E)
        return unpermute(grouped_mm(x_MD, w_EDF, counts_E), order_M, w, T)

    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(run(idx_TK, w_TK), run(idx_TK[:, perm], w_TK[:, perm]))


def test_capacity_drops_exactly_the_late_assignments():
    T, K, E, capacity = 16, 2, 4, 5
    idx_TK = torch.zeros(T, K, dtype=torch.long)
    idx_TK[:, 1] = torch.randint(1, E, (T,), generator=torch.Generator().manual_seed(5))
    order_M, counts_E = sort_by_expert(idx_TK, E, capacity=capacity)
    seen = [0] * E
    kept = []
    for a, e in enumerate(idx_TK.reshape(-1).tolist()):
        if seen[e] < capacity:
            kept.append(a)
        seen[e] += 1
    assert sorted(order_M.tolist()) == kept
    assert counts_E.tolist() == [min(s, capacity) for s in seen]
    assert int(counts_E.sum()) == order_M.numel()
    # Grouped by expert, in assignment order inside each expert.
    experts = idx_TK.reshape(-1)[order_M]
    assert torch.equal(experts, torch.sort(experts, stable=True).values)
    # Dropped assignments contribute nothing.
    x_TD = torch.randn(T, 3, dtype=torch.float64)
    x_MD, order_M, _ = permute(x_TD, idx_TK, E, capacity=capacity)
    y_TD = unpermute(x_MD, order_M, torch.ones(T, K, dtype=torch.float64), T)
    keep_TK = torch.zeros(T * K, dtype=torch.float64)
    keep_TK[kept] = 1.0
    torch.testing.assert_close(y_TD, x_TD * keep_TK.view(T, K).sum(-1, keepdim=True))


def test_unpermute_bf16_accumulates_in_fp32():
    T, K, E, D = 64, 4, 8, 32
    idx_TK = _routing(T, K, E, seed=6)
    g = torch.Generator().manual_seed(6)
    y64_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    w_TK = torch.rand(T, K, generator=g, dtype=torch.float32)
    y_MD, order_M, _ = permute(y64_TD, idx_TK, E)
    out = unpermute(y_MD.bfloat16(), order_M, w_TK, T)
    assert out.dtype == torch.bfloat16
    ref = unpermute(y_MD.bfloat16().double(), order_M, w_TK.double(), T)
    # One bf16 rounding of the result, not K.
    assert (out.double() - ref).abs().max() <= ref.abs().max() * 2**-8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("counts", [[64, 0, 17, 47], [0, 0, 128, 0]])
def test_grouped_mm_cuda_matches_loop(counts):
    dev = "cuda"
    counts_E = torch.tensor(counts, device=dev)
    M = int(counts_E.sum())
    x32 = torch.randn(M, 64, device=dev, requires_grad=True)
    w32 = torch.randn(4, 64, 32, device=dev, requires_grad=True)
    x, w = x32.detach().bfloat16().requires_grad_(), w32.detach().bfloat16().requires_grad_()
    assert grouped_mm_backend(x, w)[0]
    y = grouped_mm(x, w, counts_E)
    y_ref = grouped_mm_ref(x32, w32, counts_E)  # fp32 reference
    y_loop = grouped_mm_ref(x, w, counts_E)  # bf16 loop
    g = torch.randn_like(y_ref)
    y.backward(g.bfloat16())
    y_ref.backward(g)
    err = (y.float() - y_ref).abs().max()
    err_loop = (y_loop.float() - y_ref).abs().max()
    assert err <= 2 * err_loop + 1e-2
    for got, ref in ((x.grad, x32.grad), (w.grad, w32.grad)):
        assert (got.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
