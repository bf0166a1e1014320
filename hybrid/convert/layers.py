"""Tensor names and semantic checks shared by the adapters.

Our canonical names: `embed.weight`, `layers.{i}.norm.weight`, `layers.{i}.mixer.<param>`,
`norm_f.weight`, `lm_head.weight` (an alias of `embed.weight` when tied). Inside a mixer the
names are those of `hybrid.model` (Mamba-2 as mamba_ssm: `in_proj`, `conv1d`, `dt_bias`,
`A_log`, `D`, `norm`, `out_proj`; attention `q_proj`..`o_proj`; MLP `gate_proj`, `up_proj`,
`down_proj`; MoE `router.weight`, `router.expert_bias`, `experts.{gate,up,down}_proj` stacked
(E, D, F) / (E, F, D), `shared_experts.*`).

The Mamba-2 layout is the same in every HF target (in_proj rows z, x, B, C, dt; conv over x, B,
C; gated RMSNorm over n_groups; D per head), so its tensors copy under the same names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from hybrid.convert.base import StateReader
from hybrid.recipe.blocks import AttentionConfig, Mamba2Config
from hybrid.recipe.layout import ATTENTION, MAMBA, MIXERS, MLP, MOE
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError

# hybrid.model.mamba2 builds its GatedRMSNorm with the default eps; a test checks this value.
GATED_NORM_EPS = 1e-5


def ours(i: int, name: str) -> str:
    """Our canonical name of `name` inside the mixer of sublayer `i`."""
    return f"layers.{i}.mixer.{name}"


def norm_key(i: int) -> str:
    return f"layers.{i}.norm.weight"


def mamba_names(m: Mamba2Config) -> list[str]:
    names = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "out_proj.weight"]
    if m.bias:
        names += ["in_proj.bias", "out_proj.bias"]
    if m.conv_bias:
        names.append("conv1d.bias")
    if m.gated_norm:
        names.append("norm.weight")
    return names


def attention_names(a: AttentionConfig) -> list[str]:
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    names = [f"{p}.weight" for p in projections]
    if a.bias:
        names += [f"{p}.bias" for p in projections]
    if a.qk_norm:
        names += ["q_norm.weight", "k_norm.weight"]
    return names


def mlp_names(gated: bool, bias: bool) -> list[str]:
    projections = ("gate_proj", "up_proj", "down_proj") if gated else ("up_proj", "down_proj")
    names = [f"{p}.weight" for p in projections]
    if bias:
        names += [f"{p}.bias" for p in projections]
    return names


def copy_names(
    src: StateReader, src_prefix: str, names: list[str], dst: dict[str, Tensor], dst_prefix: str
) -> None:
    """dst[dst_prefix + n] = src[src_prefix + n] for every name."""
    for n in names:
        dst[dst_prefix + n] = src.take(src_prefix + n)


def symbols(cfg: ModelConfig) -> list[str]:
    return [spec.symbol for spec in cfg.layers()]


def mixer_ffn_pairs(cfg: ModelConfig) -> list[tuple[int, int]] | None:
    """[(mixer index, FFN index)] when the layout is (M or *) followed by (- or E), repeated;
    None otherwise."""
    syms = symbols(cfg)
    if len(syms) % 2:
        return None
    pairs = [(i, i + 1) for i in range(0, len(syms), 2)]
    if all(syms[i] in MIXERS and syms[j] in (MLP, MOE) for i, j in pairs):
        return pairs
    return None


def pairs_mismatch(cfg: ModelConfig, cls: str) -> list[str]:
    if mixer_ffn_pairs(cfg) is None:
        return [
            f"layout {cfg.pattern()!r} is not a sequence of mixer (M or *) + FFN (- or E) "
            f"layers, which is what every {cls} layer is"
        ]
    return []


def mamba_mismatches(cfg: ModelConfig, *, eps_shared: bool) -> list[str]:
    """Mamba-2 settings no HF class has. `eps_shared`: the class uses the block norms' eps for
    the gated norm too (so norm_eps must equal our gated-norm eps)."""
    if MAMBA not in symbols(cfg):
        return []
    m, out = cfg.mamba, []
    if m.d_has_hdim:
        out.append("mamba.d_has_hdim: true (D per channel); the HF classes have D per head")
    if not m.gated_norm:
        out.append("mamba.gated_norm: false; the HF classes always apply the gated RMSNorm")
    if m.norm_before_gate:
        out.append("mamba.norm_before_gate: true; the HF classes gate before normalising")
    if eps_shared and cfg.norm_eps != GATED_NORM_EPS:
        out.append(
            f"norm_eps={cfg.norm_eps:g} but the Mamba gated norm uses {GATED_NORM_EPS:g}; this "
            "class uses one eps for both"
        )
    return out


def attention_mismatches(cfg: ModelConfig, cls: str) -> list[str]:
    """Attention settings none of the native classes has (QK-norm, sliding window)."""
    if ATTENTION not in symbols(cfg):
        return []
    a, out = cfg.attention, []
    if a.qk_norm:
        out.append(f"attention.qk_norm: true; {cls} has no QK-norm")
    if a.sliding_window is not None:
        out.append(f"attention.sliding_window={a.sliding_window}; {cls} attends to all tokens")
    return out


def generate_mismatch(cfg: ModelConfig, cls: str) -> list[str]:
    """transformers' hybrid cache asks an attention layer for the cached length: a hybrid class
    without one cannot run generate()."""
    syms = symbols(cfg)
    if MAMBA in syms and ATTENTION not in syms:
        return [
            f"no attention layer: {cls}.generate() fails without one in transformers 5 "
            "(its cache asks an attention layer for the sequence length)"
        ]
    return []


def capacity_mismatch(cfg: ModelConfig) -> list[str]:
    if MOE in symbols(cfg) and cfg.moe.capacity_factor is not None:
        return [
            f"moe.capacity_factor={cfg.moe.capacity_factor:g} drops tokens depending on the "
            "batch, which no HF model does; pass --dropless to export the dropless model"
        ]
    return []


def rope_theta(hf_cfg: object) -> float:
    """The RoPE base of an HF config (rope_parameters in transformers 5, rope_theta before)."""
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0)))


def rope_type(hf_cfg: object) -> str:
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    return str(params.get("rope_type", "default"))


def lm_head_from_hf(state: StateReader, cfg: ModelConfig, out: dict[str, Tensor], key: str) -> None:
    """Our lm_head: the HF `key` tensor, or the embedding when tied (a stored copy must match)."""
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state.take(key)
        return
    if key in state and not torch.equal(state.take(key), out["embed.weight"]):
        raise ConfigError(f"{state.what}: tie_word_embeddings but {key} differs from the embedding")
    out["lm_head.weight"] = out["embed.weight"]


def mamba_prefixed_to_hf(m: Mamba2Config, d_model: int) -> dict[str, Any]:
    """The Mamba-2 fields of an HF config that names them `mamba_*` (Bamba, GraniteMoeHybrid)."""
    return dict(
        mamba_n_heads=m.n_heads(d_model),
        mamba_d_head=m.head_dim,
        mamba_n_groups=m.n_groups,
        mamba_d_state=m.d_state,
        mamba_d_conv=m.d_conv,
        mamba_expand=m.expand,
        mamba_chunk_size=m.chunk_size,
        mamba_conv_bias=m.conv_bias,
        mamba_proj_bias=m.bias,
        time_step_limit=tuple(m.dt_limit),
    )


def mamba_prefixed_from_hf(hf_cfg: Any) -> dict[str, Any]:
    """Our `mamba` recipe section from an HF config with `mamba_*` fields (the inverse)."""
    limit = hf_cfg.time_step_limit or (0.0, math.inf)
    return {
        "d_state": hf_cfg.mamba_d_state,
        "head_dim": hf_cfg.mamba_d_head,
        "expand": hf_cfg.mamba_expand,
        "n_groups": hf_cfg.mamba_n_groups,
        "d_conv": hf_cfg.mamba_d_conv,
        "chunk_size": hf_cfg.mamba_chunk_size,
        "conv_bias": bool(hf_cfg.mamba_conv_bias),
        "bias": bool(hf_cfg.mamba_proj_bias),
        "dt_limit": [float(limit[0]), float(limit[1])],
    }
