"""The whole LM: packed documents equal each document alone, parameter counts equal the
config's figures exactly, recurrent decoding equals the full forward."""

import pytest
import torch
from model_helpers import rel

from hybrid.model import build_model
from hybrid.recipe.analysis import model_figures
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import from_dict


def tiny_cfg(**kw) -> ModelConfig:
    base = {
        "d_model": 32,
        "vocab_size": 50,
        "pad_vocab_multiple": 16,
        "layout": {"pattern": "M-*EM-*E"},
        "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 8, "n_groups": 2},
        "attention": {"n_heads": 4, "n_kv_heads": 2},
        "mlp": {"hidden_size": 48},
        "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 24, "n_shared_experts": 1},
    }
    base.update(kw)
    return from_dict(ModelConfig, base)


@pytest.mark.parametrize("position", ["rope", "none"])
def test_packed_documents_equal_each_document_alone(position):
    torch.manual_seed(0)
    cfg = tiny_cfg(attention={"n_heads": 4, "n_kv_heads": 2, "position": position})
    model = build_model(cfg, dtype=torch.float64)
    lengths = [7, 1, 12, 9]
    docs = [torch.randint(0, 50, (1, n)) for n in lengths]
    packed = torch.cat(docs, 1)
    seq_idx = torch.cat(
        [torch.full((1, n), i, dtype=torch.int32) for i, n in enumerate(lengths)], 1
    )
    with torch.no_grad():
        packed_logits = model(packed, seq_idx=seq_idx).logits
        alone = torch.cat([model(d).logits for d in docs], 1)
        unmasked = model(packed).logits
    assert rel(packed_logits, alone) < 1e-10
    assert rel(unmasked, alone) > 1e-3  # without seq_idx the documents do leak into each other


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_embeddings": True},
        {"layout": {"pattern": "MMMM"}},
        {"layout": {"pattern": "*-*-"}, "attention": {"n_heads": 4, "qk_norm": True}},
        {"moe": {"n_experts": 8, "top_k": 2, "router": "sigmoid", "activation": "squared_relu"}},
    ],
)
def test_param_count_on_meta_equals_config_figures(kw):
    cfg = tiny_cfg(**kw)
    model = build_model(cfg, device="meta")
    figures = model_figures(cfg, seq_len=64, context=64)
    assert model.num_params() == figures.params_total


def test_active_params_counts_top_k_experts():
    cfg = tiny_cfg()
    fig = model_figures(cfg, seq_len=64, context=64)
    per_expert = 3 * 32 * 24
    assert fig.params_total - fig.params_active == 2 * (4 - 2) * per_expert


def test_recurrent_decode_equals_full_forward():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        states = model.empty_states(2, dtype=torch.float64)
        pre = model(ids[:, :5], states=states).logits
        outs = [pre]
        for t in range(5, 13):
            outs.append(model(ids[:, t : t + 1], states=states).logits)  # offset from the cache
    assert rel(torch.cat(outs, 1), full) < 1e-10


def test_loss_and_aux_loss_have_gradients():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    ids = torch.randint(0, 50, (2, 16))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    assert out.loss.ndim == 0 and out.aux_loss.ndim == 0
    assert set(out.moe) == {3, 7}
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_loss_is_the_label_token_mean_and_finite_without_labels():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    ids = torch.randint(0, 50, (2, 9))
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100
    out = model(ids[:, :-1], labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    assert torch.allclose(out.loss, ref, rtol=1e-6)
    empty = model(ids[:, :-1], labels=torch.full_like(labels, -100))
    empty.loss.backward()
    assert empty.loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
