"""Dense MLP: the formula per activation, parameter count, init."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid.model.mlp import MLP
from hybrid.recipe.blocks import MLPConfig

D = 12


def _linear(x, lin):
    y = x @ lin.weight.t()
    return y if lin.bias is None else y + lin.bias


def _built(cfg: MLPConfig) -> MLP:
    torch.manual_seed(0)
    mlp = MLP(cfg, D).double()
    mlp.init_weights(0.3, 0.2)
    for p in mlp.parameters():  # nonzero biases so they are checked too
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.1)
    return mlp


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "squared_relu", "gelu"])
def test_mlp_matches_formula(activation, bias):
    mlp = _built(MLPConfig(activation=activation, hidden_size=20, bias=bias))
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y, aux = mlp(x, None)
    assert aux is None and y.shape == x.shape
    up = _linear(x, mlp.up_proj)
    if activation == "swiglu":
        g = _linear(x, mlp.gate_proj)
        h = g * torch.sigmoid(g) * up
    elif activation == "squared_relu":
        assert mlp.gate_proj is None
        h = torch.clamp(up, min=0) ** 2
    else:
        assert mlp.gate_proj is None
        h = 0.5 * up * (1 + torch.erf(up / math.sqrt(2)))
    torch.testing.assert_close(y, _linear(h, mlp.down_proj), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "squared_relu", "gelu"])
@pytest.mark.parametrize("d_model", [64, 100])
def test_mlp_param_count_on_meta(activation, bias, d_model):
    cfg = MLPConfig(activation=activation, bias=bias, multiple_of=32)
    with torch.device("meta"):
        mlp = MLP(cfg, d_model)
    assert sum(p.numel() for p in mlp.parameters()) == cfg.num_params(d_model)
    names = {n for n, _ in mlp.named_parameters()}
    expected = {"up_proj.weight", "down_proj.weight"}
    if activation == "swiglu":
        expected.add("gate_proj.weight")
    if bias:
        expected |= {n.replace("weight", "bias") for n in expected}
    assert names == expected


def test_mlp_init_weights():
    torch.manual_seed(0)
    mlp = MLP(MLPConfig(hidden_size=512, bias=True), 256)
    mlp.init_weights(0.02, 0.005)
    assert abs(mlp.gate_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(mlp.up_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(mlp.down_proj.weight.std().item() - 0.005) < 3e-4
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert torch.count_nonzero(lin.bias) == 0


def test_mlp_gradients_flow():
    mlp = _built(MLPConfig(hidden_size=8))
    x = torch.randn(3, 4, D, dtype=torch.float64, requires_grad=True)
    y, _ = mlp(x, None)
    assert torch.autograd.gradcheck(lambda t: mlp(t, None)[0], (x,))
    y.sum().backward()
    assert all(p.grad is not None for p in mlp.parameters())
