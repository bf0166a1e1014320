"""`ModelConfig`: width, vocabulary, layout and the per-kind sublayer configs of a hybrid LM.

A model is: token embedding -> N pre-norm residual sublayers `x = x + f(norm(x))` (f by the
layout's symbols) -> final norm -> LM head (optionally tied to the embedding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hybrid.recipe.blocks import AttentionConfig, Mamba2Config, MLPConfig, MoEConfig, round_up
from hybrid.recipe.layout import LayerSpec, LayoutConfig, canonical_pattern, resolve_layout
from hybrid.recipe.schema import ConfigError, check

# Which ModelConfig field configures each layout symbol.
SUBLAYER_FIELD = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


@dataclass(kw_only=True)
class InitConfig:
    """Weight initialisation. `scaled`: normal(0, std) everywhere and std/sqrt(n_sublayers) for the
    output projection of every residual sublayer (GPT-2 / Megatron's 1/sqrt(2*n_layers), one
    residual branch per sublayer); `normal`: normal(0, std) for all.
    Mamba-2's dt_bias, A_log and D always follow mamba_ssm's initialisation."""

    std: float = 0.02
    scheme: Literal["scaled", "normal"] = "scaled"

    def __post_init__(self) -> None:
        check(self.std > 0, "std", "must be positive")


@dataclass(kw_only=True)
class ModelConfig:
    d_model: int = 256
    vocab_size: int = 32000
    pad_vocab_multiple: int = 64
    layout: LayoutConfig = field(default_factory=lambda: LayoutConfig(pattern="M-M-*-M-"))
    mamba: Mamba2Config = field(default_factory=Mamba2Config)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init: InitConfig = field(default_factory=InitConfig)

    def __post_init__(self) -> None:
        check(self.d_model > 0, "d_model", "must be positive")
        check(self.vocab_size > 0, "vocab_size", "must be positive")
        check(self.pad_vocab_multiple > 0, "pad_vocab_multiple", "must be positive")
        check(self.norm_eps > 0, "norm_eps", "must be positive")
        for symbol in sorted(set(s.symbol for s in self.layers())):
            name = SUBLAYER_FIELD[symbol]
            try:
                getattr(self, name).validate_for(self.d_model)
            except ConfigError as err:
                raise err.with_context(prefix=name) from None

    def layers(self) -> list[LayerSpec]:
        try:
            return resolve_layout(self.layout)
        except ConfigError as err:
            raise err.with_context(prefix="layout") from None

    def pattern(self) -> str:
        return canonical_pattern(self.layers())

    def sublayer_config(
        self, symbol: str
    ) -> Mamba2Config | AttentionConfig | MLPConfig | MoEConfig:
        return getattr(self, SUBLAYER_FIELD[symbol])

    @property
    def padded_vocab_size(self) -> int:
        return round_up(self.vocab_size, self.pad_vocab_multiple)

    def output_init_std(self) -> float:
        if self.init.scheme == "normal":
            return self.init.std
        return self.init.std / len(self.layers()) ** 0.5
