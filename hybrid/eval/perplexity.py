"""Validation loss and perplexity of a model over batches of the data layer.

The loss is the mean next-token cross-entropy over every label token of all batches (tokens
whose label is -100 do not count), summed in float64, as `hybrid.train.step.evaluate` computes it
during training; perplexity is exp(loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from hybrid.model.lm import IGNORE_INDEX


@dataclass
class PerplexityResult:
    loss: float
    perplexity: float
    tokens: int
    batches: int


@torch.no_grad()
def perplexity(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Token-mean loss over `batches` ({"input_ids", "labels", "seq_idx"}, each (B,L)) on the
    model's device; `autocast_dtype` (e.g. torch.bfloat16) runs the forward under autocast."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = 0
    amp = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    try:
        for batch in tqdm(batches, desc="validation", unit="batch", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            with amp:
                out = model(
                    batch["input_ids"],
                    labels=batch["labels"],
                    seq_idx=batch.get("seq_idx"),
                    return_logits=False,
                )
            n = (batch["labels"] != IGNORE_INDEX).sum()
            loss_sum += out.loss.double() * n
            count += n
            n_batches += 1
    finally:
        model.train(was_training)
    if count.item() == 0:
        raise ValueError("no label tokens in the validation batches")
    loss = float(loss_sum / count)
    return PerplexityResult(
        loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=int(count), batches=n_batches
    )


__all__ = ["PerplexityResult", "perplexity"]
