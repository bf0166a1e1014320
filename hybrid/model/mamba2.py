"""Mamba-2 mixer (SSD), single device, with the same parameter layout as mamba_ssm's `Mamba2`.

Legend: B batch, L length, D d_model, I d_inner (= expand * D), H heads, P head_dim,
G n_groups, N d_state, C conv channels (= I + 2*G*N), K conv width.

in_proj rows: [z (I), x (I), B (G*N), C (G*N), dt (H)]; a depthwise causal conv + SiLU over
[x, B, C]; SSD with A = -exp(A_log), dt = softplus(dt + dt_bias) clamped to dt_limit, skip D;
gated RMSNorm over groups: norm(y * silu(z)); out_proj.

Three ways to run the same parameters: `forward` over a whole sequence (chunked SSD; respects
`ctx.seq_idx` document boundaries), `forward` with `ctx.states` (prefill/continuation: starts from
and returns conv + SSM states), and `step` (one token, the O(1) recurrent form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hybrid import ops
from hybrid.model.context import ForwardContext
from hybrid.model.norm import GatedRMSNorm
from hybrid.model.registry import register_sublayer
from hybrid.recipe.blocks import Mamba2Config


@dataclass
class MambaState:
    """Inference state of one Mamba-2 layer: conv inputs (B,C,K-1) and SSM state (B,H,P,N) fp32."""

    conv: Tensor
    ssm: Tensor


@register_sublayer("M")
class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config, d_model: int):
        super().__init__()
        cfg.validate_for(d_model)
        self.cfg = cfg
        self.layer_idx = -1  # set by the LM
        self.d_inner = cfg.d_inner(d_model)
        self.n_heads = cfg.n_heads(d_model)
        self.conv_dim = cfg.conv_dim(d_model)
        gn = cfg.n_groups * cfg.d_state
        self.split_sizes = [self.d_inner, self.d_inner, gn, gn, self.n_heads]
        in_rows = sum(self.split_sizes)
        self.in_proj = nn.Linear(d_model, in_rows, bias=cfg.bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            cfg.d_conv,
            groups=self.conv_dim,
            padding=cfg.d_conv - 1,
            bias=cfg.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.d_inner if cfg.d_has_hdim else self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = (
            GatedRMSNorm(
                self.d_inner,
                group_size=self.d_inner // cfg.n_groups,
                norm_before_gate=cfg.norm_before_gate,
            )
            if cfg.gated_norm
            else None
        )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=cfg.bias)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        cfg = self.cfg
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.conv1d.reset_parameters()  # PyTorch's default (kaiming-uniform), as mamba_ssm
        dt = torch.exp(
            torch.rand(self.n_heads, device=self.dt_bias.device)
            * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
            + math.log(cfg.dt_min)
        )
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        lo, hi = cfg.a_init_range
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(lo, hi).log())
        nn.init.ones_(self.D)
        if self.norm is not None:
            self.norm.init_weights()

    # -- helpers ---------------------------------------------------------------------------
    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.squeeze(1)  # (C, K)

    def _D(self) -> Tensor:
        return self.D.view(self.n_heads, self.cfg.head_dim) if self.cfg.d_has_hdim else self.D

    def _ssd_kwargs(self) -> dict:
        return dict(
            D=self._D(), dt_bias=self.dt_bias, dt_softplus=True, dt_limit=tuple(self.cfg.dt_limit)
        )

    def _gate_out(self, y_BLI: Tensor, z_BLI: Tensor) -> Tensor:
        if self.norm is not None:
            y_BLI = self.norm(y_BLI, z_BLI)
        return self.out_proj(y_BLI)

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gn = self.cfg.n_groups * self.cfg.d_state
        return torch.split(xbc, [self.d_inner, gn, gn], dim=-1)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, u_BLD: Tensor, ctx: ForwardContext) -> tuple[Tensor, None]:
        cfg = self.cfg
        Bsz, L, _ = u_BLD.shape
        H, P, G, N = self.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        z, xbc, dt_BLH = torch.split(
            self.in_proj(u_BLD), [self.d_inner, self.conv_dim, self.n_heads], dim=-1
        )
        state = ctx.states.get(self.layer_idx) if ctx.states is not None else None
        conv_init = state.conv if state is not None else None
        xbc, conv_final = ops.causal_conv1d(
            xbc,
            self._conv_weight(),
            self.conv1d.bias,
            seq_idx=ctx.seq_idx,
            activation="silu",
            initial_states=conv_init,
            return_final_states=True,
        )
        x, b, c = self._split_xbc(xbc)
        y, ssm_final = ops.ssd(
            x.reshape(Bsz, L, H, P),
            dt_BLH,
            -torch.exp(self.A_log.float()),
            b.reshape(Bsz, L, G, N),
            c.reshape(Bsz, L, G, N),
            chunk_size=cfg.chunk_size,
            z=None if self.norm is not None else z.reshape(Bsz, L, H, P),
            initial_states=state.ssm if state is not None else None,
            seq_idx=ctx.seq_idx,
            return_final_states=True,
            **self._ssd_kwargs(),
        )
        if ctx.states is not None:
            ctx.states[self.layer_idx] = MambaState(conv=conv_final, ssm=ssm_final)
        return self._gate_out(y.reshape(Bsz, L, self.d_inner), z), None

    # -- recurrent form ----------------------------------------------------------------------
    def empty_state(
        self, batch: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MambaState:
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        cfg = self.cfg
        conv = torch.zeros(batch, self.conv_dim, cfg.d_conv - 1, device=device, dtype=dtype)
        ssm = torch.zeros(
            batch,
            self.n_heads,
            cfg.head_dim,
            cfg.d_state,
            device=device,
            dtype=torch.float32 if dtype != torch.float64 else dtype,
        )
        return MambaState(conv=conv, ssm=ssm)

    def step(self, u_BD: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """One token: u (B,D) -> (y (B,D), new state). O(1) in the sequence length."""
        cfg = self.cfg
        Bsz = u_BD.shape[0]
        H, P, G, N = self.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        z, xbc, dt_BH = torch.split(
            self.in_proj(u_BD), [self.d_inner, self.conv_dim, self.n_heads], dim=-1
        )
        xbc, conv = ops.causal_conv1d_step(
            xbc, state.conv, self._conv_weight(), self.conv1d.bias, activation="silu"
        )
        x, b, c = self._split_xbc(xbc)
        y, ssm = ops.ssd_step(
            state.ssm,
            x.reshape(Bsz, H, P),
            dt_BH,
            -torch.exp(self.A_log.float()),
            b.reshape(Bsz, G, N),
            c.reshape(Bsz, G, N),
            z=None if self.norm is not None else z.reshape(Bsz, H, P),
            **self._ssd_kwargs(),
        )
        out = self._gate_out(y.reshape(Bsz, 1, self.d_inner), z.unsqueeze(1)).squeeze(1)
        return out, MambaState(conv=conv, ssm=ssm)


__all__ = ["Mamba2Mixer", "MambaState"]
