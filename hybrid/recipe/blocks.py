"""Config dataclasses of the four sublayer kinds: Mamba-2 (`M`), attention (`*`), MLP (`-`),
MoE (`E`).

Defaults follow the reference implementations (mamba_ssm `Mamba2`, Llama-style attention,
Megatron / Mixtral MoE). Sizes that depend on the model width (`head_dim`, `hidden_size`, ...)
are `None` by default and resolved with the `resolved_*` helpers given `d_model`. Each config
counts its own parameters, forward FLOPs per token and inference-cache bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from hybrid.recipe.schema import check

Activation = Literal["swiglu", "squared_relu", "gelu"]
RouterKind = Literal["softmax_topk", "topk_softmax", "sigmoid"]


def round_up(value: int, multiple: int) -> int:
    return ((value + multiple - 1) // multiple) * multiple


def mlp_params(d_model: int, hidden: int, activation: str, bias: bool) -> int:
    """Parameters of one (expert) MLP: gate+up+down for SwiGLU, up+down otherwise."""
    n_in = 2 if activation == "swiglu" else 1
    weights = (n_in + 1) * d_model * hidden
    biases = (n_in * hidden + d_model) if bias else 0
    return weights + biases


def mlp_matmul_flops(d_model: int, hidden: int, activation: str) -> int:
    n_in = 2 if activation == "swiglu" else 1
    return 2 * (n_in + 1) * d_model * hidden


@dataclass(kw_only=True)
class Mamba2Config:
    """Mamba-2 (SSD) mixer; parameter layout as mamba_ssm's `Mamba2` (in_proj rows z, x, B, C,
    dt; depthwise conv over x, B, C; gated RMSNorm over `n_groups` groups)."""

    d_state: int = 128
    head_dim: int = 64
    expand: int = 2
    n_groups: int = 1
    d_conv: int = 4
    chunk_size: int = 256
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    a_init_range: tuple[float, float] = (1.0, 16.0)
    conv_bias: bool = True
    bias: bool = False
    d_has_hdim: bool = False
    gated_norm: bool = True
    norm_before_gate: bool = False

    def __post_init__(self) -> None:
        for name in ("d_state", "head_dim", "expand", "n_groups", "d_conv", "chunk_size"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.d_conv <= 4, "d_conv", "must be at most 4 (the causal-conv1d kernels' limit)")
        check(0 < self.dt_min <= self.dt_max, "dt_min", "need 0 < dt_min <= dt_max")
        check(self.dt_init_floor > 0, "dt_init_floor", "must be positive")
        lo, hi = self.dt_limit
        check(0 <= lo < hi, "dt_limit", "need 0 <= low < high")
        lo, hi = self.a_init_range
        check(0 < lo <= hi, "a_init_range", "need 0 < low <= high")

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def n_heads(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.head_dim

    def conv_dim(self, d_model: int) -> int:
        return self.d_inner(d_model) + 2 * self.n_groups * self.d_state

    def validate_for(self, d_model: int) -> None:
        d_inner = self.d_inner(d_model)
        check(
            d_inner % self.head_dim == 0,
            "head_dim",
            f"expand*d_model={d_inner} is not divisible by head_dim={self.head_dim}",
        )
        heads = d_inner // self.head_dim
        check(
            heads % self.n_groups == 0,
            "n_groups",
            f"the {heads} Mamba heads do not divide into n_groups={self.n_groups}",
        )

    def num_params(self, d_model: int) -> int:
        d_inner, heads, conv_dim = (
            self.d_inner(d_model),
            self.n_heads(d_model),
            self.conv_dim(d_model),
        )
        in_rows = 2 * d_inner + 2 * self.n_groups * self.d_state + heads
        n = d_model * in_rows + (in_rows if self.bias else 0)
        n += conv_dim * self.d_conv + (conv_dim if self.conv_bias else 0)
        n += 3 * heads if not self.d_has_hdim else 2 * heads + d_inner  # dt_bias, A_log, D
        n += d_inner if self.gated_norm else 0
        n += d_inner * d_model + (d_model if self.bias else 0)
        return n

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        """Forward FLOPs per token: projections, conv, and the chunked SSD (causal halves)."""
        d_inner, heads, conv_dim = (
            self.d_inner(d_model),
            self.n_heads(d_model),
            self.conv_dim(d_model),
        )
        in_rows = 2 * d_inner + 2 * self.n_groups * self.d_state + heads
        proj = 2 * d_model * in_rows + 2 * d_inner * d_model
        conv = 2 * conv_dim * self.d_conv
        q = min(self.chunk_size, seq_len)
        p, n, g = self.head_dim, self.d_state, self.n_groups
        intra = q * g * n + q * heads * p  # C B^T and (L o CB) x, causal half of 2*Q*...
        states = 2 * heads * p * n * 2  # chunk states (B^T x) and state output (C h)
        return float(proj + conv + intra + states)

    def cache_bytes(self, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        """Conv state (d_conv-1 inputs, model dtype) + SSM state (fp32); independent of context."""
        conv = self.conv_dim(d_model) * (self.d_conv - 1) * dtype_bytes
        ssm = self.n_heads(d_model) * self.head_dim * self.d_state * 4
        return conv + ssm


@dataclass(kw_only=True)
class AttentionConfig:
    """Causal softmax attention with GQA/MQA, optional RoPE, QK-norm and sliding window."""

    n_heads: int = 16
    n_kv_heads: int | None = None
    head_dim: int | None = None
    position: Literal["rope", "none"] = "rope"
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0
    qk_norm: bool = False
    bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        check(self.n_heads > 0, "n_heads", "must be positive")
        if self.n_kv_heads is not None:
            check(self.n_kv_heads > 0, "n_kv_heads", "must be positive")
            check(
                self.n_heads % self.n_kv_heads == 0,
                "n_kv_heads",
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}",
            )
        if self.head_dim is not None:
            check(
                self.head_dim > 0 and self.head_dim % 2 == 0,
                "head_dim",
                "must be a positive even number",
            )
        check(0.0 < self.rotary_fraction <= 1.0, "rotary_fraction", "must be in (0, 1]")
        check(self.rope_theta > 0, "rope_theta", "must be positive")
        if self.sliding_window is not None:
            check(self.sliding_window > 0, "sliding_window", "must be positive")

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def rotary_dim(self, d_model: int) -> int:
        dim = int(self.resolved_head_dim(d_model) * self.rotary_fraction)
        return dim - dim % 2

    def validate_for(self, d_model: int) -> None:
        if self.position == "rope":
            check(
                self.rotary_dim(d_model) >= 2,
                "rotary_fraction",
                "rotates fewer than 2 dims of each head; raise it or use position: none",
            )
        if self.head_dim is None:
            check(
                d_model % self.n_heads == 0,
                "n_heads",
                f"d_model={d_model} is not divisible by n_heads={self.n_heads}; "
                "set attention.head_dim",
            )
            check(
                (d_model // self.n_heads) % 2 == 0,
                "n_heads",
                "d_model/n_heads must be even (rotary pairs); set attention.head_dim",
            )

    def num_params(self, d_model: int) -> int:
        hd = self.resolved_head_dim(d_model)
        q, kv = self.n_heads * hd, self.kv_heads() * hd
        n = d_model * (q + 2 * kv) + q * d_model
        if self.bias:
            n += q + 2 * kv + d_model
        if self.qk_norm:
            n += 2 * hd
        return n

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        """Forward FLOPs per token: projections plus QK^T and AV over the causal half of the
        (possibly windowed) context, averaged over positions of a `seq_len` sequence."""
        hd = self.resolved_head_dim(d_model)
        q, kv = self.n_heads * hd, self.kv_heads() * hd
        proj = 2 * d_model * (q + 2 * kv) + 2 * q * d_model
        window = self.sliding_window or seq_len
        mean_ctx = _mean_causal_context(seq_len, window)
        return float(proj + 2 * 2 * q * mean_ctx)

    def cache_bytes(self, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        length = min(context, self.sliding_window or context)
        return 2 * self.kv_heads() * self.resolved_head_dim(d_model) * length * dtype_bytes


def _mean_causal_context(seq_len: int, window: int) -> float:
    """Mean number of keys a query attends to over positions 1..seq_len (window-limited)."""
    w = min(window, seq_len)
    full = w * (w + 1) / 2 + (seq_len - w) * w
    return full / seq_len


@dataclass(kw_only=True)
class MLPConfig:
    """Dense feed-forward sublayer. `hidden_size` defaults to 8/3*d_model (SwiGLU) or 4*d_model,
    rounded up to `multiple_of`."""

    activation: Activation = "swiglu"
    hidden_size: int | None = None
    multiple_of: int = 256
    bias: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size is not None:
            check(self.hidden_size > 0, "hidden_size", "must be positive")
        check(self.multiple_of > 0, "multiple_of", "must be positive")

    def resolved_hidden(self, d_model: int) -> int:
        if self.hidden_size is not None:
            return self.hidden_size
        base = int(8 * d_model / 3) if self.activation == "swiglu" else 4 * d_model
        return round_up(base, self.multiple_of)

    def validate_for(self, d_model: int) -> None:
        return None

    def num_params(self, d_model: int) -> int:
        return mlp_params(d_model, self.resolved_hidden(d_model), self.activation, self.bias)

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        return float(mlp_matmul_flops(d_model, self.resolved_hidden(d_model), self.activation))

    def cache_bytes(self, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        return 0


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture of experts. Routers: `softmax_topk` (softmax over all experts, then top-k;
    `renormalize` rescales the k weights to sum 1), `topk_softmax` (top-k logits, then softmax
    over those k), `sigmoid` (sigmoid scores; a non-learned score-correction bias buffer used
    only for selection, as DeepSeek-V3 / Nemotron-H, moved by `bias_update_rate` after every
    optimizer step towards balanced loads). `capacity_factor: null` is dropless."""

    n_experts: int = 16
    top_k: int = 2
    router: RouterKind = "softmax_topk"
    renormalize: bool = True
    expert_hidden_size: int | None = None
    activation: Activation = "swiglu"
    n_shared_experts: int = 0
    shared_hidden_size: int | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    capacity_factor: float | None = None
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool | None = None
    bias_update_rate: float = 1e-3
    bias: bool = False

    def __post_init__(self) -> None:
        check(self.n_experts > 0, "n_experts", "must be positive")
        check(
            0 < self.top_k <= self.n_experts,
            "top_k",
            f"must be between 1 and n_experts={self.n_experts}",
        )
        check(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        check(self.aux_loss_coef >= 0, "aux_loss_coef", "must be >= 0")
        check(self.z_loss_coef >= 0, "z_loss_coef", "must be >= 0")
        if self.capacity_factor is not None:
            check(self.capacity_factor > 0, "capacity_factor", "must be positive (null = dropless)")
        for name in ("expert_hidden_size", "shared_hidden_size"):
            value = getattr(self, name)
            check(value is None or value > 0, name, "must be positive")
        check(self.bias_update_rate >= 0, "bias_update_rate", "must be >= 0 (0 = frozen bias)")
        if self.capacity_factor is not None:
            check(math.isfinite(self.capacity_factor), "capacity_factor", "must be finite")
        if self.score_correction_bias:
            check(
                self.router == "sigmoid",
                "score_correction_bias",
                "only the sigmoid router uses a score-correction bias",
            )

    def uses_correction_bias(self) -> bool:
        if self.score_correction_bias is None:
            return self.router == "sigmoid"
        return self.score_correction_bias

    def expert_hidden(self, d_model: int) -> int:
        if self.expert_hidden_size is not None:
            return self.expert_hidden_size
        base = int(8 * d_model / 3) if self.activation == "swiglu" else 4 * d_model
        return round_up(base, 128)

    def shared_hidden(self, d_model: int) -> int:
        return self.shared_hidden_size or self.expert_hidden(d_model) * self.n_shared_experts

    def validate_for(self, d_model: int) -> None:
        return None

    def _expert_params(self, d_model: int) -> int:
        return mlp_params(d_model, self.expert_hidden(d_model), self.activation, self.bias)

    def _fixed_params(self, d_model: int) -> int:
        n = d_model * self.n_experts  # router (the correction bias is a buffer, not counted)
        if self.n_shared_experts:
            n += mlp_params(d_model, self.shared_hidden(d_model), self.activation, self.bias)
        return n

    def num_params(self, d_model: int) -> int:
        return self._fixed_params(d_model) + self.n_experts * self._expert_params(d_model)

    def active_params(self, d_model: int) -> int:
        return self._fixed_params(d_model) + self.top_k * self._expert_params(d_model)

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        flops = 2 * d_model * self.n_experts  # router
        flops += 2 * self.top_k * d_model  # weighted combine of the k expert outputs
        flops += self.top_k * mlp_matmul_flops(
            d_model, self.expert_hidden(d_model), self.activation
        )
        if self.n_shared_experts:
            flops += mlp_matmul_flops(d_model, self.shared_hidden(d_model), self.activation)
        return float(flops)

    def cache_bytes(self, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        return 0
