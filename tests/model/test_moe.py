"""MoE sublayer against a dense reference (every expert on every token), routing edge cases,
capacity drops, auxiliary losses, expert-bias updates and parameter counts.

Legend: B batch, L length, T tokens, D width, E experts, K top_k, F expert hidden.
"""

from __future__ import annotations

import math

import pytest
import torch

from hybrid.model.moe import MoE, MoEStats
from hybrid.recipe.blocks import MoEConfig

D = 16
ACT = {
    "swiglu": lambda up, gate: gate * torch.sigmoid(gate) * up,
    "squared_relu": lambda up, gate: torch.clamp(up, min=0) ** 2,
    "gelu": lambda up, gate: 0.5 * up * (1 + torch.erf(up / math.sqrt(2))),
}


def _cfg(**kw) -> MoEConfig:
    base = dict(n_experts=8, top_k=3, expert_hidden_size=10, aux_loss_coef=0.01, z_loss_coef=0.001)
    base.update(kw)
    return MoEConfig(**base)


def _build(cfg: MoEConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg, D).double()
    moe.init_weights(0.5, 0.3)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.2)
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.normal_(0, 0.3)
    return moe


def _dense_weights(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, E) routing weights, zero for experts not selected, from the formulas."""
    cfg = moe.cfg
    logits = x_TD @ moe.router.weight.t()
    bias = 0 if moe.router.expert_bias is None else moe.router.expert_bias.double()
    if cfg.router == "sigmoid":
        score = torch.sigmoid(logits)
    else:
        score = torch.softmax(logits, -1) if cfg.router == "softmax_topk" else logits
    rank = torch.argsort(torch.argsort(score + bias, dim=-1, descending=True), dim=-1)
    mask = rank < cfg.top_k
    if cfg.router == "topk_softmax":
        w = torch.where(mask, torch.exp(logits - logits.max(-1, keepdim=True).values), 0.0)
        w = w / w.sum(-1, keepdim=True)
    else:
        w = torch.where(mask, score, 0.0)
        if cfg.renormalize:
            w = w / (w.sum(-1, keepdim=True) + (1e-20 if cfg.router == "sigmoid" else 0.0))
    return w * cfg.routed_scaling_factor


def _all_experts(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """(E, T, D): every expert applied to every token."""
    ex = moe.experts

    def proj(x, w, b, eq):
        y = torch.einsum(eq, x, w)
        return y if b is None else y + b[:, None, :]

    up = proj(x_TD, ex.up_proj, ex.up_proj_bias, "td,edf->etf")
    gate = None
    if ex.gate_proj is not None:
        gate = proj(x_TD, ex.gate_proj, ex.gate_proj_bias, "td,edf->etf")
    h = ACT[moe.cfg.activation](up, gate)
    return proj(h, ex.down_proj, ex.down_proj_bias, "etf,efd->etd")


def _dense_moe(moe: MoE, x_BLD: torch.Tensor, w_TE: torch.Tensor | None = None) -> torch.Tensor:
    x_TD = x_BLD.reshape(-1, D)
    w_TE = _dense_weights(moe, x_TD) if w_TE is None else w_TE
    y_TD = torch.einsum("te,etd->td", w_TE, _all_experts(moe, x_TD))
    if moe.shared_experts is not None:
        y_TD = y_TD + moe.shared_experts(x_TD)[0]
    return y_TD.view(x_BLD.shape)


def _assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    err = (a - b).abs().max().item()
    assert err <= tol * max(b.abs().max().item(), 1e-30), (err, b.abs().max().item())


def _grads(moe: MoE, fn, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    params = list(moe.parameters())
    out = torch.autograd.grad(fn(x), [x, *params], g, allow_unused=True)
    return [torch.zeros_like(t) if o is None else o for o, t in zip(out, [x, *params])]


CONFIGS = [
    *[
        dict(router=r, renormalize=rn)
        for r in ("softmax_topk", "topk_softmax", "sigmoid")
        for rn in (True, False)
    ],
    dict(router="sigmoid", n_shared_experts=2, routed_scaling_factor=2.5),
    dict(router="softmax_topk", renormalize=False, routed_scaling_factor=0.7, n_shared_experts=1),
    dict(router="softmax_topk", activation="squared_relu", bias=True),
    dict(router="topk_softmax", activation="gelu", n_shared_experts=1, shared_hidden_size=6),
    dict(router="sigmoid", activation="swiglu", bias=True, n_shared_experts=1),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_moe_matches_dense_reference(kw):
    moe = _build(_cfg(**kw))
    x = torch.randn(3, 7, D, dtype=torch.float64)
    y, stats = moe(x, None)
    assert isinstance(stats, MoEStats) and stats.dropped_fraction.item() == 0.0
    _assert_rel(y, _dense_moe(moe, x))
    g = torch.randn_like(x)
    got = _grads(moe, lambda t: moe(t, None)[0], x, g)
    ref = _grads(moe, lambda t: _dense_moe(moe, t), x, g)
    for (name, _), a, b in zip([("x", None), *moe.named_parameters()], got, ref):
        assert a.abs().max() > 0 or b.abs().max() == 0, name
        _assert_rel(a, b)


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_ties_do_not_matter(router, renormalize):
    """A zero router ties every expert; with identical experts any pick gives the same output."""
    moe = _build(_cfg(router=router, renormalize=renormalize))
    with torch.no_grad():
        moe.router.weight.zero_()
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.zero_()
        for p in moe.experts.parameters():
            p.copy_(p[:1].expand_as(p))
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y, _ = moe(x, None)
    k, e = moe.cfg.top_k, moe.cfg.n_experts
    total = {
        "softmax_topk": 1.0 if renormalize else k / e,
        "topk_softmax": 1.0,
        "sigmoid": 1.0 if renormalize else 0.5 * k,
    }[router]
    expected = total * _all_experts(moe, x.reshape(-1, D))[0]
    _assert_rel(y.reshape(-1, D), expected, tol=1e-12)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid"])
def test_single_token_leaves_experts_empty(router):
    moe = _build(_cfg(router=router))
    x = torch.randn(1, 1, D, dtype=torch.float64)
    y, stats = moe(x, None)
    assert int((stats.expert_load > 0).sum()) == moe.cfg.top_k
    _assert_rel(y, _dense_moe(moe, x))


def test_all_tokens_to_two_experts():
    moe = _build(_cfg(router="softmax_topk", top_k=2))
    with torch.no_grad():
        moe.router.weight[:, 0] = 0.0
        moe.router.weight[:2, 0] = 50.0
    x = torch.randn(2, 6, D, dtype=torch.float64)
    x[..., 0] = 1.0
    y, stats = moe(x, None)
    torch.testing.assert_close(
        stats.expert_load, torch.tensor([0.5, 0.5] + [0.0] * 6, dtype=torch.float64)
    )
    _assert_rel(y, _dense_moe(moe, x))
    x_grad = _grads(moe, lambda t: moe(t, None)[0], x, torch.ones_like(x))
    ref_grad = _grads(moe, lambda t: _dense_moe(moe, t), x, torch.ones_like(x))
    for a, b in zip(x_grad, ref_grad):
        _assert_rel(a, b)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_exactly_the_assignments_beyond_capacity(capacity_factor):
    moe = _build(_cfg(router="softmax_topk", n_experts=4, top_k=2, capacity_factor=capacity_factor))
    with torch.no_grad():
        moe.router.weight[0, 0] = 5.0  # skew the load toward expert 0
    x = torch.randn(2, 9, D, dtype=torch.float64)
    x[..., 0] = 1.0
    y, stats = moe(x, None)
    x_TD = x.reshape(-1, D)
    T, K, E = x_TD.shape[0], 2, 4
    capacity = math.ceil(capacity_factor * T * K / E)
    route = moe.router(x_TD)
    w_TE = torch.zeros(T, E, dtype=torch.float64)
    seen, dropped = [0] * E, 0
    for t in range(T):
        for k in range(K):
            e = int(route.expert_idx[t, k])
            if seen[e] < capacity:
                w_TE[t, e] = route.weights[t, k]
            else:
                dropped += 1
            seen[e] += 1
    assert dropped > 0 or capacity_factor > 1.0
    assert stats.dropped_fraction.item() == pytest.approx(dropped / (T * K), abs=1e-12)
    _assert_rel(y, _dense_moe(moe, x, w_TE))


def test_uniform_router_aux_losses():
    for router in ("softmax_topk", "topk_softmax", "sigmoid"):
        moe = _build(_cfg(router=router, top_k=2))
        with torch.no_grad():
            moe.router.weight.zero_()
        moe.float()
        _, stats = moe(torch.randn(2, 8, D, dtype=torch.float32), None)
        assert stats.load_balance_loss.item() == 1.0, router
        assert stats.z_loss.item() == pytest.approx(math.log(8) ** 2, rel=1e-6)
        assert stats.router_entropy.item() == pytest.approx(math.log(8), rel=1e-6)
        assert stats.expert_load.sum().item() == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax", "sigmoid"])
def test_aux_losses_match_formulas(router):
    moe = _build(_cfg(router=router, aux_loss_coef=0.1, z_loss_coef=0.01))
    x = torch.randn(4, 5, D, dtype=torch.float64)
    _, stats = moe(x, None)
    x_TD = x.reshape(-1, D)
    logits = x_TD @ moe.router.weight.t()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    if router == "sigmoid":
        probs = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    else:
        probs = torch.softmax(logits, -1)
    picks = (_dense_weights(moe, x_TD) != 0).double()
    f = picks.sum(0) / picks.sum()
    lb = 8 * (f * probs.mean(0)).sum()
    entropy = -(probs * probs.log()).sum(-1).mean()
    _assert_rel(stats.z_loss, z, 1e-12)
    _assert_rel(stats.load_balance_loss, lb, 1e-12)
    _assert_rel(stats.expert_load, f, 1e-12)
    _assert_rel(stats.router_entropy, entropy, 1e-12)
    _assert_rel(stats.aux_loss, 0.1 * lb + 0.01 * z, 1e-12)
    for t in (stats.load_balance_loss, stats.z_loss, stats.expert_load, stats.router_entropy):
        assert not t.requires_grad
    (grad,) = torch.autograd.grad(stats.aux_loss, moe.router.weight)
    (ref,) = torch.autograd.grad(0.1 * lb + 0.01 * z, moe.router.weight)
    _assert_rel(grad, ref, 1e-12)


def test_update_expert_bias():
    moe = _build(_cfg(router="sigmoid", top_k=2, n_experts=4))
    with torch.no_grad():
        moe.router.expert_bias.zero_()
    moe.update_expert_bias(torch.tensor([4.0, 1.0, 1.0, 2.0]), rate=0.01)
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.0])
    assert "router.expert_bias" in moe.state_dict()
    assert moe.to(torch.bfloat16).router.expert_bias.dtype == torch.float32
    with pytest.raises(RuntimeError, match="score-correction"):
        _build(_cfg(router="softmax_topk")).update_expert_bias(torch.ones(8), 0.01)


def test_expert_bias_only_selects():
    moe = _build(_cfg(router="sigmoid", top_k=1, n_experts=4, renormalize=False))
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    x = torch.randn(1, 6, D, dtype=torch.float64)
    route = moe.router(x.reshape(-1, D))
    assert (route.expert_idx == 3).all()
    logits = x.reshape(-1, D) @ moe.router.weight.t()
    _assert_rel(route.weights[:, 0], torch.sigmoid(logits[:, 3]), 1e-12)


def test_bf16_forward_close_to_float64():
    moe = _build(_cfg(router="softmax_topk", n_shared_experts=1))
    x = torch.randn(2, 9, D, dtype=torch.float64)
    y64, _ = moe(x, None)
    y16, stats = moe.to(torch.bfloat16)(x.bfloat16(), None)
    assert y16.dtype == torch.bfloat16 and stats.aux_loss.dtype == torch.float32
    assert (y16.double() - y64).abs().max() <= 0.05 * y64.abs().max()


PARAM_CONFIGS = [
    dict(),
    dict(activation="squared_relu", bias=True),
    dict(router="sigmoid", n_shared_experts=2),
    dict(activation="gelu", n_shared_experts=1, shared_hidden_size=48, bias=True, top_k=1),
    dict(router="topk_softmax", expert_hidden_size=None, n_experts=64, top_k=6),
]


@pytest.mark.parametrize("kw", PARAM_CONFIGS)
@pytest.mark.parametrize("d_model", [64, 96])
def test_param_counts_on_meta(kw, d_model):
    cfg = MoEConfig(**{"n_experts": 8, "top_k": 2, "expert_hidden_size": 32, **kw})
    with torch.device("meta"):
        moe = MoE(cfg, d_model)
    total = sum(p.numel() for p in moe.parameters())
    assert total == cfg.num_params(d_model)
    per_expert = sum(p.numel() for p in moe.experts.parameters()) // cfg.n_experts
    shared = sum(p.numel() for p in moe.shared_experts.parameters()) if cfg.n_shared_experts else 0
    active = moe.router.weight.numel() + shared + cfg.top_k * per_expert
    assert active == cfg.active_params(d_model)
    names = {n for n, _ in moe.named_parameters()}
    assert "router.weight" in names and "experts.up_proj" in names
    assert ("experts.gate_proj" in names) == (cfg.activation == "swiglu")
    assert ("experts.down_proj_bias" in names) == cfg.bias
    assert ("router.expert_bias" in dict(moe.named_buffers())) == cfg.uses_correction_bias()
