"""AdamW with two parameter groups: decay for weight matrices, none for the rest.

No weight decay for: parameters marked `_no_weight_decay = True` (Mamba's A_log, D, dt_bias, as
mamba_ssm), anything with fewer than 2 dims (norm weights, biases), and embeddings (an
nn.Embedding's weight, also when the LM head shares it). Shared parameters appear once.
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid.recipe.train_config import OptimizerConfig


def _no_decay_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.add(id(module.weight))
    for p in model.parameters():
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False):
            ids.add(id(p))
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    no_decay = _no_decay_ids(model)
    decay, plain = [], []
    for p in model.parameters():  # parameters() already deduplicates shared tensors
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, device_type: str
) -> tuple[torch.optim.AdamW, dict[str, int]]:
    """AdamW (fused on CUDA unless `fused: false`); returns it and a count summary."""
    groups = param_groups(model, cfg.weight_decay)
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    kwargs = {"fused": True} if fused else {"foreach": device_type == "cuda"}
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)
    summary = {
        "decayed_params": sum(p.numel() for p in groups[0]["params"]),
        "undecayed_params": sum(p.numel() for p in groups[1]["params"]),
    }
    return opt, summary
