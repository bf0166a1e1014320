"""`NemotronHForCausalLM` (NVIDIA Nemotron-H, Nemotron-3).

One HF block per sublayer, exactly our canonical layout: `M` linear_attention (Mamba-2), `*`
full_attention (no positional encoding, no biases), `-` mlp (no gate: `mlp_hidden_act`
squared-ReLU `relu2` or `gelu`), `E` moe (sigmoid router with a score-correction bias used only
to select, optional renormalisation and scaling, non-gated experts and a shared expert). One eps
serves the block norms and the Mamba gated norm. The mixer clamps dt below at `time_step_min`
and never above.

The checkpoint (what `save_pretrained` writes and NVIDIA publishes) names the backbone
`backbone.` and stores each expert separately: `mixer.experts.{e}.up_proj.weight` (F, D).
The LM head is never tied in the HF class, so a tied model writes the embedding twice.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
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
    mlp_names,
    norm_key,
    ours,
    symbols,
)
from hybrid.recipe.layout import ATTENTION, MAMBA, MLP, MOE
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)
CLS = "NemotronH"
BLOCK_TYPES = {MAMBA: "linear_attention", ATTENTION: "full_attention", MLP: "mlp", MOE: "moe"}
SYMBOL_OF = {v: k for k, v in BLOCK_TYPES.items()} | {"mamba": MAMBA, "attention": ATTENTION}
ACTIVATIONS = {"squared_relu": "relu2", "gelu": "gelu"}
OUR_ACTIVATION = {v: k for k, v in ACTIVATIONS.items()}


def _ffn_activation(cfg: ModelConfig) -> str:
    """Our activation of the FFNs present (the MLP's, else the MoE's)."""
    return cfg.mlp.activation if MLP in symbols(cfg) else cfg.moe.activation


def _ffn_mismatches(cfg: ModelConfig) -> list[str]:
    syms, out = symbols(cfg), []
    if MLP in syms and cfg.mlp.activation not in ACTIVATIONS:
        out.append(f"mlp.activation is {cfg.mlp.activation}; {CLS}'s MLP has no gate")
    if MOE not in syms:
        return out
    m = cfg.moe
    if m.router != "sigmoid":
        out.append(f"moe.router is {m.router}; {CLS}'s router is sigmoid")
    if m.activation not in ACTIVATIONS or (MLP in syms and m.activation != cfg.mlp.activation):
        out.append(f"the experts are {m.activation}; {CLS} uses the MLP's non-gated activation")
    if m.n_shared_experts == 0:
        out.append(f"no shared expert; every {CLS} MoE adds a shared expert")
    if m.bias or (MLP in syms and cfg.mlp.bias):
        out.append(f"MLP/expert biases with MoE; {CLS}'s routed experts have none")
    if m.n_experts < 2:
        out.append(f"moe.n_experts={m.n_experts}; {CLS}'s router needs at least 2")
    return out


def _mixer_mismatches(cfg: ModelConfig) -> list[str]:
    syms, out = symbols(cfg), []
    if MAMBA in syms and cfg.mamba.dt_limit[1] != math.inf:
        out.append(f"mamba.dt_limit caps dt at {cfg.mamba.dt_limit[1]:g}; {CLS} only clamps below")
    if ATTENTION in syms and cfg.attention.position != "none":
        out.append(f"attention.position is {cfg.attention.position}; {CLS} has no positions")
    if ATTENTION in syms and cfg.attention.bias:
        out.append(f"attention.bias: true; {CLS}'s attention has no biases")
    return out


@register_target
class NemotronH(Target):
    name = "nemotron_h"
    model_type = "nemotron_h"
    architecture = "NemotronHForCausalLM"

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        out = mamba_mismatches(cfg, eps_shared=True) + attention_mismatches(cfg, CLS)
        out += _mixer_mismatches(cfg) + _ffn_mismatches(cfg)
        return out + generate_mismatch(cfg, CLS) + capacity_mismatch(cfg)

    def hf_config(self, cfg: ModelConfig, spec: ExportSpec) -> Any:
        hf = require_transformers()
        m, a, moe = cfg.mamba, cfg.attention, cfg.moe
        syms = symbols(cfg)
        has_moe = MOE in syms
        return hf.NemotronHConfig(
            vocab_size=cfg.padded_vocab_size,
            hidden_size=cfg.d_model,
            layers_block_type=[BLOCK_TYPES[s] for s in syms],
            tie_word_embeddings=cfg.tie_embeddings,
            num_attention_heads=a.n_heads,
            num_key_value_heads=a.kv_heads(),
            head_dim=a.resolved_head_dim(cfg.d_model),
            attention_bias=False,
            intermediate_size=cfg.mlp.resolved_hidden(cfg.d_model),
            mlp_hidden_act=ACTIVATIONS.get(_ffn_activation(cfg), "relu2"),
            mlp_bias=cfg.mlp.bias if MLP in syms else False,
            ssm_state_size=m.d_state,
            mamba_num_heads=m.n_heads(cfg.d_model),
            mamba_head_dim=m.head_dim,
            mamba_hidden_act="silu",
            n_groups=m.n_groups,
            conv_kernel=m.d_conv,
            expand=m.expand,
            chunk_size=m.chunk_size,
            use_conv_bias=m.conv_bias,
            use_bias=m.bias,
            mamba_proj_bias=m.bias,
            time_step_min=float(m.dt_limit[0]),
            time_step_max=m.dt_max,
            time_step_floor=m.dt_init_floor,
            time_step_limit=(float(m.dt_limit[0]), math.inf),
            n_routed_experts=moe.n_experts if has_moe else 8,
            num_experts_per_tok=moe.top_k if has_moe else 2,
            moe_intermediate_size=moe.expert_hidden(cfg.d_model),
            moe_shared_expert_intermediate_size=moe.shared_hidden(cfg.d_model),
            n_shared_experts=1,
            routed_scaling_factor=moe.routed_scaling_factor,
            norm_topk_prob=moe.renormalize,
            n_group=1,
            topk_group=1,
            layer_norm_epsilon=cfg.norm_eps,
            residual_in_fp32=False,
            max_position_embeddings=spec.max_position_embeddings,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            pad_token_id=spec.pad_token_id,
        )

    def to_hf(self, state: StateReader, cfg: ModelConfig) -> dict[str, Tensor]:
        out = {"backbone.embeddings.weight": state.take("embed.weight")}
        for i, sym in enumerate(symbols(cfg)):
            p = f"backbone.layers.{i}."
            out[p + "norm.weight"] = state.take(norm_key(i))
            if sym == MAMBA:
                copy_names(state, ours(i, ""), mamba_names(cfg.mamba), out, p + "mixer.")
            elif sym == ATTENTION:
                copy_names(state, ours(i, ""), attention_names(cfg.attention), out, p + "mixer.")
            elif sym == MLP:
                names = mlp_names(gated=False, bias=cfg.mlp.bias)
                copy_names(state, ours(i, ""), names, out, p + "mixer.")
            else:
                out.update(_moe_to_hf(state, cfg, i, p + "mixer."))
        out["backbone.norm_f.weight"] = state.take("norm_f.weight")
        out["lm_head.weight"] = state.take("lm_head.weight")
        return out

    def model_config(self, hf_cfg: Any) -> ModelConfig:
        _refuse_unsupported(hf_cfg)
        syms = [_symbol_of(t) for t in hf_cfg.layers_block_type]
        activation = OUR_ACTIVATION[hf_cfg.mlp_hidden_act]
        mamba_inner = hf_cfg.mamba_num_heads * hf_cfg.mamba_head_dim
        if mamba_inner % hf_cfg.hidden_size:
            raise ConfigError(
                f"{CLS}: mamba_num_heads * mamba_head_dim = {mamba_inner} is not a multiple of "
                f"hidden_size {hf_cfg.hidden_size}; hybrid's Mamba width is expand * d_model"
            )
        t_min = float(hf_cfg.time_step_min)
        data = {
            "d_model": hf_cfg.hidden_size,
            "vocab_size": hf_cfg.vocab_size,
            "pad_vocab_multiple": 1,
            "norm_eps": float(hf_cfg.layer_norm_epsilon),
            "tie_embeddings": bool(hf_cfg.tie_word_embeddings),
            "layout": {"pattern": "".join(syms)},
            "mamba": {
                "d_state": hf_cfg.ssm_state_size,
                "head_dim": hf_cfg.mamba_head_dim,
                "expand": mamba_inner // hf_cfg.hidden_size,
                "n_groups": hf_cfg.n_groups,
                "d_conv": hf_cfg.conv_kernel,
                "chunk_size": hf_cfg.chunk_size,
                "conv_bias": bool(hf_cfg.use_conv_bias),
                "bias": bool(hf_cfg.use_bias),
                "dt_limit": [t_min, math.inf],
                "dt_min": t_min if t_min > 0 else 0.001,
                "dt_max": max(float(hf_cfg.time_step_max), t_min if t_min > 0 else 0.001),
            },
            "attention": {
                "n_heads": hf_cfg.num_attention_heads,
                "n_kv_heads": hf_cfg.num_key_value_heads,
                "head_dim": hf_cfg.head_dim,
                "position": "none",
            },
            "mlp": {
                "activation": activation,
                "hidden_size": hf_cfg.intermediate_size,
                "bias": bool(hf_cfg.mlp_bias),
            },
        }
        if MOE in syms:
            data["moe"] = _moe_section(hf_cfg, activation)
        cfg = model_config_from_dict(data, f"{CLS} config")
        if problems := mamba_mismatches(cfg, eps_shared=True):
            raise ConfigError(f"{CLS}: {problems[0]}")
        return cfg

    def from_hf(self, state: StateReader, hf_cfg: Any, cfg: ModelConfig) -> dict[str, Tensor]:
        for key in state.names():
            if key.startswith("mtp."):
                state.skip(key)  # multi-token-prediction heads: transformers ignores them too
        out = {"embed.weight": state.take("backbone.embeddings.weight")}
        for i, sym in enumerate(symbols(cfg)):
            p = f"backbone.layers.{i}."
            out[norm_key(i)] = state.take(p + "norm.weight")
            if sym == MAMBA:
                copy_names(state, p + "mixer.", mamba_names(cfg.mamba), out, ours(i, ""))
            elif sym == ATTENTION:
                copy_names(state, p + "mixer.", attention_names(cfg.attention), out, ours(i, ""))
            elif sym == MLP:
                names = mlp_names(gated=False, bias=cfg.mlp.bias)
                copy_names(state, p + "mixer.", names, out, ours(i, ""))
            else:
                out.update(_moe_from_hf(state, cfg, i, p + "mixer."))
        out["norm_f.weight"] = state.take("backbone.norm_f.weight")
        lm_head_from_hf(state, cfg, out, "lm_head.weight")
        return out


def _symbol_of(block_type: str) -> str:
    if block_type not in SYMBOL_OF:
        raise ConfigError(f"{CLS}: unknown block type {block_type!r} in layers_block_type")
    return SYMBOL_OF[block_type]


def _refuse_unsupported(hf_cfg: Any) -> None:
    """ConfigError for NemotronH features hybrid's model does not have."""
    if hf_cfg.mlp_hidden_act not in OUR_ACTIVATION:
        raise ConfigError(f"{CLS}: mlp_hidden_act {hf_cfg.mlp_hidden_act!r} is not relu2 or gelu")
    if hf_cfg.mamba_hidden_act != "silu":
        raise ConfigError(f"{CLS}: mamba_hidden_act {hf_cfg.mamba_hidden_act!r}; hybrid has silu")
    if getattr(hf_cfg, "moe_latent_size", None) is not None:
        raise ConfigError(f"{CLS}: moe_latent_size (latent MoE projections) is not in hybrid")
    if int(hf_cfg.topk_group) < int(hf_cfg.n_group):
        raise ConfigError(f"{CLS}: group-limited routing (topk_group < n_group) is not in hybrid")
    if "moe" in hf_cfg.layers_block_type and bool(hf_cfg.mlp_bias):
        raise ConfigError(f"{CLS}: mlp_bias with MoE (biased shared expert only) is not in hybrid")
    if int(getattr(hf_cfg, "num_nextn_predict_layers", 0) or 0) > 0:
        log.warning("%s: the multi-token-prediction layers are not converted", CLS)


