"""Self-contained Hugging Face model of a `hybrid` language model (Mamba-2 / attention / MLP /
MoE sublayers), written into the model directory by `hybrid convert to-hf`.

Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; `generate()`
works with a hybrid cache (`HybridLMCache`: the attention layers' keys and values plus each
Mamba layer's conv and SSM states). Imports only torch and transformers. Parameter names are
`hybrid`'s canonical names under `model.` (`model.layers.{i}.mixer.in_proj.weight`, ...).

Each sublayer is x = x + f(norm(x)), f chosen by the config's `pattern` symbol:
  M  Mamba-2 (mamba_ssm layout): in_proj -> [z, x, B, C, dt]; causal depthwise conv + SiLU over
     [x, B, C]; SSD scan with A = -exp(A_log), dt = softplus(dt + dt_bias) clamped to dt_limit,
     skip D; gated RMSNorm over n_groups groups; out_proj.
  *  causal attention: GQA, optional RoPE on the first rotary_dim dims of each head (first half
     rotated against second), QK-norm, biases, sliding window.
  -  MLP: SwiGLU down(silu(gate(x)) * up(x)), or down(act(up(x))) for squared_relu / gelu.
  E  MoE: routers softmax_topk, topk_softmax or sigmoid (+ selection-only correction bias),
     stacked experts (E, D, F) / (E, F, D), optional shared expert.

Legend: B batch, L new tokens, T cached + new tokens, D model width, H heads, P head dim,
G groups, N state size, K conv width, C conv channels, E experts, F expert width.
Left padding (a 2-D attention_mask with zeros on the left) is supported.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hybrid_lm import HybridLMConfig

# transformers renamed the outputs' and generate()'s `past_key_values` to `cache` (5.2x); both
# spellings are accepted on input, and the output uses the field this version declares.
_CACHE_FIELD = (
    "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    else "past_key_values"
)  # fmt: skip


class HybridLMCache(DynamicCache):
    """Keys and values of the attention layers (DynamicCache layer j = the j-th attention
    sublayer) plus conv (B, C, K-1) and SSM (B, H, P, N) states per Mamba sublayer."""

    def __init__(self):
        super().__init__()
        self.conv_states, self.ssm_states, self.seen_tokens = {}, {}, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def _map_states(self, fn):
        for states in (self.conv_states, self.ssm_states):
            for key in states:
                states[key] = fn(states[key])

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._map_states(lambda t: t[indices])

    def reset(self):
        super().reset()
        self.conv_states, self.ssm_states, self.seen_tokens = {}, {}, 0

    def crop(self, max_length: int):
        raise NotImplementedError("a Mamba state cannot be rolled back to an earlier length")


def rms_norm(x, weight, eps, group_size=None):
    """RMSNorm in float32 over the last dim (or each group of `group_size` channels)."""
    dtype, x = x.dtype, x.float()
    shape = x.shape
    if group_size is not None:
        x = x.unflatten(-1, (shape[-1] // group_size, group_size))
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    x = x.reshape(shape)
    return (x * weight.float() if weight is not None else x).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def _segsum(a):
    """a (..., Q) -> (..., Q, Q): sum of a[s+1..q] at [q, s] for s <= q, -inf above."""
    Q = a.shape[-1]
    a = a[..., None].expand(*a.shape, Q)
    below = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device), diagonal=-1)
    s = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device))
    return s.masked_fill(~causal, -torch.inf)


def ssd_scan(x, dt, A, B, C, chunk, state=None):
    """Chunked SSD (Mamba-2 paper) in float32: x (B,L,H,P), dt (B,L,H), A (H), B/C (B,L,G,N),
    state (B,H,P,N) or None -> y (B,L,H,P) without the D skip, final state (B,H,P,N)."""
    b, L, H, P = x.shape
    B = B.repeat_interleave(H // B.shape[2], dim=2)
    C = C.repeat_interleave(H // C.shape[2], dim=2)
    pad = (-L) % chunk
    x, a = x * dt[..., None], A * dt  # (B,L,H,P), (B,L,H)
    x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    a = F.pad(a, (0, 0, 0, pad))
    x, B, C = (t.unflatten(1, (-1, chunk)) for t in (x, B, C))  # (B, nC, Q, H, .)
    a = a.unflatten(1, (-1, chunk)).permute(0, 3, 1, 2)  # (B, H, nC, Q)
    a_cum = torch.cumsum(a, dim=-1)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, torch.exp(_segsum(a)), x)
    decay = torch.exp(a_cum[..., -1:] - a_cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay, x)
    if state is None:
        state = torch.zeros_like(states[:, 0])
    states = torch.cat([state[:, None].to(states.dtype), states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states[:, :-1], torch.exp(a_cum))
    y = (y_diag + y_off).flatten(1, 2)[:, :L]
    return y, states[:, -1]


def ssd_step(x, dt, A, B, C, state):
    """One token: x (B,H,P), dt (B,H), B/C (B,G,N), state (B,H,P,N) -> y (B,H,P), state."""
    H = x.shape[1]
    B = B.repeat_interleave(H // B.shape[1], dim=1)
    C = C.repeat_interleave(H // C.shape[1], dim=1)
    state = state * torch.exp(dt * A)[..., None, None]
    state = state + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, C), state


class HybridLMMamba2(nn.Module):
    def __init__(self, cfg, d_model):
        super().__init__()
        self.cfg = cfg
        I, G, N, H = cfg["d_inner"], cfg["n_groups"], cfg["d_state"], cfg["n_heads"]
        self.sizes = [I, I + 2 * G * N, H]
        C = self.sizes[1]
        self.in_proj = nn.Linear(d_model, sum(self.sizes), bias=cfg["bias"])
        self.conv1d = nn.Conv1d(C, C, cfg["d_conv"], groups=C, bias=cfg["conv_bias"])
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(I if cfg["d_has_hdim"] else H))
        self.norm = RMSNorm(I, cfg["norm_eps"]) if cfg["gated_norm"] else None
        self.out_proj = nn.Linear(I, d_model, bias=cfg["bias"])

    def _conv(self, xbc, cache, idx):
        """Causal depthwise conv + SiLU over (B, L, C), continuing from the cached inputs."""
        K = self.cfg["d_conv"]
        prev = cache.conv_states.get(idx) if cache is not None else None
        x = xbc.transpose(1, 2)
        x = F.pad(x, (K - 1, 0)) if prev is None else torch.cat([prev.to(x.dtype), x], dim=-1)
        if cache is not None:
            cache.conv_states[idx] = x[..., x.shape[-1] - (K - 1) :]
        return F.silu(self.conv1d(x)).transpose(1, 2)

    def _dt(self, dt):
        dt = F.softplus(dt.float() + self.dt_bias.float())
        lo, hi = self.cfg["dt_limit"]
        return dt.clamp(min=lo, max=math.inf if hi is None else hi)

    def forward(self, u, cache=None, idx=0, token_mask=None):
        cfg, (b, L, _) = self.cfg, u.shape
        H, P, G, N = cfg["n_heads"], cfg["head_dim"], cfg["n_groups"], cfg["d_state"]
        z, xbc, dt = torch.split(self.in_proj(u), self.sizes, dim=-1)
        mask = None if token_mask is None else token_mask[..., None].to(xbc.dtype)
        xbc = self._conv(xbc if mask is None else xbc * mask, cache, idx)
        xbc = xbc if mask is None else xbc * mask
        x, B, C = torch.split(xbc, [cfg["d_inner"], G * N, G * N], dim=-1)
        A, dt = -torch.exp(self.A_log.float()), self._dt(dt)
        prev = cache.ssm_states.get(idx) if cache is not None else None
        x4, B4, C4 = (
            x.float().view(b, L, H, P),
            B.float().view(b, L, G, N),
            C.float().view(b, L, G, N),
        )
        if prev is not None and L == 1:
            y, state = ssd_step(x4[:, 0], dt[:, 0], A, B4[:, 0], C4[:, 0], prev)
            y = y[:, None]
        else:
            y, state = ssd_scan(x4, dt, A, B4, C4, cfg["chunk_size"], prev)
        if cache is not None:
            cache.ssm_states[idx] = state
        D = self.D.float().view(H, P) if cfg["d_has_hdim"] else self.D.float()[:, None]
        y = (y + x4 * D).to(u.dtype).reshape(b, L, -1)
        return self.out_proj(self._gate(y, z))

    def _gate(self, y, z):
        """Gate y (B, L, I) by silu(z): gated RMSNorm over groups, or a plain product."""
        gate = F.silu(z.float())
        if self.norm is None:
            return (y.float() * gate).to(y.dtype)
        group = self.cfg["d_inner"] // self.cfg["n_groups"]
        if self.cfg["norm_before_gate"]:
            return (rms_norm(y.float(), self.norm.weight, self.norm.eps, group) * gate).to(y.dtype)
        return rms_norm(y.float() * gate, self.norm.weight, self.norm.eps, group).to(y.dtype)


def apply_rope(x, positions, rotary_dim, theta):
    """Rotate the first `rotary_dim` dims of x (B,H,L,E), first half against second half."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim
    )
    freqs = positions.float()[..., None] * inv_freq  # (B, L, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, L, R)
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rot = rot * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()
    return torch.cat([rot.to(x.dtype), rest], dim=-1)


