"""Causal conv1d references: against a naive loop (with documents and initial states),
decoding steps, split sequences, the two code paths, dtypes and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hybrid_kernels.conv1d_ref import causal_conv1d_ref, causal_conv1d_step_ref

F64 = torch.float64
DOCS = {2: [1, 1], 9: [3, 1, 5], 17: [4, 4, 1, 8]}  # document lengths per sequence length


def seq_idx_for(L: int, batch: int) -> torch.Tensor:
    """Row 0: the documents of DOCS[L]; other rows: one document."""
    lengths = torch.tensor(DOCS[L])
    row0 = torch.repeat_interleave(torch.arange(len(lengths)) * 3, lengths)
    return torch.stack([row0] + [torch.zeros(L, dtype=torch.long)] * (batch - 1))


def naive_conv(x, weight, bias, seq_idx, activation, init):
    """Loop over batch, position and tap, following the definition literally (fp64)."""
    batch, L, D = x.shape
    K = weight.shape[1]
    y = torch.zeros(batch, L, D, dtype=F64)
    for b in range(batch):
        for t in range(L):
            doc = None if seq_idx is None else seq_idx[b, t]
            for k in range(K):
                j = t - K + 1 + k
                if j >= 0:
                    if doc is not None and seq_idx[b, j] != doc:
                        continue
                    v = x[b, j].to(F64)
                else:
                    if init is None or (doc is not None and doc != seq_idx[b, 0]):
                        continue
                    v = init[b, :, K - 1 + j].to(F64)
                y[b, t] += weight[:, k].to(F64) * v
    if bias is not None:
        y += bias.to(F64)
    return F.silu(y) if activation == "silu" else y


def naive_final_states(x, K, seq_idx, init):
    """Last K-1 inputs (oldest first); those of other documents than the last are zero."""
    batch, L, D = x.shape
    init = init if init is not None else torch.zeros(batch, D, K - 1, dtype=x.dtype)
    allx = torch.cat([init, x.transpose(1, 2)], dim=-1)[..., L:]
    if seq_idx is not None:
        docs = torch.cat([seq_idx[:, :1].expand(batch, K - 1), seq_idx], dim=1)[:, L:]
        allx = allx * (docs == seq_idx[:, -1:])[:, None]
    return allx


def make(batch, L, D, K, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, D, generator=g, dtype=F64).to(dtype)
    w = torch.randn(D, K, generator=g, dtype=F64).to(dtype)
    bias = torch.randn(D, generator=g, dtype=F64).to(dtype)
    init = torch.randn(batch, D, K - 1, generator=g, dtype=F64).to(dtype)
    return x, w, bias, init


@pytest.mark.parametrize("with_init", [False, True], ids=["zero_init", "init"])
@pytest.mark.parametrize("with_seq", [False, True], ids=["no_seq", "seq"])
@pytest.mark.parametrize("L", [2, 9, 17])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_matches_naive_loop(K, L, with_seq, with_init):
    x, w, bias, init = make(2, L, 5, K, seed=K * 100 + L)
    bias = bias if K % 2 == 0 else None
    activation = "silu" if K >= 3 else None
    seq_idx = seq_idx_for(L, 2) if with_seq else None
    init = init if with_init else None
    y, final = causal_conv1d_ref(
        x,
        w,
        bias,
        seq_idx=seq_idx,
        activation=activation,
        initial_states=init,
        return_final_states=True,
    )
    assert y.shape == x.shape and final.shape == (2, 5, K - 1)
    torch.testing.assert_close(
        y, naive_conv(x, w, bias, seq_idx, activation, init), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(final, naive_final_states(x, K, seq_idx, init), rtol=0, atol=0)


@pytest.mark.parametrize("K", [2, 4])
def test_single_document_seq_idx_uses_same_result_as_fast_path(K):
    x, w, bias, init = make(2, 11, 6, K, seed=1)
    kw = dict(activation="silu", initial_states=init, return_final_states=True)
    y_fast, f_fast = causal_conv1d_ref(x, w, bias, **kw)
    seq_idx = torch.full((2, 11), 7)
    y_mask, f_mask = causal_conv1d_ref(x, w, bias, seq_idx=seq_idx, **kw)
    torch.testing.assert_close(y_mask, y_fast, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(f_mask, f_fast, rtol=0, atol=0)


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_step_iterated_matches_full(K, with_init):
    x, w, bias, init = make(2, 7, 5, K, seed=2)
    init = init if with_init else None
    y_ref, final_ref = causal_conv1d_ref(
        x, w, bias, activation="silu", initial_states=init, return_final_states=True
    )
    state = init.clone() if init is not None else torch.zeros(2, 5, K - 1, dtype=F64)
    ys = []
    for t in range(x.shape[1]):
        before = state.clone()
        y_t, new_state = causal_conv1d_step_ref(x[:, t], state, w, bias, "silu")
        assert torch.equal(state, before), "conv step modified its state in place"
        ys.append(y_t)
        state = new_state
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(state, final_ref, rtol=0, atol=0)


@pytest.mark.parametrize("cut", [1, 2, 5, 9])
@pytest.mark.parametrize("K", [2, 4])
def test_split_sequence_with_states(K, cut):
    x, w, bias, init = make(2, 10, 4, K, seed=3)
    y_full, f_full = causal_conv1d_ref(x, w, bias, initial_states=init, return_final_states=True)
    y1, f1 = causal_conv1d_ref(x[:, :cut], w, bias, initial_states=init, return_final_states=True)
    y2, f2 = causal_conv1d_ref(x[:, cut:], w, bias, initial_states=f1, return_final_states=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(f2, f_full, rtol=0, atol=0)


def test_packed_documents_equal_separate_runs():
    K, lengths = 4, [5, 1, 2, 9]
    x, w, bias, init = make(1, sum(lengths), 6, K, seed=4)
    seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))[None]
    y, final = causal_conv1d_ref(
        x,
        w,
        bias,
        seq_idx=seq_idx,
        activation="silu",
        initial_states=init,
        return_final_states=True,
    )
    start = 0
    for i, n in enumerate(lengths):
        y_doc, f_doc = causal_conv1d_ref(
            x[:, start : start + n],
            w,
            bias,
            activation="silu",
            initial_states=init if i == 0 else None,
            return_final_states=True,
        )
        torch.testing.assert_close(y[:, start : start + n], y_doc, rtol=1e-13, atol=1e-13)
        start += n
    torch.testing.assert_close(final, f_doc, rtol=0, atol=0)


@pytest.mark.parametrize("with_seq", [False, True])
def test_fp32_and_bf16_against_fp64(with_seq):
    x, w, bias, init = make(2, 17, 8, 4, seed=5)
    seq_idx = seq_idx_for(17, 2) if with_seq else None
    kw = dict(seq_idx=seq_idx, activation="silu")
    ref = causal_conv1d_ref(x, w, bias, initial_states=init, **kw)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        y = causal_conv1d_ref(
            x.to(dtype), w.to(dtype), bias.to(dtype), initial_states=init.to(dtype), **kw
        )
        assert y.dtype == dtype
        assert ((y.to(F64) - ref).abs().max() / ref.abs().max()).item() < tol


def test_gradcheck_with_documents():
    x, w, bias, init = make(1, 6, 2, 3, seed=6)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2]])
    tensors = tuple(t.requires_grad_() for t in (x, w, bias, init))

    def fn(x, w, bias, init):
        return causal_conv1d_ref(
            x, w, bias, seq_idx=seq_idx, activation="silu", initial_states=init
        )

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradcheck(
        lambda x, w, b, i: causal_conv1d_ref(x, w, b, initial_states=i), tensors
    )


def test_bad_arguments():
    x, w, bias, _ = make(1, 4, 3, 2)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_ref(x, w, activation="relu")
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_ref(x, torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="initial_states"):
        causal_conv1d_ref(x, w, initial_states=torch.zeros(1, 3, 3, dtype=F64))
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_step_ref(x[:, 0], torch.zeros(1, 3, 2, dtype=F64), w)
