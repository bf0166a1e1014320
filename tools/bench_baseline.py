"""The peer baseline of `tools/bench_train.py`: a recipe's model rebuilt from common parts in
plain PyTorch, to time against ours in the same process.

    M  mamba_ssm's `Mamba2` (its Triton SSD at chunk 128; nn.Conv1d when the causal-conv1d
       extension is absent, as on our GPU image)
    *  causal attention: q/k/v/o nn.Linear, RoPE, GQA, `F.scaled_dot_product_attention`
    -  MLP: gate/up/down nn.Linear (SwiGLU; squared-ReLU / GELU without the gate)
    E  MoE: softmax top-k router, a Python loop over the experts (index_select / index_add_)
    pre-norm residual sublayers with torch.nn.RMSNorm, embedding, final norm, LM head (tied as
    the recipe says), F.cross_entropy over the full fp32 logits.

The parameter count equals our model's for the same config (same layouts; buffers not counted).
Building an `M` sublayer needs mamba_ssm; without it `require_mamba2()` raises (no fallback).

Legend: B batch, L length, D d_model, T tokens (B*L), E experts, K top_k.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.recipe.blocks import AttentionConfig, Mamba2Config, MLPConfig, MoEConfig
from hybrid.recipe.model_config import ModelConfig

IGNORE_INDEX = -100
BASELINE_CHUNK = 128  # mamba_ssm's Mamba2 at the chunk its authors train with

_ACTIVATIONS = {"swiglu": F.silu, "squared_relu": lambda x: F.relu(x).square(), "gelu": F.gelu}


class PeerUnavailableError(RuntimeError):
    """A peer implementation the baseline is built from cannot be imported."""


def require_mamba2() -> type[nn.Module]:
    """mamba_ssm's `Mamba2` class, imported without the package's CUDA extensions (see
    `register_mamba_ssm` in tools/bench_kernels.py); PeerUnavailableError when it cannot be."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_kernels import register_mamba_ssm

    if not register_mamba_ssm():
        raise PeerUnavailableError(
            "the baseline's Mamba-2 layers are mamba_ssm's Mamba2, but mamba_ssm is not "
            "installed; pip install mamba-ssm (its Triton kernels suffice) or pass --no-baseline"
        )
    try:
        from mamba_ssm.modules.mamba2 import Mamba2
    except ImportError as err:
        msg = f"mamba_ssm is installed but its Mamba2 does not import: {err}"
        raise PeerUnavailableError(msg) from err
    return Mamba2


def has_causal_conv1d() -> bool:
    return importlib.util.find_spec("causal_conv1d") is not None


class MambaBlock(nn.Module):
    def __init__(self, cfg: Mamba2Config, d_model: int):
        super().__init__()
        Mamba2 = require_mamba2()
        self.mixer = Mamba2(
            d_model=d_model,
            d_state=cfg.d_state,
            d_conv=cfg.d_conv,
            expand=cfg.expand,
            headdim=cfg.head_dim,
            ngroups=cfg.n_groups,
            D_has_hdim=cfg.d_has_hdim,
            rmsnorm=cfg.gated_norm,
            norm_before_gate=cfg.norm_before_gate,
            dt_limit=tuple(cfg.dt_limit),
            bias=cfg.bias,
            conv_bias=cfg.conv_bias,
            chunk_size=BASELINE_CHUNK,
            # the fused path needs the causal-conv1d CUDA extension
            use_mem_eff_path=has_causal_conv1d(),
        )

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.mixer(x_BLD), None


def rope(x_BLHE: Tensor, cos_LE: Tensor, sin_LE: Tensor) -> Tensor:
    """Rotate the first R = cos.shape[-1] dims of each head (first half against second)."""
    R = cos_LE.shape[-1]
    rot, rest = x_BLHE[..., :R].float(), x_BLHE[..., R:]
    x1, x2 = rot.chunk(2, dim=-1)
    cos, sin = cos_LE[None, :, None, :], sin_LE[None, :, None, :]
    out = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([out.to(x_BLHE.dtype), rest], dim=-1)


