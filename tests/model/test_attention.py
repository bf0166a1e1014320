"""Attention sublayer against a naive softmax implementation written here from the formula."""

import math

import pytest
import torch
from model_helpers import rel

from hybrid.model.attention import Attention
from hybrid.model.context import ForwardContext
from hybrid.recipe.blocks import AttentionConfig

pytestmark = pytest.mark.usefixtures("float64_default")


def naive_rope(x, pos, rotary_dim, theta):
    """Pairs (i, i + R/2) rotated by angle pos * theta^(-2i/R)."""
    out = x.clone()
    half = rotary_dim // 2
    for i in range(half):
        ang = pos[..., None].double() * theta ** (-2 * i / rotary_dim)  # (B,L,1)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * ang.cos() - b * ang.sin()
        out[..., i + half] = b * ang.cos() + a * ang.sin()
    return out


def naive_attention(m: Attention, x, seq_idx=None):
    cfg = m.cfg
    B, L, _ = x.shape
    H, K, E = m.n_heads, m.n_kv, m.head_dim
    q = m.q_proj(x).view(B, L, H, E)
    k = m.k_proj(x).view(B, L, K, E)
    v = m.v_proj(x).view(B, L, K, E)
    if cfg.qk_norm:
        q = q / q.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * m.q_norm.weight
        k = k / k.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * m.k_norm.weight
    if seq_idx is None:
        seq_idx = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, L)
    for b in range(B):
        for t in range(1, L):
            same = seq_idx[b, t] == seq_idx[b, t - 1]
            pos[b, t] = pos[b, t - 1] + 1 if same else 0
    if cfg.position == "rope":
        q = naive_rope(q, pos, m.rotary_dim, cfg.rope_theta)
        k = naive_rope(k, pos, m.rotary_dim, cfg.rope_theta)
    out = torch.zeros(B, L, H, E)
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)
            s = q[b, :, h] @ k[b, :, kh].T / math.sqrt(E)
            for i in range(L):
                for j in range(L):
                    ok = j <= i and seq_idx[b, i] == seq_idx[b, j]
                    if cfg.sliding_window is not None:
                        ok = ok and i - j < cfg.sliding_window
                    if not ok:
                        s[i, j] = -math.inf
            out[b, :, h] = torch.softmax(s, -1) @ v[b, :, kh]
    return m.o_proj(out.reshape(B, L, H * E))


def make(d_model=32, **kw):
    torch.manual_seed(0)
    m = Attention(AttentionConfig(**{"n_heads": 4, **kw}), d_model)
    m.init_weights(0.3, 0.3)
    if m.q_norm is not None:
        with torch.no_grad():
            m.q_norm.weight.uniform_(0.5, 1.5)
            m.k_norm.weight.uniform_(0.5, 1.5)
    return m


CASES = [
    dict(),
    dict(n_kv_heads=2),
    dict(n_kv_heads=1, position="none"),
    dict(rotary_fraction=0.5, rope_theta=500.0),
    dict(qk_norm=True, bias=True),
    dict(sliding_window=3, n_kv_heads=2),
    dict(head_dim=16),
]


@pytest.mark.parametrize("kw", CASES)
def test_matches_naive_softmax(kw):
    m = make(**kw)
    x = torch.randn(2, 9, 32)
    y, _ = m(x, ForwardContext())
    assert rel(y, naive_attention(m, x)) < 1e-10


@pytest.mark.parametrize("kw", CASES)
def test_packed_documents_match_naive_and_restart_positions(kw):
    m = make(**kw)
    x = torch.randn(2, 10, 32)
    seq_idx = torch.tensor([[0] * 4 + [1] * 1 + [2] * 5, [0] * 10])
    y, _ = m(x, ForwardContext(seq_idx=seq_idx))
    assert rel(y, naive_attention(m, x, seq_idx)) < 1e-10


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=2, sliding_window=4)])
def test_kv_cache_decode_equals_full(kw):
    m = make(**kw)
    x = torch.randn(2, 11, 32)
    y_full, _ = m(x, ForwardContext())
    states = {m.layer_idx: m.empty_state(2)}
    y_pre, _ = m(x[:, :6], ForwardContext(states=states))
    outs = [y_pre]
    for t in range(6, 11):
        y, _ = m(x[:, t : t + 1], ForwardContext(states=states, position_offset=t))
        outs.append(y)
    assert rel(torch.cat(outs, 1), y_full) < 1e-10


def test_param_count():
    cfg = AttentionConfig(n_heads=8, n_kv_heads=2, qk_norm=True, bias=True)
    m = Attention(cfg, 64)
    assert sum(p.numel() for p in m.parameters()) == cfg.num_params(64)
