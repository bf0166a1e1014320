"""The attention op: implementations, document offsets, shared masks; on GPU, varlen flash
attention over packed documents against SDPA with the document mask (fp32 reference)."""

from __future__ import annotations

import pytest
import torch

from hybrid import ops
from hybrid.ops.attention import attention, attention_mask, document_offsets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed_seq_idx(B: int, L: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.rand(B, L, generator=gen) < 0.02
    cuts[:, 0] = False
    return cuts.cumsum(1)


def test_document_offsets() -> None:
    seq = torch.tensor([[0, 0, 1, 1, 1], [3, 3, 3, 3, 4]])
    offsets, longest = document_offsets(seq)
    assert offsets.tolist() == [0, 2, 5, 9, 10] and offsets.dtype == torch.int32
    assert longest == 4


def test_cpu_picks_torch_sdpa_and_varlen_is_refused() -> None:
    op = ops.get_op("attention")
    assert op.select("cpu", dtype=torch.float32).name == "torch"
    with pytest.raises(ValueError, match="'varlen' is not available on cpu"):
        op.select("cpu", "varlen")


def test_documents_and_window_match_the_mask_rule_and_share_the_cache() -> None:
    torch.manual_seed(0)
    B, L, H, K, E = 2, 24, 4, 2, 8
    q, k, v = (torch.randn(B, L, n, E, dtype=torch.float64) for n in (H, K, K))
    seq = packed_seq_idx(B, L)
    seq[0, 10:] += 1  # at least one boundary
    cache: dict = {}
    out = attention(q, k, v, seq_idx=seq, window=5, cache=cache)
    mask = attention_mask(L, L, seq_idx_BL=seq, window=5)
    kk, vv = (t.repeat_interleave(H // K, dim=2) for t in (k, v))
    scores = torch.einsum("bqhe,bkhe->bhqk", q, kk) / E**0.5
    ref = torch.einsum("bhqk,bkhe->bqhe", scores.masked_fill(~mask, -torch.inf).softmax(-1), vv)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert any(key.startswith("attn_mask") for key in cache)
    again = attention(q, k, v, seq_idx=seq, window=5, cache=cache)
    assert torch.equal(out, again)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_matches_masked_sdpa_gpu(window: int | None, kv_heads: int) -> None:
    if ops.get_op("attention").available("cuda")[0].name != "varlen":
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    B, L, H, E = 2, 1024, 8, 64
    seq = packed_seq_idx(B, L).cuda()
    base = [torch.randn(B, L, n, E, device="cuda") for n in (H, kv_heads, kv_heads)]
    grad = torch.randn(B, L, H, E, device="cuda")

    def run(impl: str, dtype: torch.dtype) -> list[torch.Tensor]:
        t = [x.detach().to(dtype).requires_grad_(True) for x in base]
        out = attention(*t, seq_idx=seq, window=window, impl=impl)
        out.backward(grad.to(dtype))
        return [out.detach().float(), *(x.grad.float() for x in t)]

    ref = run("torch", torch.float32)
    var, sdpa = run("varlen", torch.bfloat16), run("torch", torch.bfloat16)
    for name, r, a, b in zip(["out", "dq", "dk", "dv"], ref, var, sdpa):
        err_var = ((a - r).abs().max() / r.abs().max()).item()
        err_sdpa = ((b - r).abs().max() / r.abs().max()).item()
        assert err_var <= 2 * err_sdpa + 1e-2, (name, err_var, err_sdpa)
