"""The hybrid layout: from the forms a user writes to one canonical list of sublayers.

Canonical form (Megatron-LM / Nemotron-H symbols), one symbol per pre-norm residual sublayer:
`M` Mamba-2 mixer, `*` attention, `-` dense MLP, `E` mixture of experts; `|` marks a
pipeline-stage boundary (kept for the Megatron backend). Whitespace is ignored.

Shorter forms, all expanding to the canonical one in `resolve_layout` (a pure function):
- `pattern: "M-M-M-*-"` the canonical string itself;
- `block: "M-M-M-*E"` + `repeat: 4`: a block written once and repeated;
- Jamba-style rules over `n_layers` layers, each a mixer followed by an FFN (`ffn: mlp | moe |
  none`): `attention_every: k` + `attention_offset: o` puts attention in layer i when
  i % k == o; `moe_every: j` + `moe_offset: p` makes the FFN of layer i an MoE when i % j == p;
- a ratio: `n_layers` + `attention_ratio: "1:7"` (attention:Mamba) or a fraction such as 0.125:
  attention layers spread evenly, starting and ending with Mamba (Megatron's allocation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from hybrid.recipe.schema import ConfigError, check

MAMBA, ATTENTION, MLP, MOE, STAGE = "M", "*", "-", "E", "|"
SYMBOLS = {MAMBA: "Mamba-2", ATTENTION: "attention", MLP: "MLP", MOE: "MoE"}
MIXERS = (MAMBA, ATTENTION)
_MEGATRON_ONLY = {
    "G": "gated delta net",
    "D": "a Megatron layer kind",
    "+": "a Megatron layer kind",
    "P": "parallel hybrid (Falcon-H1)",
}


@dataclass(frozen=True)
class LayerSpec:
    """One residual sublayer: its position, symbol and pipeline stage."""

    index: int
    symbol: str
    stage: int

    @property
    def kind(self) -> str:
        return SYMBOLS[self.symbol]


@dataclass(kw_only=True)
class LayoutConfig:
    """How the sublayers are arranged; exactly one of the forms in the module docstring."""

    pattern: str | None = None
    block: str | None = None
    repeat: int = 1
    n_layers: int | None = None
    ffn: Literal["mlp", "moe", "none"] = "mlp"
    attention_every: int | None = None
    attention_offset: int = 0
    attention_ratio: float | str | None = None
    moe_every: int | None = None
    moe_offset: int = 0

    def __post_init__(self) -> None:
        forms = [self.pattern is not None, self.block is not None, self.n_layers is not None]
        check(
            sum(forms) == 1,
            "pattern",
            "give exactly one of: pattern, block (+ repeat), or n_layers (+ attention_every / "
            "attention_ratio)",
        )
        check(self.repeat >= 1, "repeat", "must be at least 1")
        check(self.repeat == 1 or self.block is not None, "repeat", "repeats a block: needs block")
        if self.n_layers is None:
            for key in ("attention_every", "attention_ratio", "moe_every"):
                check(getattr(self, key) is None, key, "needs n_layers")
            check(
                self.ffn == "mlp", "ffn", "applies to n_layers layouts (a pattern names its FFNs)"
            )
        else:
            self._check_rules()
        # an offset without its rule would be ignored: say so instead
        check(self.attention_offset == 0 or self.attention_every is not None, "attention_offset",
              "needs attention_every")  # fmt: skip
        check(self.moe_offset == 0 or self.moe_every is not None, "moe_offset", "needs moe_every")
        resolve_layout(self)  # surface pattern errors at load time

    def _check_rules(self) -> None:
        check((self.n_layers or 0) > 0, "n_layers", "must be positive")
        check(
            self.attention_every is None or self.attention_ratio is None,
            "attention_ratio",
            "give attention_every or attention_ratio, not both",
        )
        if self.attention_every is not None:
            check(self.attention_every > 0, "attention_every", "must be positive")
            check(
                0 <= self.attention_offset < self.attention_every,
                "attention_offset",
                "must be in [0, attention_every)",
            )
        if self.moe_every is not None:
            check(self.moe_every > 0, "moe_every", "must be positive")
            check(0 <= self.moe_offset < self.moe_every, "moe_offset", "must be in [0, moe_every)")
            check(self.ffn != "none", "moe_every", "needs an FFN per layer (ffn: mlp or moe)")
        if self.attention_ratio is not None:
            parse_ratio(self.attention_ratio)


def parse_ratio(ratio: float | str) -> float:
    """Attention fraction from `"a:m"` (attention:Mamba) or a float in [0, 1]."""
    if isinstance(ratio, str):
        parts = ratio.split(":")
        try:
            attn, mamba = (float(p) for p in parts)
        except ValueError:
            raise ConfigError(
                f"{ratio!r} is not a ratio like '1:7' or a fraction like 0.125",
                key="attention_ratio",
            ) from None
        check(
            attn >= 0 and mamba >= 0 and 0 < attn + mamba < math.inf,
            "attention_ratio",
            "ratio parts must be finite and non-negative",
        )
        return attn / (attn + mamba)
    check(0.0 <= ratio <= 1.0, "attention_ratio", "a fraction must be in [0, 1]")
    return float(ratio)


def _parse_pattern(text: str, key: str) -> list[str]:
    """Split a canonical pattern into symbols and '|' markers, rejecting anything else."""
    out = []
    for pos, char in enumerate(text):
        if char.isspace():
            continue
        if char in SYMBOLS or char == STAGE:
            out.append(char)
        elif char == "/":
            raise ConfigError("multi-token-prediction layers ('/') are not supported", key=key)
        elif char in _MEGATRON_ONLY:
            raise ConfigError(
                f"symbol {char!r} at position {pos} ({_MEGATRON_ONLY[char]}) is a Megatron-LM "
                f"symbol that hybrid does not implement; supported: M * - E and | ",
                key=key,
            )
        else:
            raise ConfigError(
                f"unknown symbol {char!r} at position {pos}; use M (Mamba-2), * (attention), "
                f"- (MLP), E (MoE), | (pipeline-stage boundary)",
                key=key,
            )
    return out


def _evenly_spaced_attention(n_layers: int, fraction: float) -> list[bool]:
    """Megatron's allocation: attention evenly spaced, starting and ending with Mamba."""
    n_attn = round(n_layers * fraction)
    if n_attn == 0:
        return [False] * n_layers
    section = (n_layers - n_attn) / (n_attn + 1)
    is_attn, x = [], section
    for _ in range(n_layers):
        if x < 0.5:
            is_attn.append(True)
            x += section
        else:
            is_attn.append(False)
            x -= 1
    return is_attn