class HybridLMAttention(nn.Module):
    def __init__(self, cfg, d_model):
        super().__init__()
        self.cfg = cfg
        H, K, E, bias = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], cfg["bias"]
        self.q_proj = nn.Linear(d_model, H * E, bias=bias)
        self.k_proj = nn.Linear(d_model, K * E, bias=bias)
        self.v_proj = nn.Linear(d_model, K * E, bias=bias)
        self.o_proj = nn.Linear(H * E, d_model, bias=bias)
        if cfg["qk_norm"]:
            self.q_norm = RMSNorm(E, cfg["qk_norm_eps"])
            self.k_norm = RMSNorm(E, cfg["qk_norm_eps"])

    def _mask(self, L, T, key_mask, device):
        """(B or 1, 1, L, T) boolean: causal, windowed, no padded keys (own position kept)."""
        q = torch.arange(T - L, T, device=device)[:, None]
        k = torch.arange(T, device=device)[None, :]
        allowed = k <= q
        if self.cfg["sliding_window"] is not None:
            allowed = allowed & (q - k < self.cfg["sliding_window"])
        allowed = allowed[None, None]
        if key_mask is not None:
            allowed = (allowed & key_mask[:, None, None, -T:].bool()) | (q == k)[None, None]
        return allowed

    def forward(self, x, positions, cache=None, idx=0, key_mask=None):
        cfg, (b, L, _) = self.cfg, x.shape
        E = cfg["head_dim"]
        q = self.q_proj(x).view(b, L, -1, E)
        k = self.k_proj(x).view(b, L, -1, E)
        v = self.v_proj(x).view(b, L, -1, E).transpose(1, 2)
        if cfg["qk_norm"]:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cfg["rotary_dim"]:
            q = apply_rope(q, positions, cfg["rotary_dim"], cfg["rope_theta"])
            k = apply_rope(k, positions, cfg["rotary_dim"], cfg["rope_theta"])
        if cache is not None:
            k, v = cache.update(k, v, idx)
        rep = cfg["n_heads"] // cfg["n_kv_heads"]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = self._mask(L, k.shape[2], key_mask, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=E**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, -1))


