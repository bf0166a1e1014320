"""The analytic FLOPs and cache figures of the configs, checked against real modules:
torch's FlopCounterMode on a forward pass, and the sizes of the inference states."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hybrid.model.attention import Attention
from hybrid.model.context import ForwardContext
from hybrid.model.mamba2 import Mamba2Mixer
from hybrid.model.mlp import MLP
from hybrid.model.moe import MoE
from hybrid.recipe.blocks import AttentionConfig, Mamba2Config, MLPConfig, MoEConfig

D, L = 64, 32


def counted(module, x):
    with FlopCounterMode(display=False) as counter:
        module(x, ForwardContext())
    return counter.get_total_flops(), counter.get_flop_counts()


@pytest.mark.parametrize("activation", ["swiglu", "squared_relu", "gelu"])
def test_mlp_flops_exact(activation):
    cfg = MLPConfig(activation=activation, hidden_size=96)
    m = MLP(cfg, D)
    total, _ = counted(m, torch.randn(1, L, D))
    assert total == cfg.flops_per_token(D, L) * L


def test_moe_flops_exact():
    cfg = MoEConfig(n_experts=8, top_k=2, expert_hidden_size=48, n_shared_experts=1)
    m = MoE(cfg, D)
    m.init_weights(0.02, 0.02)
    total, _ = counted(m, torch.randn(1, L, D))
    # the counter sees the router, top_k experts and the shared expert; the figure also has
    # the weighted combine (2 * top_k * D a token), an elementwise product and sum
    combine = 2 * cfg.top_k * D * L
    assert total + combine == cfg.flops_per_token(D, L) * L


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=2)])
def test_attention_projection_flops_exact_and_causal_scores(kw):
    cfg = AttentionConfig(n_heads=4, **kw)
    m = Attention(cfg, D)
    total, _ = counted(m, torch.randn(1, L, D))
    # the counter sees the four projections (it has no formula for CPU SDPA); our figure adds
    # QK^T and AV over the causal half actually needed: mean context (L+1)/2 keys per query
    q = cfg.n_heads * cfg.resolved_head_dim(D)
    assert total == (cfg.flops_per_token(D, L) - 4 * q * (L + 1) / 2) * L


def test_mamba_projection_and_conv_flops_exact():
    cfg = Mamba2Config(d_state=16, head_dim=16, chunk_size=8)
    m = Mamba2Mixer(cfg, D)
    _, per_module = counted(m, torch.randn(1, L, D))
    proj = sum(
        per_module["Mamba2Mixer." + name].get(torch.ops.aten.mm, 0)
        for name in ("in_proj", "out_proj")
    )
    d_inner, heads = cfg.d_inner(D), cfg.n_heads(D)
    rows = 2 * d_inner + 2 * cfg.d_state + heads
    assert proj == 2 * L * D * rows + 2 * L * d_inner * D
    formula_proj = 2 * D * rows + 2 * d_inner * D
    ssd_and_conv = cfg.flops_per_token(D, L) - formula_proj
    assert ssd_and_conv > 0


@pytest.mark.parametrize("context", [16, 1024])
def test_cache_bytes_match_the_states(context):
    mcfg = Mamba2Config(d_state=16, head_dim=16)
    m = Mamba2Mixer(mcfg, D).to(torch.bfloat16)
    st = m.empty_state(1)
    size = st.conv.numel() * st.conv.element_size() + st.ssm.numel() * st.ssm.element_size()
    assert size == mcfg.cache_bytes(D, context)  # independent of the context
    acfg = AttentionConfig(n_heads=4, n_kv_heads=2)
    kv_per_token = 2 * 2 * acfg.resolved_head_dim(D) * 2  # k and v, 2 kv heads, bf16
    assert acfg.cache_bytes(D, context) == kv_per_token * context
    window = AttentionConfig(n_heads=4, n_kv_heads=2, sliding_window=64)
    assert window.cache_bytes(D, context) == kv_per_token * min(context, 64)