def _layer_rules(cfg: LayoutConfig) -> list[str]:
    n = cfg.n_layers or 0
    if cfg.attention_every is not None:
        attn = [i % cfg.attention_every == cfg.attention_offset for i in range(n)]
    else:
        attn = _evenly_spaced_attention(n, parse_ratio(cfg.attention_ratio or 0.0))
    out = []
    for i in range(n):
        out.append(ATTENTION if attn[i] else MAMBA)
        if cfg.ffn == "none":
            continue
        is_moe = cfg.ffn == "moe" or (
            cfg.moe_every is not None and i % cfg.moe_every == cfg.moe_offset
        )
        out.append(MOE if is_moe else MLP)
    return out


def resolve_layout(cfg: LayoutConfig) -> list[LayerSpec]:
    """Expand any layout form into the per-sublayer specs (index, symbol, pipeline stage)."""
    if cfg.pattern is not None:
        tokens = _parse_pattern(cfg.pattern, "pattern")
    elif cfg.block is not None:
        tokens = _parse_pattern(cfg.block, "block") * cfg.repeat
        if tokens and tokens[-1] == STAGE:  # "M-*-|" x N: one pipeline stage per block
            tokens = tokens[:-1]
    else:
        tokens = _layer_rules(cfg)
    specs: list[LayerSpec] = []
    stage = 0
    for pos, tok in enumerate(tokens):
        if tok == STAGE:
            check(
                bool(specs) and pos + 1 < len(tokens) and tokens[pos + 1] != STAGE,
                "pattern",
                "a '|' stage boundary must sit between two sublayers",
            )
            stage += 1
            continue
        specs.append(LayerSpec(index=len(specs), symbol=tok, stage=stage))
    check(bool(specs), "pattern", "the layout has no sublayers")
    return specs


def canonical_pattern(specs: list[LayerSpec], *, stages: bool = True) -> str:
    """The canonical string of a resolved layout (with '|' between stages)."""
    out, stage = [], 0
    for spec in specs:
        if stages and spec.stage != stage:
            out.append(STAGE)
            stage = spec.stage
        out.append(spec.symbol)
    return "".join(out)