def activation(name, up, gate=None):
    if name == "swiglu":
        return F.silu(gate) * up
    if name == "squared_relu":
        return F.relu(up).square()
    if name == "gelu":
        return F.gelu(up)
    raise ValueError(f"unknown activation {name!r}")


class HybridLMMLP(nn.Module):
    def __init__(self, d_model, hidden, act, bias):
        super().__init__()
        self.act = act
        if act == "swiglu":
            self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x):
        gate = self.gate_proj(x) if self.act == "swiglu" else None
        return self.down_proj(activation(self.act, self.up_proj(x), gate))


class HybridLMRouter(nn.Module):
    def __init__(self, cfg, d_model):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg["n_experts"], d_model))
        if cfg["score_correction_bias"]:
            self.register_buffer("expert_bias", torch.zeros(cfg["n_experts"]))
        else:
            self.expert_bias = None

    def forward(self, x):
        """(T, D) -> weights (T, K), expert ids (T, K); routed in float32."""
        cfg, logits = self.cfg, x.float() @ self.weight.float().t()
        scores = torch.sigmoid(logits) if cfg["router"] == "sigmoid" else logits
        if cfg["router"] == "softmax_topk":
            scores = torch.softmax(logits, dim=-1)
        select = scores if self.expert_bias is None else scores + self.expert_bias.float()
        idx = torch.topk(select, cfg["top_k"], dim=-1).indices
        weights = scores.gather(-1, idx)
        if cfg["router"] == "topk_softmax":
            weights = torch.softmax(weights, dim=-1)
        elif cfg["renormalize"]:
            eps = 1e-20 if cfg["router"] == "sigmoid" else 0.0
            weights = weights / (weights.sum(-1, keepdim=True) + eps)
        return weights * cfg["routed_scaling_factor"], idx


