"""`Mamba2ForCausalLM`: a stack of pre-norm Mamba-2 mixers (no attention, no MLP).

Names: `backbone.embeddings`, `backbone.layers.{i}.norm`, `backbone.layers.{i}.mixer.*` (the
mamba_ssm names, as ours), `backbone.norm_f`, `lm_head` (absent when tied). `layer_norm_epsilon`
serves the block norms and the gated norm. `residual_in_fp32` is written false, as our model
keeps the residual in the model dtype.
"""

from __future__ import annotations

import math
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
    copy_names,
    lm_head_from_hf,
    mamba_mismatches,
    mamba_names,
    norm_key,
    ours,
    symbols,
)
from hybrid.recipe.layout import MAMBA
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError

CLS = "Mamba2"


@register_target
class Mamba2(Target):
    name = "mamba2"
    model_type = "mamba2"
    architecture = "Mamba2ForCausalLM"

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        others = sorted(set(symbols(cfg)) - {MAMBA})
        out = (
            [f"the layout has {' '.join(others)} sublayers; {CLS} is Mamba-2 only"]
            if others
            else []
        )
        return out + mamba_mismatches(cfg, eps_shared=True)

    def hf_config(self, cfg: ModelConfig, spec: ExportSpec) -> Any:
        hf = require_transformers()
        m = cfg.mamba
        return hf.Mamba2Config(
            vocab_size=cfg.padded_vocab_size,
            hidden_size=cfg.d_model,
            num_hidden_layers=len(cfg.layers()),
            num_heads=m.n_heads(cfg.d_model),
            head_dim=m.head_dim,
            state_size=m.d_state,
            expand=m.expand,
            n_groups=m.n_groups,
            conv_kernel=m.d_conv,
            chunk_size=m.chunk_size,
            use_bias=m.bias,
            use_conv_bias=m.conv_bias,
            hidden_act="silu",
            time_step_min=m.dt_min,
            time_step_max=m.dt_max,
            time_step_floor=m.dt_init_floor,
            time_step_limit=tuple(m.dt_limit),
            layer_norm_epsilon=cfg.norm_eps,
            residual_in_fp32=False,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            pad_token_id=spec.pad_token_id,
        )

    def to_hf(self, state: StateReader, cfg: ModelConfig) -> dict[str, Tensor]:
        out = {"backbone.embeddings.weight": state.take("embed.weight")}
        for i in range(len(cfg.layers())):
            p = f"backbone.layers.{i}."
            out[p + "norm.weight"] = state.take(norm_key(i))
            copy_names(state, ours(i, ""), mamba_names(cfg.mamba), out, p + "mixer.")
        out["backbone.norm_f.weight"] = state.take("norm_f.weight")
        head = state.take("lm_head.weight")
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = head
        return out

    def model_config(self, hf_cfg: Any) -> ModelConfig:
        if hf_cfg.hidden_act != "silu":
            raise ConfigError(f"{CLS}: hidden_act {hf_cfg.hidden_act!r}; hybrid has silu")
        limit = hf_cfg.time_step_limit or (0.0, math.inf)
        data = {
            "d_model": hf_cfg.hidden_size,
            "vocab_size": hf_cfg.vocab_size,
            "pad_vocab_multiple": 1,
            "norm_eps": float(hf_cfg.layer_norm_epsilon),
            "tie_embeddings": bool(hf_cfg.tie_word_embeddings),
            "layout": {"pattern": MAMBA * int(hf_cfg.num_hidden_layers)},
            "mamba": {
                "d_state": hf_cfg.state_size,
                "head_dim": hf_cfg.head_dim,
                "expand": hf_cfg.expand,
                "n_groups": hf_cfg.n_groups,
                "d_conv": hf_cfg.conv_kernel,
                "chunk_size": hf_cfg.chunk_size,
                "conv_bias": bool(hf_cfg.use_conv_bias),
                "bias": bool(hf_cfg.use_bias),
                "dt_limit": [float(limit[0]), float(limit[1])],
                "dt_min": float(hf_cfg.time_step_min),
                "dt_max": float(hf_cfg.time_step_max),
                "dt_init_floor": float(hf_cfg.time_step_floor),
            },
        }
        cfg = model_config_from_dict(data, f"{CLS} config")
        if problems := mamba_mismatches(cfg, eps_shared=True):
            raise ConfigError(f"{CLS}: {problems[0]}")
        return cfg

    def from_hf(self, state: StateReader, hf_cfg: Any, cfg: ModelConfig) -> dict[str, Tensor]:
        embed = "backbone.embeddings.weight"
        if embed not in state and "backbone.embedding.weight" in state:
            embed = "backbone.embedding.weight"  # older checkpoints (Mamba2Model's load hook)
        out = {"embed.weight": state.take(embed)}
        for i in range(len(cfg.layers())):
            p = f"backbone.layers.{i}."
            out[norm_key(i)] = state.take(p + "norm.weight")
            copy_names(state, p + "mixer.", mamba_names(cfg.mamba), out, ours(i, ""))
        out["norm_f.weight"] = state.take("backbone.norm_f.weight")
        lm_head_from_hf(state, cfg, out, "lm_head.weight")
        return out
