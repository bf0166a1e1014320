"""What a designer wants to know about a recipe, computed from the configs alone.

Parameters (total and active per token), training FLOPs per token (forward + backward = 3x the
forward matmul, attention and SSD FLOPs; attention over the causal half of the context), and the
inference cache per sequence at a context length (Mamba conv + fp32 SSM state, attention KV), next
to the same figures for an attention-only model of the same width and depth (every `M` replaced
by `*`). The model built from a config has exactly `params_total` parameters (tested).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hybrid.recipe.layout import LayerSpec, LayoutConfig, canonical_pattern
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError


@dataclass(frozen=True)
class SublayerFigures:
    index: int
    symbol: str
    kind: str
    params: int
    active_params: int
    flops_per_token: float
    cache_bytes: int


@dataclass(frozen=True)
class ModelFigures:
    pattern: str
    params_total: int
    params_active: int
    params_embedding: int
    flops_per_token: float
    cache_bytes: int
    sublayers: list[SublayerFigures]

    def summary(self) -> dict:
        return {
            "pattern": self.pattern,
            "params_total": self.params_total,
            "params_active": self.params_active,
            "flops_per_token": self.flops_per_token,
            "cache_bytes": self.cache_bytes,
        }


def _sublayer(cfg: ModelConfig, spec: LayerSpec, seq_len: int, context: int) -> SublayerFigures:
    block = cfg.sublayer_config(spec.symbol)
    d = cfg.d_model
    params = block.num_params(d) + d  # + the pre-norm weight
    active = (block.active_params(d) + d) if spec.symbol == "E" else params
    return SublayerFigures(
        index=spec.index,
        symbol=spec.symbol,
        kind=spec.kind,
        params=params,
        active_params=active,
        flops_per_token=3.0 * block.flops_per_token(d, seq_len),
        cache_bytes=block.cache_bytes(d, context),
    )


def model_figures(cfg: ModelConfig, *, seq_len: int, context: int) -> ModelFigures:
    """Figures of `cfg` at training length `seq_len` and inference context `context`."""
    rows = [_sublayer(cfg, spec, seq_len, context) for spec in cfg.layers()]
    d, vocab = cfg.d_model, cfg.padded_vocab_size
    embedding = vocab * d
    head = 0 if cfg.tie_embeddings else vocab * d
    outer = embedding + head + d  # + final norm
    head_flops = 3.0 * 2 * d * vocab
    return ModelFigures(
        pattern=canonical_pattern(cfg.layers()),
        params_total=outer + sum(r.params for r in rows),
        params_active=outer + sum(r.active_params for r in rows),
        params_embedding=embedding,
        flops_per_token=head_flops + sum(r.flops_per_token for r in rows),
        cache_bytes=sum(r.cache_bytes for r in rows),
        sublayers=rows,
    )


def attention_only(cfg: ModelConfig) -> ModelConfig:
    """The same model with every Mamba-2 mixer replaced by attention."""
    pattern = cfg.pattern().replace("M", "*")
    return dataclasses.replace(cfg, layout=LayoutConfig(pattern=pattern))


def recipe_figures(cfg: ModelConfig, *, seq_len: int, context: int) -> dict:
    """`hybrid inspect --json`'s object: figures of the model and of its attention-only twin."""
    ours = model_figures(cfg, seq_len=seq_len, context=context)
    try:
        twin = attention_only(cfg)
    except ConfigError as err:
        msg = f"{err.message} (the attention-only comparison model uses these settings)"
        raise ConfigError(msg, key=f"model.{err.key}") from None
    base = model_figures(twin, seq_len=seq_len, context=context)
    out = ours.summary()
    out["params_embedding"] = ours.params_embedding
    out["seq_len"] = seq_len
    out["context"] = context
    out["baseline"] = base.summary()
    out["layers"] = [dataclasses.asdict(r) for r in ours.sublayers]
    return out