class SDPAAttention(nn.Module):
    def __init__(self, cfg: AttentionConfig, d_model: int):
        super().__init__()
        if cfg.sliding_window is not None:
            raise ValueError(
                "the baseline attention has no sliding window (attention.sliding_window)"
            )
        self.h, self.kv, self.e = cfg.n_heads, cfg.kv_heads(), cfg.resolved_head_dim(d_model)
        self.rotary = cfg.rotary_dim(d_model) if cfg.position == "rope" else 0
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(d_model, self.h * self.e, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, self.kv * self.e, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, self.kv * self.e, bias=cfg.bias)
        self.o_proj = nn.Linear(self.h * self.e, d_model, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(self.e) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.e) if cfg.qk_norm else None

    def _cos_sin(self, L: int, device: torch.device) -> tuple[Tensor, Tensor]:
        inv = 1.0 / self.theta ** (
            torch.arange(0, self.rotary, 2, device=device, dtype=torch.float32) / self.rotary
        )
        freqs = torch.arange(L, device=device, dtype=torch.float32)[:, None] * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, Tensor | None]:
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD).view(B, L, self.h, self.e)
        k = self.k_proj(x_BLD).view(B, L, self.kv, self.e)
        v = self.v_proj(x_BLD).view(B, L, self.kv, self.e)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            cos, sin = self._cos_sin(L, x_BLD.device)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.kv != self.h,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.h * self.e)), None


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        self.act = _ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias) if activation == "swiglu" else None
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DenseMLP(nn.Module):
    def __init__(self, cfg: MLPConfig, d_model: int):
        super().__init__()
        self.mlp = MLP(d_model, cfg.resolved_hidden(d_model), cfg.activation, cfg.bias)

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.mlp(x_BLD), None


class LoopMoE(nn.Module):
    """Softmax top-k router; each expert gathers its tokens, runs, and adds them back."""

    def __init__(self, cfg: MoEConfig, d_model: int):
        super().__init__()
        if cfg.router != "softmax_topk":
            raise ValueError(f"the baseline MoE routes softmax_topk only, not {cfg.router!r}")
        self.cfg = cfg
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        hidden = cfg.expert_hidden(d_model)
        self.experts = nn.ModuleList(
            MLP(d_model, hidden, cfg.activation, cfg.bias) for _ in range(cfg.n_experts)
        )
        self.shared = (
            MLP(d_model, cfg.shared_hidden(d_model), cfg.activation, cfg.bias)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
        logits_TE = self.router(x_TD).float()
        probs_TE = logits_TE.softmax(-1)
        w_TK, idx_TK = probs_TE.topk(cfg.top_k, dim=-1)
        if cfg.renormalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        w_TK = w_TK * cfg.routed_scaling_factor
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx_TK == e)
            y = expert(x_TD.index_select(0, tok)) * w_TK[tok, slot, None].to(x_TD.dtype)
            out_TD.index_add_(0, tok, y.to(out_TD.dtype))
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        counts_E = torch.bincount(idx_TK.flatten(), minlength=cfg.n_experts).float()
        frac_E = counts_E / idx_TK.numel()
        balance = cfg.n_experts * (frac_E * probs_TE.mean(0)).sum()
        zloss = torch.logsumexp(logits_TE, -1).square().mean()
        aux = cfg.aux_loss_coef * balance + cfg.z_loss_coef * zloss
        return out_TD.view_as(x_BLD), aux


BLOCKS = {"M": MambaBlock, "*": SDPAAttention, "-": DenseMLP, "E": LoopMoE}


class Sublayer(nn.Module):
    def __init__(self, symbol: str, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = BLOCKS[symbol](cfg.sublayer_config(symbol), cfg.d_model)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        y, aux = self.mixer(self.norm(h))
        return h + y, aux


class BaselineLM(nn.Module):
    """The baseline language model; `forward(ids, labels)` returns the training loss (mean
    token CE over labels != -100, plus the MoE aux losses)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        V, D = cfg.padded_vocab_size, cfg.d_model
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList(Sublayer(spec.symbol, cfg) for spec in cfg.layers())
        self.norm_f = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids_BL: Tensor, labels_BL: Tensor) -> Tensor:
        h = self.embed(input_ids_BL)
        aux = []
        for layer in self.layers:
            h, a = layer(h)
            if a is not None:
                aux.append(a)
        logits = self.lm_head(self.norm_f(h))
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels_BL.flatten(), ignore_index=IGNORE_INDEX
        )
        return loss + torch.stack(aux).sum() if aux else loss


def build_baseline(cfg: ModelConfig, *, device: torch.device | str = "cpu") -> BaselineLM:
    """The baseline for `cfg` on `device` (fp32 weights; PyTorch's default initialisation)."""
    with torch.device(device):
        return BaselineLM(cfg)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
