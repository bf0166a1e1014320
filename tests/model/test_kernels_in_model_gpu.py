"""On a GPU the model runs on the Triton kernels (chosen automatically); the same model with every
op forced to the PyTorch reference (HYBRID_OPS_IMPL=torch) gives the same loss and gradients.

fp32 (the kernels keep fp32 dot products for fp32 inputs), packed documents, a hybrid layout
with Mamba-2, attention, MLP and MoE sublayers. Tolerance: relative 1e-4 on the loss and 2e-3 on
every gradient (max abs difference over max abs of the reference's gradient).
"""

from __future__ import annotations

import pytest
import torch

from hybrid.model.lm import build_model
from hybrid.recipe.blocks import Mamba2Config
from hybrid.recipe.layout import LayoutConfig
from hybrid.recipe.model_config import ModelConfig

pytestmark = pytest.mark.gpu


def tiny_hybrid() -> ModelConfig:
    return ModelConfig(
        d_model=128,
        vocab_size=96,
        layout=LayoutConfig(pattern="M-M*ME"),
        mamba=Mamba2Config(d_state=32, head_dim=32, n_groups=2, chunk_size=64),
    )


def loss_and_grads(model, tokens, seq_idx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(tokens[:, :-1], labels=tokens[:, 1:], seq_idx=seq_idx, return_logits=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_on_triton_kernels_matches_pytorch_reference(monkeypatch) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_hybrid(), device="cuda")
    tokens = torch.randint(0, 96, (2, 301), device="cuda")
    seq_idx = torch.zeros(2, 300, dtype=torch.long, device="cuda")
    seq_idx[0, 120:] = 1
    seq_idx[1, 250:] = 1
    monkeypatch.delenv("HYBRID_OPS_IMPL", raising=False)
    loss_k, grads_k = loss_and_grads(model, tokens, seq_idx)
    monkeypatch.setenv("HYBRID_OPS_IMPL", "torch")
    loss_t, grads_t = loss_and_grads(model, tokens, seq_idx)
    assert abs(loss_k.item() - loss_t.item()) <= 1e-4 * abs(loss_t.item())
    for name, ref in grads_t.items():
        err = ((grads_k[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        assert err <= 2e-3, (name, err)


def test_ssd_op_is_chosen_automatically_on_cuda() -> None:
    from hybrid.ops.ssd import SSD

    assert SSD.select(torch.device("cuda")).name == "triton"
