"""Mamba-2 mixer: the chunked whole-sequence path, the prefill/continuation path and the
token-by-token recurrent step agree (float64, relative error < 1e-10), and packed documents
(seq_idx) are independent."""

import pytest
import torch
from model_helpers import rel

from hybrid.model.context import ForwardContext
from hybrid.model.mamba2 import Mamba2Mixer
from hybrid.recipe.blocks import Mamba2Config

pytestmark = pytest.mark.usefixtures("float64_default")


def make(d_model=32, **kw):
    cfg = Mamba2Config(**{"d_state": 8, "head_dim": 8, "chunk_size": 8, **kw})
    torch.manual_seed(0)
    m = Mamba2Mixer(cfg, d_model)
    m.init_weights(0.2, 0.2)
    with torch.no_grad():  # non-trivial conv bias, D and norm weight
        m.D.uniform_(0.5, 1.5)
        if m.norm is not None:
            m.norm.weight.uniform_(0.5, 1.5)
    return m


CASES = [
    dict(),
    dict(n_groups=2),
    dict(d_has_hdim=True, conv_bias=False),
    dict(gated_norm=False),
    dict(norm_before_gate=True, n_groups=4),
    dict(bias=True, dt_limit=(0.01, 0.05)),
]


@pytest.mark.parametrize("kw", CASES)
def test_sequence_equals_token_by_token_steps(kw):
    m = make(**kw)
    x = torch.randn(2, 21, 32)  # 21: not a multiple of the chunk (8)
    y_full, _ = m(x, ForwardContext())
    state = m.empty_state(2)
    ys = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    assert rel(torch.stack(ys, 1), y_full) < 1e-10


@pytest.mark.parametrize("split", [1, 3, 8, 13])
def test_prefill_then_continue_equals_full(split):
    m = make(n_groups=2)
    x = torch.randn(2, 19, 32)
    y_full, _ = m(x, ForwardContext())
    states = {m.layer_idx: m.empty_state(2)}
    y1, _ = m(x[:, :split], ForwardContext(states=states))
    y2, _ = m(x[:, split:], ForwardContext(states=states))
    assert rel(torch.cat([y1, y2], 1), y_full) < 1e-10
    # and the state after prefill continues with the recurrent step
    states = {m.layer_idx: m.empty_state(2)}
    m(x[:, :split], ForwardContext(states=states))
    y_step, _ = m.step(x[:, split], states[m.layer_idx])
    assert rel(y_step, y_full[:, split]) < 1e-10


def test_packed_documents_are_independent():
    m = make(n_groups=2)
    lengths = [5, 1, 9, 8]
    docs = [torch.randn(1, n, 32) for n in lengths]
    packed = torch.cat(docs, 1)
    seq_idx = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], 1)
    y_packed, _ = m(packed, ForwardContext(seq_idx=seq_idx))
    y_alone = torch.cat([m(d, ForwardContext())[0] for d in docs], 1)
    assert rel(y_packed, y_alone) < 1e-10


def test_parameter_layout_matches_mamba_ssm():
    cfg = Mamba2Config(d_state=16, head_dim=16, n_groups=2)
    m = Mamba2Mixer(cfg, 64)
    d_inner, heads = 128, 8
    assert m.in_proj.weight.shape == (2 * d_inner + 2 * 2 * 16 + heads, 64)
    assert m.conv1d.weight.shape == (d_inner + 2 * 2 * 16, 1, 4)
    assert m.dt_bias.shape == m.A_log.shape == m.D.shape == (heads,)
    assert sum(p.numel() for p in m.parameters()) == cfg.num_params(64)


def test_init_matches_mamba_ssm_ranges():
    cfg = Mamba2Config(d_state=16, head_dim=16)
    m = Mamba2Mixer(cfg, 256)
    m.init_weights(0.02, 0.01)
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= cfg.dt_init_floor - 1e-12 and dt.max() <= cfg.dt_max + 1e-9
    A = torch.exp(m.A_log)
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert torch.equal(m.D, torch.ones_like(m.D))
