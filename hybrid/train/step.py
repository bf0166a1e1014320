"""One optimizer step: micro-batches with gradient accumulation, exact global-batch token mean.

The loss of a step is the mean next-token cross-entropy over every label token of the global
batch (all micro-batches on all ranks), so accumulation and data parallelism give the same
number as one big batch. MoE aux losses are averaged over micro-batches and added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hybrid.model.lm import IGNORE_INDEX
from hybrid.parallel.base import Backend


@dataclass
class StepResult:
    loss: float
    aux_loss: float
    grad_norm: float
    tokens: int
    moe: dict[int, dict[str, Tensor]] = field(default_factory=dict)


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    backend: Backend,
    *,
    precision: str,
    grad_clip: float | None,
) -> StepResult:
    """Forward/backward over `batches` (this rank's micro-batches, through the backend's
    `forward_backward`: a plain loop, or a pipeline schedule), then the backend's optimizer
    step (clip, update, zero the gradients)."""
    batches = [_to_device(b, backend.device) for b in batches]
    local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    total = backend.all_reduce_sum(torch.tensor(float(local_tokens), device=backend.device))
    total_tokens = max(float(total), 1.0)
    loss_sum, aux_sum, moe = backend.forward_backward(
        model, batches, precision=precision, total_tokens=total_tokens
    )
    grad_norm = backend.optimizer_step(model, optimizer, grad_clip)
    global_loss = backend.all_reduce_sum(loss_sum) / total_tokens
    aux = backend.all_reduce_sum(aux_sum) / backend.data_parallel_size
    return StepResult(
        loss=float(global_loss),
        aux_loss=float(aux),
        grad_norm=grad_norm,
        tokens=int(total_tokens),
        moe=moe,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[dict[str, Tensor]], backend: Backend, precision: str
) -> float:
    """Mean token cross-entropy over the validation batches (all ranks)."""
    model.eval()
    loss_sum = torch.zeros((), device=backend.device, dtype=torch.float64)
    count = torch.zeros((), device=backend.device, dtype=torch.float64)
    try:
        for batch in batches:
            batch = _to_device(batch, backend.device)
            with backend.autocast(precision):
                out = model(
                    batch["input_ids"],
                    labels=batch["labels"],
                    seq_idx=batch.get("seq_idx"),
                    return_logits=False,
                )
            n = (batch["labels"] != IGNORE_INDEX).sum()
            loss_sum += out.loss.double() * n
            count += n
    finally:
        model.train()
    total = backend.all_reduce_sum(torch.stack([loss_sum, count]))
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def update_router_biases(model: nn.Module, moe: dict, backend: Backend) -> None:
    """Aux-loss-free balancing: move each score-correction bias towards balanced expert loads,
    using this step's loads averaged over all ranks (so every replica applies the same update)."""
    for layer in model.layers:
        mixer = layer.mixer
        bias = getattr(getattr(mixer, "router", None), "expert_bias", None)
        if bias is None or layer.mixer.layer_idx not in moe or not mixer.cfg.bias_update_rate:
            continue
        load = moe[mixer.layer_idx]["load"].to(backend.device)
        load = backend.all_reduce_sum(load) / backend.data_parallel_size
        mixer.update_expert_bias(load, mixer.cfg.bias_update_rate)