def _moe_section(hf_cfg: Any, activation: str) -> dict:
    return {
        "n_experts": hf_cfg.n_routed_experts,
        "top_k": hf_cfg.num_experts_per_tok,
        "router": "sigmoid",
        "renormalize": bool(hf_cfg.norm_topk_prob),
        "expert_hidden_size": hf_cfg.moe_intermediate_size,
        "activation": activation,
        "n_shared_experts": 1,
        "shared_hidden_size": hf_cfg.moe_shared_expert_intermediate_size,
        "routed_scaling_factor": float(hf_cfg.routed_scaling_factor),
        "score_correction_bias": True,
    }


def _moe_to_hf(state: StateReader, cfg: ModelConfig, i: int, p: str) -> dict[str, Tensor]:
    router = state.take(ours(i, "router.weight"))
    if cfg.moe.uses_correction_bias():
        bias = state.take(ours(i, "router.expert_bias"))
    else:  # selection by sigmoid scores alone: a zero correction bias changes nothing
        bias = torch.zeros(cfg.moe.n_experts, dtype=torch.float32)
    out = {p + "gate.weight": router, p + "gate.e_score_correction_bias": bias.float()}
    up, down = state.take(ours(i, "experts.up_proj")), state.take(ours(i, "experts.down_proj"))
    for e in range(cfg.moe.n_experts):
        out[p + f"experts.{e}.up_proj.weight"] = up[e].T.contiguous()  # (F, D)
        out[p + f"experts.{e}.down_proj.weight"] = down[e].T.contiguous()  # (D, F)
    shared = mlp_names(gated=False, bias=False)
    copy_names(state, ours(i, "shared_experts."), shared, out, p + "shared_experts.")
    return out


def _moe_from_hf(state: StateReader, cfg: ModelConfig, i: int, p: str) -> dict[str, Tensor]:
    out = {
        ours(i, "router.weight"): state.take(p + "gate.weight"),
        ours(i, "router.expert_bias"): state.take(p + "gate.e_score_correction_bias").float(),
    }
    n = cfg.moe.n_experts
    up = [state.take(p + f"experts.{e}.up_proj.weight").T for e in range(n)]
    down = [state.take(p + f"experts.{e}.down_proj.weight").T for e in range(n)]
    out[ours(i, "experts.up_proj")] = torch.stack(up)  # (E, D, F)
    out[ours(i, "experts.down_proj")] = torch.stack(down)  # (E, F, D)
    shared = mlp_names(gated=False, bias=False)
    copy_names(state, p + "shared_experts.", shared, out, ours(i, "shared_experts."))
    return out
