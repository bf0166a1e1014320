"""`ops.linear_cross_entropy` against F.cross_entropy over the full logits.

fp64: values and gradients to 1e-10 (relative); bf16 autocast: against the same computation in
fp32 to bf16 tolerances. Shapes include a token count that is not a multiple of the chunk, and a
vocabulary that is not one either."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid import ops
from hybrid.ops.cross_entropy import auto_chunk_tokens

IGNORE = -100


def reference(h, w, labels):
    return F.cross_entropy(
        (h @ w.T).to(torch.promote_types(h.dtype, torch.float32)),
        labels,
        ignore_index=IGNORE,
        reduction="sum",
    )


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def make(n, d, v, *, dtype=torch.float64, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    return h, w, labels


def check_against_reference(h, w, labels, chunk, grad_scale=1.0):
    h1, w1 = leaves(h, w)
    h2, w2 = leaves(h, w)
    ours = ops.linear_cross_entropy(h1, w1, labels, chunk_tokens=chunk)
    ref = reference(h2, w2, labels)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    (ours * grad_scale).backward()
    (ref * grad_scale).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,d,v,chunk", [(37, 16, 50, 8), (64, 8, 33, 64), (10, 4, 7, 3)])
def test_fp64_values_and_grads_match_full_logits(n, d, v, chunk):
    h, w, labels = make(n, d, v)
    check_against_reference(h, w, labels, chunk, grad_scale=0.37)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    h, w, _ = make(9, 4, 11)
    labels = torch.full((9,), IGNORE)
    h1, w1 = leaves(h, w)
    loss = ops.linear_cross_entropy(h1, w1, labels, chunk_tokens=4)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.count_nonzero(h1.grad) == 0 and torch.count_nonzero(w1.grad) == 0


def test_default_chunk_and_auto_size():
    h, w, labels = make(20, 8, 13)
    check_against_reference(h, w, labels, None)
    assert auto_chunk_tokens(100_000, 32000) == 8192
    assert auto_chunk_tokens(100, 32000) == 100
    assert auto_chunk_tokens(10**6, 10**9) == 256


def test_tied_weight_accumulates_both_gradients():
    """A tied head: the embedding lookup's and the head's gradients add up in one weight."""
    g = torch.Generator().manual_seed(1)
    v, d, n = 19, 6, 23
    ids = torch.randint(0, v, (n,), generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE
    base = torch.randn(v, d, generator=g, dtype=torch.float64)
    grads = []
    for chunked in (True, False):
        emb = torch.nn.Embedding(v, d, dtype=torch.float64)
        with torch.no_grad():
            emb.weight.copy_(base)
        h = torch.tanh(emb(ids))
        if chunked:
            loss = ops.linear_cross_entropy(h, emb.weight, labels, chunk_tokens=7)
        else:
            loss = reference(h, emb.weight, labels)
        loss.backward()
        grads.append(emb.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_bf16_autocast_matches_fp32_logits_within_bf16_error():
    h, w, labels = make(48, 32, 40, dtype=torch.float32, seed=3)
    h1, w1 = leaves(h, w)
    h2, w2 = leaves(h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ops.linear_cross_entropy(h1, w1, labels, chunk_tokens=16)
        ref = F.cross_entropy(
            F.linear(h2, w2).float(), labels, ignore_index=IGNORE, reduction="sum"
        )
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-3, atol=1e-3)
    ours.backward()
    ref.backward()
    assert h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
    torch.testing.assert_close(h1.grad, h2.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=2e-2, atol=2e-2)


def test_no_grad_computes_only_the_loss():
    h, w, labels = make(12, 4, 9)
    with torch.no_grad():
        loss = ops.linear_cross_entropy(h, w, labels, chunk_tokens=5)
    torch.testing.assert_close(loss, reference(h, w, labels), rtol=1e-10, atol=1e-10)


def test_bad_shapes_raise():
    h, w, labels = make(6, 4, 5)
    with pytest.raises(ValueError, match="labels"):
        ops.linear_cross_entropy(h, w, labels[:3])
    with pytest.raises(ValueError, match=r"weight \(V, D\)"):
        ops.linear_cross_entropy(h, w[:, :3], labels)
    with pytest.raises(ValueError, match="chunk_tokens"):
        ops.linear_cross_entropy(h, w, labels, chunk_tokens=0)


def test_registered_as_an_op():
    assert "linear_cross_entropy" in ops.op_names()
    assert ops.get_op("linear_cross_entropy").select("cpu").name == "torch"


@pytest.mark.gpu
def test_cuda_bf16_autocast_matches_and_never_holds_full_logits():
    """On a GPU under bf16 autocast: within bf16 error of full bf16 logits cast to fp32 (what
    the LM did before), and the peak extra memory stays well under one fp32 (N, V) logits."""
    dev = torch.device("cuda")
    n, d, v, chunk = 8192, 256, 32000, 1024
    h, w, labels = make(n, d, v, dtype=torch.float32, seed=5)
    h, w, labels = h.to(dev), (w * 0.2).to(dev), labels.to(dev)  # logits of std ~1.6
    h1, w1 = leaves(h, w)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = ops.linear_cross_entropy(h1, w1, labels, chunk_tokens=chunk)
    ours.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.5 * n * v * 4, f"peak extra {extra / 2**20:.0f} MiB"
    h2, w2 = leaves(h, w)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = F.linear(h2, w2).float()
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=2e-2, atol=2e-2)
