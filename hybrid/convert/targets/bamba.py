"""`BambaForCausalLM` (IBM Bamba).

Each HF layer is a mixer (Mamba-2, or attention at `attn_layer_indices`) and a dense SwiGLU
(`feed_forward`), so our layout must be mixer + `-` pairs with a SwiGLU MLP. Attention always
applies RoPE, to the first `partial_rotary_factor` of each head; `BambaConfig` hard-codes that
fraction to 0.5 unless `rope_parameters` names it, so we always write it there. One eps
(`rms_norm_eps`) serves the block norms and the Mamba gated norm.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hybrid.convert._hf import require_transformers
from hybrid.convert.base import (
    ExportSpec,
    StateReader,
    Target,
    model_config_from_dict,
    register_target,
)
from hybrid.convert.layers import (
    attention_mismatches,
    attention_names,
    capacity_mismatch,
    copy_names,
    generate_mismatch,
    lm_head_from_hf,
    mamba_mismatches,
    mamba_names,
    mamba_prefixed_from_hf,
    mamba_prefixed_to_hf,
    mixer_ffn_pairs,
    mlp_names,
    norm_key,
    ours,
    pairs_mismatch,
    rope_theta,
    rope_type,
    symbols,
)
from hybrid.recipe.layout import ATTENTION, MAMBA, MLP
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError

CLS = "Bamba"


def _rotary_mismatches(cfg: ModelConfig) -> list[str]:
    if ATTENTION not in symbols(cfg):
        return []
    a = cfg.attention
    if a.position != "rope":
        return [f"attention.position is {a.position}; {CLS} always applies RoPE"]
    hd = a.resolved_head_dim(cfg.d_model)
    if int(hd * a.rotary_fraction) != a.rotary_dim(cfg.d_model):
        return [
            f"attention.rotary_fraction={a.rotary_fraction:g} rotates an odd number of dims "
            f"({int(hd * a.rotary_fraction)}); hybrid rounds it down, {CLS} does not"
        ]
    return []


def _ffn_mismatches(cfg: ModelConfig) -> list[str]:
    pairs = mixer_ffn_pairs(cfg) or []
    if any(symbols(cfg)[j] != MLP for _, j in pairs):
        return [f"the layout has MoE layers; {CLS} layers end in a dense MLP"]
    if cfg.mlp.activation != "swiglu":
        return [f"mlp.activation is {cfg.mlp.activation}; {CLS}'s MLP is SwiGLU"]
    return []


@register_target
class Bamba(Target):
    name = "bamba"
    model_type = "bamba"
    architecture = "BambaForCausalLM"

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        out = pairs_mismatch(cfg, CLS) + mamba_mismatches(cfg, eps_shared=True)
        out += attention_mismatches(cfg, CLS) + _rotary_mismatches(cfg)
        out += generate_mismatch(cfg, CLS) + capacity_mismatch(cfg)
        if mixer_ffn_pairs(cfg) is not None:
            out += _ffn_mismatches(cfg)
        return out

    def hf_config(self, cfg: ModelConfig, spec: ExportSpec) -> Any:
        hf = require_transformers()
        pairs = mixer_ffn_pairs(cfg) or []
        syms, m, a = symbols(cfg), cfg.mamba, cfg.attention
        return hf.BambaConfig(
            vocab_size=cfg.padded_vocab_size,
            hidden_size=cfg.d_model,
            num_hidden_layers=len(pairs),
            attn_layer_indices=[n for n, (i, _) in enumerate(pairs) if syms[i] == ATTENTION],
            num_attention_heads=a.n_heads,
            num_key_value_heads=a.kv_heads(),
            head_dim=a.resolved_head_dim(cfg.d_model),
            attention_bias=a.bias,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": a.rope_theta,
                "partial_rotary_factor": a.rotary_fraction,
            },
            intermediate_size=cfg.mlp.resolved_hidden(cfg.d_model),
            mlp_bias=cfg.mlp.bias,
            hidden_act="silu",
            **mamba_prefixed_to_hf(m, cfg.d_model),
            rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            max_position_embeddings=spec.max_position_embeddings,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            pad_token_id=spec.pad_token_id,
        )

    def to_hf(self, state: StateReader, cfg: ModelConfig) -> dict[str, Tensor]:
        syms, out = symbols(cfg), {"model.embed_tokens.weight": state.take("embed.weight")}
        mlp = mlp_names(gated=True, bias=cfg.mlp.bias)
        for layer, (i, j) in enumerate(mixer_ffn_pairs(cfg) or []):
            p = f"model.layers.{layer}."
            out[p + "input_layernorm.weight"] = state.take(norm_key(i))
            out[p + "pre_ff_layernorm.weight"] = state.take(norm_key(j))
            if syms[i] == MAMBA:
                copy_names(state, ours(i, ""), mamba_names(cfg.mamba), out, p + "mamba.")
            else:
                copy_names(
                    state, ours(i, ""), attention_names(cfg.attention), out, p + "self_attn."
                )
            copy_names(state, ours(j, ""), mlp, out, p + "feed_forward.")
        out["model.final_layernorm.weight"] = state.take("norm_f.weight")
        head = state.take("lm_head.weight")
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = head
        return out

    def model_config(self, hf_cfg: Any) -> ModelConfig:
        if hf_cfg.hidden_act != "silu":
            raise ConfigError(f"{CLS}: hidden_act {hf_cfg.hidden_act!r}; hybrid has SwiGLU (silu)")
        if rope_type(hf_cfg) != "default":
            raise ConfigError(f"{CLS}: rope_type {rope_type(hf_cfg)!r}; hybrid has plain RoPE")
        attn = set(hf_cfg.attn_layer_indices or [])
        n = int(hf_cfg.num_hidden_layers)
        pattern = "".join((ATTENTION if k in attn else MAMBA) + MLP for k in range(n))
        params = hf_cfg.rope_parameters or {}
        data = {
            "d_model": hf_cfg.hidden_size,
            "vocab_size": hf_cfg.vocab_size,
            "pad_vocab_multiple": 1,
            "norm_eps": float(hf_cfg.rms_norm_eps),
            "tie_embeddings": bool(hf_cfg.tie_word_embeddings),
            "layout": {"pattern": pattern},
            "mamba": mamba_prefixed_from_hf(hf_cfg),
            "attention": {
                "n_heads": hf_cfg.num_attention_heads,
                "n_kv_heads": hf_cfg.num_key_value_heads,
                "head_dim": getattr(hf_cfg, "head_dim", None)
                or hf_cfg.hidden_size // hf_cfg.num_attention_heads,
                "position": "rope",
                "rope_theta": rope_theta(hf_cfg),
                "rotary_fraction": float(params.get("partial_rotary_factor", 1.0)),
                "bias": bool(hf_cfg.attention_bias),
            },
            "mlp": {
                "activation": "swiglu",
                "hidden_size": hf_cfg.intermediate_size,
                "bias": bool(hf_cfg.mlp_bias),
            },
        }
        cfg = model_config_from_dict(data, f"{CLS} config")
        if MAMBA in pattern and (problems := mamba_mismatches(cfg, eps_shared=True)):
            raise ConfigError(f"{CLS}: {problems[0]}")
        return cfg

    def from_hf(self, state: StateReader, hf_cfg: Any, cfg: ModelConfig) -> dict[str, Tensor]:
        syms, out = symbols(cfg), {"embed.weight": state.take("model.embed_tokens.weight")}
        mlp = mlp_names(gated=True, bias=cfg.mlp.bias)
        for layer, (i, j) in enumerate(mixer_ffn_pairs(cfg) or []):
            p = f"model.layers.{layer}."
            out[norm_key(i)] = state.take(p + "input_layernorm.weight")
            out[norm_key(j)] = state.take(p + "pre_ff_layernorm.weight")
            if syms[i] == MAMBA:
                copy_names(state, p + "mamba.", mamba_names(cfg.mamba), out, ours(i, ""))
            else:
                copy_names(
                    state, p + "self_attn.", attention_names(cfg.attention), out, ours(i, "")
                )
            copy_names(state, p + "feed_forward.", mlp, out, ours(j, ""))
        out["norm_f.weight"] = state.take("model.final_layernorm.weight")
        lm_head_from_hf(state, cfg, out, "lm_head.weight")
        return out
