"""`GraniteMoeHybridForCausalLM` (IBM Granite-4.0-H).

Each HF layer is a mixer (Mamba-2 or attention, by `layer_types`) and an FFN: a shared SwiGLU
(`shared_mlp`) plus, when `num_local_experts > 0`, an MoE in every layer whose router takes the
top-k logits and softmaxes them. Our layout must therefore be mixer + FFN pairs, with either a
SwiGLU `-` in every pair (dense, `num_local_experts: 0`) or an `E` with a shared expert in every
pair. `attention_multiplier` is the attention scale itself (1/sqrt(head_dim) for us); RoPE
rotates whole heads, or there is no positional encoding.

The multipliers. HF computes h0 = m_e * embed(x), h += r * f(norm(h)), logits = head(h) / s.
Our model has m_e = r = s = 1, but HF uses one eps for the block norms and the Mamba gated norm
(ours: `norm_eps` and 1e-5). Scaling the whole residual stream by m = sqrt(1e-5 / norm_eps)
(m_e = r = m) makes HF's norm(m h) with eps 1e-5 equal our norm(h) with eps norm_eps, so any
norm_eps exports exactly. Importing, we fold the published multipliers into the weights: the
residual stream is divided by m_e (block norms get eps / m_e^2, sublayer output projections
r / m_e), 1/s goes into the final norm and attention_multiplier * sqrt(head_dim) into q_proj.
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
    rounded,
)
from hybrid.convert.layers import (
    GATED_NORM_EPS,
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
    norm_key,
    ours,
    pairs_mismatch,
    rope_theta,
    rope_type,
    symbols,
)
from hybrid.recipe.layout import ATTENTION, MAMBA, MLP, MOE
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)
CLS = "GraniteMoeHybrid"
LAYER_TYPES = {MAMBA: "mamba", ATTENTION: "attention"}
MIXER_OF_TYPE = {"mamba": MAMBA, "linear_attention": MAMBA, "attention": ATTENTION}
MIXER_OF_TYPE["full_attention"] = ATTENTION


def _ffn_mismatches(cfg: ModelConfig) -> list[str]:
    pairs = mixer_ffn_pairs(cfg) or []
    ffn = {symbols(cfg)[j] for _, j in pairs}
    out = []
    if ffn == {MLP, MOE}:
        out.append(f"MoE in some layers only; {CLS} has an MoE in every layer or in none")
    if MLP in ffn and (cfg.mlp.activation != "swiglu" or cfg.mlp.bias):
        out.append(f"the MLP is {cfg.mlp.activation} (bias {cfg.mlp.bias}); {CLS}'s is SwiGLU")
    if MOE in ffn:
        out += _moe_mismatches(cfg)
    return out


def _moe_mismatches(cfg: ModelConfig) -> list[str]:
    m, out = cfg.moe, []
    if m.router == "sigmoid" or (m.router == "softmax_topk" and not m.renormalize):
        out.append(
            f"moe.router {m.router} (renormalize {m.renormalize}); {CLS} softmaxes the top-k logits"
        )
    if m.uses_correction_bias():
        out.append(f"the router has a score-correction bias; {CLS}'s has none")
    if m.routed_scaling_factor != 1.0:
        out.append(f"moe.routed_scaling_factor={m.routed_scaling_factor:g}; {CLS} has none")
    if m.activation != "swiglu" or m.bias:
        out.append(f"the experts are {m.activation} (bias {m.bias}); {CLS}'s are SwiGLU")
    if m.n_shared_experts == 0:
        out.append(f"no shared expert; every {CLS} layer adds a shared SwiGLU MLP")
    return out


def _residual_scale(cfg: ModelConfig) -> float:
    """m = sqrt(gated eps / norm_eps) when the model has Mamba layers (see the module doc)."""
    if MAMBA not in symbols(cfg):
        return 1.0
    return math.sqrt(GATED_NORM_EPS / cfg.norm_eps)


def _take_swiglu(state: StateReader, prefix: str) -> tuple[Tensor, Tensor]:
    """(input_linear (2F, D) = [gate; up], output_linear (D, F)) of our SwiGLU MLP."""
    gate, up = state.take(prefix + "gate_proj.weight"), state.take(prefix + "up_proj.weight")
    return torch.cat([gate, up], dim=0), state.take(prefix + "down_proj.weight")


@register_target
class GraniteMoeHybrid(Target):
    name = "granitemoehybrid"
    model_type = "granitemoehybrid"
    architecture = "GraniteMoeHybridForCausalLM"

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        out = pairs_mismatch(cfg, CLS) + mamba_mismatches(cfg, eps_shared=False)
        out += attention_mismatches(cfg, CLS) + generate_mismatch(cfg, CLS)
        out += capacity_mismatch(cfg)
        if mixer_ffn_pairs(cfg) is not None:
            out += _ffn_mismatches(cfg)
        a = cfg.attention
        rope = ATTENTION in symbols(cfg) and a.position == "rope"
        if rope and a.rotary_dim(cfg.d_model) != a.resolved_head_dim(cfg.d_model):
            out.append(
                f"attention.rotary_fraction={a.rotary_fraction:g}; {CLS} rotates whole heads"
            )
        return out

    def hf_config(self, cfg: ModelConfig, spec: ExportSpec) -> Any:
        hf = require_transformers()
        pairs = mixer_ffn_pairs(cfg)
        assert pairs is not None
        syms, m, a, moe = symbols(cfg), cfg.mamba, cfg.attention, cfg.moe
        has_moe = syms[pairs[0][1]] == MOE
        shared = moe.shared_hidden(cfg.d_model) if has_moe else cfg.mlp.resolved_hidden(cfg.d_model)
        hd = a.resolved_head_dim(cfg.d_model)
        scale = _residual_scale(cfg)
        return hf.GraniteMoeHybridConfig(
            vocab_size=cfg.padded_vocab_size,
            hidden_size=cfg.d_model,
            num_hidden_layers=len(pairs),
            layer_types=[LAYER_TYPES[syms[i]] for i, _ in pairs],
            num_attention_heads=a.n_heads,
            num_key_value_heads=a.kv_heads(),
            head_dim=hd,
            attention_bias=a.bias,
            attention_multiplier=hd**-0.5,
            position_embedding_type="rope" if a.position == "rope" else None,
            rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
            num_local_experts=moe.n_experts if has_moe else 0,
            num_experts_per_tok=moe.top_k if has_moe else 1,
            intermediate_size=moe.expert_hidden(cfg.d_model) if has_moe else shared,
            shared_intermediate_size=shared,
            router_aux_loss_coef=moe.aux_loss_coef,
            hidden_act="silu",
            **mamba_prefixed_to_hf(m, cfg.d_model),
            rms_norm_eps=GATED_NORM_EPS if MAMBA in syms else cfg.norm_eps,
            embedding_multiplier=scale,
            residual_multiplier=scale,
            logits_scaling=1.0,
            tie_word_embeddings=cfg.tie_embeddings,
            max_position_embeddings=spec.max_position_embeddings,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            pad_token_id=spec.pad_token_id,
        )

    def to_hf(self, state: StateReader, cfg: ModelConfig) -> dict[str, Tensor]:
        syms, out = symbols(cfg), {"model.embed_tokens.weight": state.take("embed.weight")}
        for layer, (i, j) in enumerate(mixer_ffn_pairs(cfg) or []):
            p = f"model.layers.{layer}."
            out[p + "input_layernorm.weight"] = state.take(norm_key(i))
            out[p + "post_attention_layernorm.weight"] = state.take(norm_key(j))
            if syms[i] == MAMBA:
                copy_names(state, ours(i, ""), mamba_names(cfg.mamba), out, p + "mamba.")
            else:
                copy_names(
                    state, ours(i, ""), attention_names(cfg.attention), out, p + "self_attn."
                )
            shared = ours(j, "") if syms[j] == MLP else ours(j, "shared_experts.")
            w_in, w_out = _take_swiglu(state, shared)
            out[p + "shared_mlp.input_linear.weight"] = w_in
            out[p + "shared_mlp.output_linear.weight"] = w_out
            if syms[j] == MOE:
                out.update(self._experts_to_hf(state, j, p + "block_sparse_moe."))
        out["model.norm.weight"] = state.take("norm_f.weight")
        head = state.take("lm_head.weight")
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = head
        return out

    @staticmethod
    def _experts_to_hf(state: StateReader, j: int, p: str) -> dict[str, Tensor]:
        gate = state.take(ours(j, "experts.gate_proj")).transpose(1, 2)  # (E, F, D)
        up = state.take(ours(j, "experts.up_proj")).transpose(1, 2)
        return {
            p + "router.layer.weight": state.take(ours(j, "router.weight")),
            p + "input_linear.weight": torch.cat([gate, up], dim=1),  # (E, 2F, D)
            p + "output_linear.weight": state.take(ours(j, "experts.down_proj")).mT.contiguous(),
        }

    # -- import ------------------------------------------------------------------------------
    def model_config(self, hf_cfg: Any) -> ModelConfig:
        mixers = [_mixer_of(t) for t in hf_cfg.layer_types]
        n_exp = int(hf_cfg.num_local_experts or 0)
        pattern = "".join(s + (MOE if n_exp > 0 else MLP) for s in mixers)
        if hf_cfg.hidden_act != "silu":
            raise ConfigError(f"{CLS}: hidden_act {hf_cfg.hidden_act!r}; hybrid has SwiGLU (silu)")
        eps, m_e = float(hf_cfg.rms_norm_eps), float(hf_cfg.embedding_multiplier)
        if MAMBA in mixers and eps != GATED_NORM_EPS:
            raise ConfigError(
                f"{CLS}: rms_norm_eps={eps:g} is also the Mamba gated norm's eps, which is "
                f"{GATED_NORM_EPS:g} in hybrid"
            )
        rope = hf_cfg.position_embedding_type == "rope"
        if rope and rope_type(hf_cfg) != "default":
            raise ConfigError(f"{CLS}: rope_type {rope_type(hf_cfg)!r}; hybrid has plain RoPE")
        shared = int(hf_cfg.shared_intermediate_size)
        data = {
            "d_model": hf_cfg.hidden_size,
            "vocab_size": hf_cfg.vocab_size,
            "pad_vocab_multiple": 1,
            "norm_eps": rounded(eps / m_e**2),
            "tie_embeddings": bool(hf_cfg.tie_word_embeddings),
            "layout": {"pattern": pattern},
            "mamba": mamba_prefixed_from_hf(hf_cfg),
            "attention": {
                "n_heads": hf_cfg.num_attention_heads,
                "n_kv_heads": hf_cfg.num_key_value_heads,
                "head_dim": _head_dim(hf_cfg),
                "position": "rope" if rope else "none",
                "rope_theta": rope_theta(hf_cfg),
                "bias": bool(hf_cfg.attention_bias),
            },
            "mlp": {"activation": "swiglu", "hidden_size": shared, "bias": False},
        }
        if n_exp > 0:
            data["moe"] = {
                "n_experts": n_exp,
                "top_k": hf_cfg.num_experts_per_tok,
                "router": "topk_softmax",
                "expert_hidden_size": hf_cfg.intermediate_size,
                "n_shared_experts": 1,
                "shared_hidden_size": shared,
                "aux_loss_coef": float(hf_cfg.router_aux_loss_coef or 0.0),
            }
        return model_config_from_dict(data, f"{CLS} config")

    def from_hf(self, state: StateReader, hf_cfg: Any, cfg: ModelConfig) -> dict[str, Tensor]:
        fold = _Fold.of(hf_cfg, cfg)
        syms, out = symbols(cfg), {"embed.weight": state.take("model.embed_tokens.weight")}
        for layer, (i, j) in enumerate(mixer_ffn_pairs(cfg) or []):
            p = f"model.layers.{layer}."
            out[norm_key(i)] = state.take(p + "input_layernorm.weight")
            out[norm_key(j)] = state.take(p + "post_attention_layernorm.weight")
            if syms[i] == MAMBA:
                copy_names(state, p + "mamba.", mamba_names(cfg.mamba), out, ours(i, ""))
                fold.outputs(out, ours(i, "out_proj."))
            else:
                copy_names(
                    state, p + "self_attn.", attention_names(cfg.attention), out, ours(i, "")
                )
                fold.queries(out, ours(i, "q_proj."))
                fold.outputs(out, ours(i, "o_proj."))
            shared = ours(j, "") if syms[j] == MLP else ours(j, "shared_experts.")
            gate, up = state.take(p + "shared_mlp.input_linear.weight").chunk(2, dim=0)
            out[shared + "gate_proj.weight"], out[shared + "up_proj.weight"] = gate, up
            out[shared + "down_proj.weight"] = state.take(p + "shared_mlp.output_linear.weight")
            fold.outputs(out, shared + "down_proj.")
            if syms[j] == MOE:
                _experts_from_hf(state, p + "block_sparse_moe.", j, out)
                fold.outputs(out, ours(j, "experts."), key="down_proj")
        out["norm_f.weight"] = fold.final_norm(state.take("model.norm.weight"))
        lm_head_from_hf(state, cfg, out, "lm_head.weight")
        return out


def _mixer_of(layer_type: str) -> str:
    if layer_type not in MIXER_OF_TYPE:
        raise ConfigError(f"{CLS}: unknown layer type {layer_type!r} in layer_types")
    return MIXER_OF_TYPE[layer_type]


def _head_dim(hf_cfg: Any) -> int:
    return int(
        getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    )


def _experts_from_hf(state: StateReader, p: str, j: int, out: dict[str, Tensor]) -> None:
    out[ours(j, "router.weight")] = state.take(p + "router.layer.weight")
    gate, up = state.take(p + "input_linear.weight").chunk(2, dim=1)  # (E, F, D) each
    out[ours(j, "experts.gate_proj")] = gate.mT.contiguous()
    out[ours(j, "experts.up_proj")] = up.mT.contiguous()
    out[ours(j, "experts.down_proj")] = state.take(p + "output_linear.weight").mT.contiguous()


class _Fold:
    """Granite's scalar multipliers folded into weights (see the module docstring)."""

    def __init__(self, residual: float, logits: float, query: float) -> None:
        self.residual, self.logits, self.query = residual, logits, query

    @classmethod
    def of(cls, hf_cfg: Any, cfg: ModelConfig) -> _Fold:
        m_e, r = float(hf_cfg.embedding_multiplier), float(hf_cfg.residual_multiplier)
        s, m_a = float(hf_cfg.logits_scaling), float(hf_cfg.attention_multiplier)
        query = m_a * math.sqrt(cfg.attention.resolved_head_dim(cfg.d_model))
        if ATTENTION not in symbols(cfg):
            query = 1.0
        fold = cls(residual=r / m_e, logits=1.0 / s, query=query)
        if (fold.residual, fold.logits, round(fold.query, 12)) != (1.0, 1.0, 1.0):
            log.info(
                "folding Granite multipliers into the weights: embedding %g, residual %g, "
                "logits scaling %g, attention %g (norm eps becomes %g)",
                m_e, r, s, m_a, cfg.norm_eps,
            )  # fmt: skip
        return fold

    @staticmethod
    def _scale(out: dict[str, Tensor], prefix: str, factor: float, names: tuple[str, ...]) -> None:
        if factor == 1.0:
            return
        for n in names:
            if prefix + n in out:
                out[prefix + n] = out[prefix + n] * factor

    def outputs(self, out: dict[str, Tensor], prefix: str, key: str | None = None) -> None:
        names = (key,) if key else ("weight", "bias")
        self._scale(out, prefix, self.residual, names)

    def queries(self, out: dict[str, Tensor], prefix: str) -> None:
        if round(self.query, 12) != 1.0:
            self._scale(out, prefix, self.query, ("weight", "bias"))

    def final_norm(self, weight: Tensor) -> Tensor:
        return weight if self.logits == 1.0 else weight * self.logits
