"""Activation checkpointing applied from outside the model, per residual sublayer.

- `full`: every sublayer's activations are recomputed in backward (only its input is kept).
- `selective`: every sublayer is recomputed except the outputs of matmuls and attention, which
  are saved (a selective-checkpoint policy as torchtitan's "op" mode): the cheap elementwise work
  (norms, activations, the SSD's exponentials) is recomputed, the expensive GEMMs are not.

Wrapping uses torch's `checkpoint_wrapper`, whose state-dict hooks keep the canonical names.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.linear.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_policy)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap each `model.layers[i]` in place; mode is none | selective | full."""
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ValueError(f"unknown activation_checkpointing mode {mode!r}")
    kwargs = {"use_reentrant": False, "preserve_rng_state": True}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    fn = functools.partial(checkpoint, **kwargs)
    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer, checkpoint_fn=fn)