class HybridLMExperts(nn.Module):
    def __init__(self, cfg, d_model):
        super().__init__()
        E, Fh, bias = cfg["n_experts"], cfg["expert_hidden_size"], cfg["bias"]
        self.act = cfg["activation"]
        if self.act == "swiglu":
            self.gate_proj = nn.Parameter(torch.zeros(E, d_model, Fh))
            self.gate_proj_bias = nn.Parameter(torch.zeros(E, Fh)) if bias else None
        self.up_proj = nn.Parameter(torch.zeros(E, d_model, Fh))
        self.down_proj = nn.Parameter(torch.zeros(E, Fh, d_model))
        self.up_proj_bias = nn.Parameter(torch.zeros(E, Fh)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(E, d_model)) if bias else None

    def expert(self, e, x):
        """Expert e on rows x (M, D) -> (M, D)."""

        def proj(name, h):
            out = h @ getattr(self, name)[e]
            b = getattr(self, name + "_bias")
            return out if b is None else out + b[e]

        gate = proj("gate_proj", x) if self.act == "swiglu" else None
        return proj("down_proj", activation(self.act, proj("up_proj", x), gate))


class HybridLMMoE(nn.Module):
    def __init__(self, cfg, d_model):
        super().__init__()
        self.router = HybridLMRouter(cfg, d_model)
        self.experts = HybridLMExperts(cfg, d_model)
        self.shared_experts = None
        if cfg["shared_hidden_size"]:
            self.shared_experts = HybridLMMLP(
                d_model, cfg["shared_hidden_size"], cfg["activation"], cfg["bias"]
            )

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        weights, idx = self.router(x)
        y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for e in idx.unique().tolist():
            token, slot = torch.nonzero(idx == e, as_tuple=True)
            out = self.experts.expert(e, x[token])
            y.index_add_(0, token, out.to(y.dtype) * weights[token, slot, None].to(y.dtype))
        y = y.to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


class HybridLMSublayer(nn.Module):
    def __init__(self, config, symbol):
        super().__init__()
        d = config.hidden_size
        self.symbol = symbol
        self.norm = RMSNorm(d, config.norm_eps)
        if symbol == "M":
            self.mixer = HybridLMMamba2(config.mamba, d)
        elif symbol == "*":
            self.mixer = HybridLMAttention(config.attention, d)
        elif symbol == "-":
            m = config.mlp
            self.mixer = HybridLMMLP(d, m["hidden_size"], m["activation"], m["bias"])
        else:
            self.mixer = HybridLMMoE(config.moe, d)


class HybridLMPreTrainedModel(PreTrainedModel):
    config_class = HybridLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["HybridLMSublayer"]
    _keep_in_fp32_modules_strict = ["expert_bias"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the model makes its own HybridLMCache

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, HybridLMMamba2):
            module.A_log.copy_(torch.log(torch.arange(1, module.A_log.numel() + 1.0)))
            module.dt_bias.fill_(math.log(math.expm1(0.01)))
            module.D.fill_(1.0)
        elif isinstance(module, (HybridLMRouter, HybridLMExperts)):
            for p in module.parameters(recurse=False):
                if p.dim() > 1:
                    p.normal_(0.0, std)
                else:
                    p.zero_()


class HybridLMModel(HybridLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridLMSublayer(config, s) for s in config.pattern)
        self.norm_f = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None):
        h = self.embed(input_ids)
        b, L = input_ids.shape
        seen = cache.seen_tokens if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(seen, seen + L, device=h.device).expand(b, L)
        pad = attention_mask is not None and not bool(attention_mask.all())
        key_mask = attention_mask if pad else None
        token_mask = attention_mask[:, -L:] if pad else None
        n_mamba = n_attn = 0
        for layer in self.layers:
            x = layer.norm(h)
            if layer.symbol == "M":
                h = h + layer.mixer(x, cache, n_mamba, token_mask)
                n_mamba += 1
            elif layer.symbol == "*":
                h = h + layer.mixer(x, position_ids, cache, n_attn, key_mask)
                n_attn += 1
            else:
                h = h + layer.mixer(x)
        if cache is not None:
            cache.seen_tokens += L
        return self.norm_f(h)


class HybridLMForCausalLM(HybridLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = HybridLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is None:
            cache = past_key_values
        if isinstance(cache, Cache) and not isinstance(cache, HybridLMCache):
            if cache.get_seq_length() != 0:
                raise TypeError(
                    "HybridLM needs its own HybridLMCache, got a filled " + type(cache).__name__
                )
            cache = None
        if cache is None and use_cache:
            cache = HybridLMCache()
        h = self.model(input_ids, attention_mask, position_ids, cache)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


__all__ = ["HybridLMCache", "HybridLMForCausalLM", "HybridLMModel", "HybridLMPreTrainedModel"]
