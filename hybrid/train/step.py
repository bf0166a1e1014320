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


def _merge_moe(acc: dict, moe: dict, n_micro: int) -> None:
    for idx, stats in moe.items():
        slot = acc.setdefault(idx, {"load": 0.0, "entropy": 0.0, "dropped": 0.0})
        slot["load"] = slot["load"] + stats.expert_load.float() / n_micro
        slot["entropy"] = slot["entropy"] + float(stats.router_entropy) / n_micro
        slot["dropped"] = slot["dropped"] + float(stats.dropped_fraction) / n_micro


def train_step(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    backend: Backend,
    *,
    precision: str,
    grad_clip: float | None,
) -> StepResult:
    """Forward/backward over `batches` (this rank's micro-batches), then the backend's
    optimizer step (clip, update, zero the gradients)."""
    batches = [_to_device(b, backend.device) for b in batches]
    local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    total = backend.all_reduce_sum(torch.tensor(float(local_tokens), device=backend.device))
    total_tokens = max(float(total), 1.0)
    n_micro = len(batches)
    loss_sum = torch.zeros((), device=backend.device)
    aux_sum = torch.zeros((), device=backend.device)
    moe: dict = {}
    for i, batch in enumerate(batches):
        with backend.no_sync(model, last_micro_step=i == n_micro - 1), backend.autocast(precision):
            out = model(
                batch["input_ids"],
                labels=batch["labels"],
                seq_idx=batch.get("seq_idx"),
                return_logits=False,
            )
            n_valid = float((batch["labels"] != IGNORE_INDEX).sum())
            # scale so the summed gradient is the global token mean (DDP averages over ranks)
            loss = out.loss * (n_valid * backend.world_size / total_tokens)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss / n_micro
                aux_sum += out.aux_loss.detach() / n_micro
                _merge_moe(moe, out.moe, n_micro)
            backend.backward(model, loss)
        loss_sum += out.loss.detach() * n_valid
    grad_norm = backend.optimizer_step(model, optimizer, grad_clip)
    global_loss = backend.all_reduce_sum(loss_sum) / total_tokens
    aux = backend.all_reduce_sum(aux_sum) / backend.world_size
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
        load = backend.all_reduce_sum(load) / backend.world_size
        mixer.update_expert_bias(load, mixer.cfg.bias_update_rate)
