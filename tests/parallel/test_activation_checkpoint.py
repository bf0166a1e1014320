"""Activation checkpointing applied from outside: selective and full give the gradients of the
plain model and keep the canonical state-dict names."""

import pytest
import torch

from hybrid.model import build_model
from hybrid.parallel.activation_checkpoint import apply_activation_checkpointing
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import from_dict

CFG = {
    "d_model": 32,
    "vocab_size": 40,
    "layout": {"pattern": "M-*E"},
    "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 8},
    "attention": {"n_heads": 4},
    "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 16},
}


def grads_of(model, ids):
    out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss + out.aux_loss).backward()
    return {
        n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_gives_the_same_gradients_and_names(mode):
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, CFG)
    ref = build_model(cfg)
    ids = torch.randint(0, 40, (2, 17))
    model = build_model(cfg)
    model.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(model, mode)
    assert set(model.state_dict()) == set(ref.state_dict())
    expected, got = grads_of(ref, ids), grads_of(model, ids)
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6)


def test_unknown_mode_is_rejected():
    model = build_model(from_dict(ModelConfig, CFG), device="meta")
    with pytest.raises(ValueError, match="unknown activation_checkpointing"):
        apply_activation_checkpointing(model, "sometimes")
