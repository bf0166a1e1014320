"""Self-contained remote code (`HybridLMForCausalLM`, model_type `hybrid_lm`): any model of ours.

Used when no native transformers class represents the model exactly (Jamba-style MoE on every
other layer, QK-norm, sliding windows, per-channel D, ...). `configuration_hybrid_lm.py` and
`modeling_hybrid_lm.py` (in `hybrid/convert/remote_code/`) are written next to the weights and
`config.json` names them in `auto_map`, so the directory loads with `trust_remote_code=True`.
The weights keep our canonical names under `model.` (and `lm_head.weight`, absent when tied);
the config carries resolved sizes for the modeling code and our model config as YAML, so
`from-hf` restores it exactly.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import yaml
from torch import Tensor

from hybrid.convert._hf import require_transformers
from hybrid.convert.base import (
    ExportSpec,
    StateReader,
    Target,
    model_config_from_dict,
    register_target,
)
from hybrid.convert.layers import GATED_NORM_EPS, capacity_mismatch
from hybrid.recipe.layout import canonical_pattern
from hybrid.recipe.loader import load_yaml
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError, to_dict

# hybrid.model.attention builds its QK-norms with RMSNorm's default eps; a test checks it.
QK_NORM_EPS = 1e-5
FILES = ("configuration_hybrid_lm.py", "modeling_hybrid_lm.py")


def _resolved(cfg: ModelConfig) -> dict[str, dict]:
    """Per-kind settings with every size resolved (what modeling_hybrid_lm.py reads)."""
    d, m, a, mlp, moe = cfg.d_model, cfg.mamba, cfg.attention, cfg.mlp, cfg.moe
    lo, hi = m.dt_limit
    return {
        "mamba": {
            "d_state": m.d_state, "head_dim": m.head_dim, "n_heads": m.n_heads(d),
            "d_inner": m.d_inner(d), "n_groups": m.n_groups, "d_conv": m.d_conv,
            "chunk_size": m.chunk_size, "dt_limit": [lo, None if math.isinf(hi) else hi],
            "conv_bias": m.conv_bias, "bias": m.bias, "d_has_hdim": m.d_has_hdim,
            "gated_norm": m.gated_norm, "norm_before_gate": m.norm_before_gate,
            "norm_eps": GATED_NORM_EPS,
        },
        "attention": {
            "n_heads": a.n_heads, "n_kv_heads": a.kv_heads(), "head_dim": a.resolved_head_dim(d),
            "rotary_dim": a.rotary_dim(d) if a.position == "rope" else 0,
            "rope_theta": a.rope_theta, "qk_norm": a.qk_norm, "qk_norm_eps": QK_NORM_EPS,
            "bias": a.bias, "sliding_window": a.sliding_window,
        },
        "mlp": {
            "activation": mlp.activation, "hidden_size": mlp.resolved_hidden(d), "bias": mlp.bias,
        },
        "moe": {
            "n_experts": moe.n_experts, "top_k": moe.top_k, "router": moe.router,
            "renormalize": moe.renormalize, "expert_hidden_size": moe.expert_hidden(d),
            "activation": moe.activation,
            "shared_hidden_size": moe.shared_hidden(d) if moe.n_shared_experts else 0,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "score_correction_bias": moe.uses_correction_bias(), "bias": moe.bias,
        },
    }  # fmt: skip


@register_target
class RemoteCode(Target):
    name = "hybrid_lm"
    model_type = "hybrid_lm"
    architecture = "HybridLMForCausalLM"
    remote_code = True

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        return capacity_mismatch(cfg)

    def hf_config(self, cfg: ModelConfig, spec: ExportSpec) -> Any:
        require_transformers()
        from hybrid.convert.remote_code.configuration_hybrid_lm import HybridLMConfig

        config = HybridLMConfig(
            vocab_size=cfg.padded_vocab_size,
            hidden_size=cfg.d_model,
            pattern=canonical_pattern(cfg.layers(), stages=False),
            norm_eps=cfg.norm_eps,
            hybrid_model=yaml.safe_dump(to_dict(cfg), sort_keys=False),
            initializer_range=cfg.init.std,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            pad_token_id=spec.pad_token_id,
            **_resolved(cfg),
        )
        config.auto_map = {
            "AutoConfig": "configuration_hybrid_lm.HybridLMConfig",
            "AutoModelForCausalLM": "modeling_hybrid_lm.HybridLMForCausalLM",
        }
        return config

    def to_hf(self, state: StateReader, cfg: ModelConfig) -> dict[str, Tensor]:
        out = {}
        for key in state.names():
            if key == "lm_head.weight":
                head = state.take(key)
                if not cfg.tie_embeddings:
                    out[key] = head
            else:
                out["model." + key] = state.take(key)
        return out

    def model_config(self, hf_cfg: Any) -> ModelConfig:
        text = getattr(hf_cfg, "hybrid_model", None)
        if not text:
            raise ConfigError("hybrid_lm config: no hybrid_model entry (not written by hybrid)")
        return model_config_from_dict(load_yaml(text), "hybrid_lm config")

    def from_hf(self, state: StateReader, hf_cfg: Any, cfg: ModelConfig) -> dict[str, Tensor]:
        out = {}
        for key in state.names():
            if key.startswith("model."):
                out[key.removeprefix("model.")] = state.take(key)
        if cfg.tie_embeddings:
            if "lm_head.weight" in state:
                state.skip("lm_head.weight")
            out["lm_head.weight"] = out["embed.weight"]
        else:
            out["lm_head.weight"] = state.take("lm_head.weight")
        return out

    def extra_files(self) -> dict[str, str]:
        package = resources.files("hybrid.convert.remote_code")
        return {name: package.joinpath(name).read_text(encoding="utf-8") for name in FILES}
