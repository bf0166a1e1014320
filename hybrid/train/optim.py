"""AdamW with two parameter groups: weight decay for weight matrices, none for the rest.

A trainable parameter is *not* decayed when any of these holds (a shared parameter is judged
by every module that holds it, and is not decayed if any of them says so):

- it carries `_no_weight_decay = True` (the generic mechanism; mamba_ssm's convention, which
  `Mamba2Mixer` follows for A_log, D and dt_bias);
- it has fewer than 2 dimensions (norm scales, biases, A_log / D / dt_bias);
- its leaf name is `bias` or ends in `_bias` (also the 2-D per-expert biases of an MoE);
- it belongs to an `nn.Embedding` (so also a tied LM head, which shares the embedding weight),
  or to a module whose class name contains `Norm` (RMSNorm, GatedRMSNorm, LayerNorm, ...).

Everything else is decayed: linear weights, the MoE router and the stacked expert matrices
(E, d, h), an untied LM head, and Mamba's depthwise conv1d weight (C, 1, K), which mamba_ssm and
Megatron-LM also decay. Parameters shared between modules (tied embeddings) appear once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hybrid.recipe.schema import ConfigError
from hybrid.recipe.train_config import OptimizerConfig

log = logging.getLogger(__name__)


def no_weight_decay_reason(name: str, param: nn.Parameter, owner: nn.Module) -> str | None:
    """Why `param` (attribute `name` of module `owner`) is exempt from weight decay, or None."""
    if getattr(param, "_no_weight_decay", False):
        return "_no_weight_decay"
    if param.ndim < 2:
        return "ndim<2"
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf.endswith("_bias"):
        return "bias"
    if isinstance(owner, nn.Embedding):
        return "embedding"
    if "Norm" in type(owner).__name__:
        return "norm"
    return None


def split_parameters(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(decayed, not decayed) trainable parameters of `model` as (name, parameter) pairs, each
    parameter once (under its first name in `model.named_parameters()`), in that order."""
    exempt: set[int] = set()
    for _, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if no_weight_decay_reason(name, param, module) is not None:
                exempt.add(id(param))
    decay, plain = [], []
    for name, param in model.named_parameters():  # deduplicates shared parameters
        if param.requires_grad:
            (plain if id(param) in exempt else decay).append((name, param))
    return decay, plain


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The two AdamW parameter groups: `decay` (weight_decay) then `no_decay` (0)."""
    decay, plain = split_parameters(model)
    return [
        {"name": "decay", "params": [p for _, p in decay], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for _, p in plain], "weight_decay": 0.0},
    ]


def _implementation(cfg: OptimizerConfig, device_type: str) -> dict[str, bool]:
    """AdamW keyword for the update kernel: fused on CUDA (or when asked), else foreach."""
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    if fused:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        if device_type not in _get_fused_kernels_supported_devices():
            raise ConfigError(
                f"fused AdamW is not available on {device_type}; set fused to false or null",
                key="train.optimizer.fused",
            )
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, device_type: str
) -> tuple[torch.optim.AdamW, dict[str, int | str]]:
    """AdamW over `model`'s trainable parameters in two groups (decay, no_decay).

    Returns the optimizer and a summary for logging: `decayed_params` / `undecayed_params`
    (element counts), `decayed_tensors` / `undecayed_tensors`, and `implementation`
    (`fused` or `foreach`).
    """
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    kwargs = _implementation(cfg, device_type)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)
    decay, plain = groups[0]["params"], groups[1]["params"]
    summary: dict[str, int | str] = {
        "decayed_params": sum(p.numel() for p in decay),
        "undecayed_params": sum(p.numel() for p in plain),
        "decayed_tensors": len(decay),
        "undecayed_tensors": len(plain),
        "implementation": "fused" if kwargs.get("fused") else "foreach",
    }
    log.info("AdamW (%s): %s", summary["implementation"], summary)
    return opt, summary
