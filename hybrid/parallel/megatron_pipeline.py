"""Pipeline parallelism for the single-device HybridLM through megatron-core's schedules.

Legend: B micro-batch size, L sequence length (local shard under sequence parallelism),
D d_model.

`build_stage` wraps the part of the (already tensor-parallel) model that one pipeline stage
runs: the embedding on the first stage, its sublayers, the final norm, LM head and loss on the
last. It keeps the canonical names (`embed`, `layers.7...`, `norm_f`, `lm_head`), so
checkpoints do not depend on the split. `forward_backward` drives
`megatron.core.pipeline_parallel.get_forward_backward_func()` (1F1B; interleaved 1F1B when
there are several model chunks per rank) over our micro-batches: every stage receives the
micro-batch (input_ids on the first, seq_idx everywhere, labels on the last); activations
travel between stages in megatron's (L, B, D) layout (`set_input_tensor`).

Scaling matches `Backend.forward_backward`: the last stage's loss is the summed token
cross-entropy * data_parallel_size / total_tokens, plus its MoE aux losses / n_micro; an MoE
layer on an earlier stage gets its aux-loss gradient (1 / n_micro) through the activation it
sends on (`_AuxLossGrad`, the way megatron's MoEAuxLossAutoScaler does it). Every rank
returns the same (loss_sum, aux_sum, moe stats): the loss broadcast from the last stage, aux
losses summed and MoE stats merged over the pipeline group. megatron-core's p2p communication
and schedules allocate on CUDA, so this runs on GPUs only.

With tied embeddings and PP > 1, the last stage holds its own copy of the embedding matrix as
`lm_head.weight` (also set on the model, so an optimizer built over the model sees it);
`forward_backward` sums the two copies' gradients over megatron's embedding group, so both
stay equal (they start equal: every rank builds the model identically).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hybrid.model.context import ForwardContext
from hybrid.model.lm import IGNORE_INDEX
from hybrid.parallel import shard_spec
from hybrid.parallel.base import merge_moe_stats
from hybrid.parallel.shard_spec import TIED_COPY_OF


@functools.cache
def stage_config_class() -> type:
    """megatron's ModelParallelConfig with the fields its schedules also read (one class)."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    @dataclass
    class StageConfig(ModelParallelConfig):
        """megatron's ModelParallelConfig plus the three fields its schedules read from a
        TransformerConfig."""

        hidden_size: int = 0
        calculate_per_token_loss: bool = True  # our loss is already scaled: no division
        fine_grained_activation_offloading: bool = False

    return StageConfig


def stage_config(
    d_model: int,
    dtype: torch.dtype,
    *,
    virtual_pp: int | None = None,
    sequence_parallel: bool = False,
) -> Any:
    """The config megatron's schedules read (`model.config`), sizes from parallel_state."""
    from megatron.core import parallel_state as ps

    return stage_config_class()(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=virtual_pp,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        hidden_size=d_model,
    )


class _AuxLossGrad(torch.autograd.Function):
    """Identity on `out`; in backward also gives `aux` the gradient `scale` (so an MoE aux loss
    computed on this stage is trained although the loss lives on the last stage)."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


@dataclass
class _Record:
    """One micro-batch's results on a stage."""

    loss_sum: Tensor | None
    aux: Tensor | None
    moe: dict[int, Any]


class PipelineStage(nn.Module):
    """One model chunk of one pipeline rank, under the model's canonical names."""

    def __init__(
        self, model: nn.Module, layer_range: range, first: bool, last: bool, config: Any
    ) -> None:
        super().__init__()
        from megatron.core.enums import ModelType

        self.first, self.last = first, last
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self._owner = (model,)  # not a submodule: the loss_fn is read from it at call time
        if first:
            self.embed = model.embed
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_range})
        if last:
            self.norm_f = model.norm_f
            self.lm_head = model.lm_head
            if model.cfg.tie_embeddings and not first:
                _untie_head(model)
                self.checkpoint_aliases = {"lm_head.weight": "embed.weight"}
        self.input_tensor: Tensor | None = None
        self.scale = 1.0  # (data-parallel size / total tokens), set per step
        self.n_micro = 1
        self.records: list[_Record] = []

    def set_input_tensor(self, tensors: list[Tensor | None] | Tensor | None) -> None:
        """megatron's hook: the activation received from the previous stage, (L, B, D)."""
        self.input_tensor = tensors[0] if isinstance(tensors, list) else tensors

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """(L, B, D) activation for the next stage, or on the last stage the scaled scalar
        loss of this micro-batch."""
        if self.first:
            h_BLD = self.embed(batch["input_ids"])
        else:
            assert self.input_tensor is not None, "a later stage needs its input tensor"
            h_BLD = self.input_tensor.transpose(0, 1)
        ctx = ForwardContext(seq_idx=batch.get("seq_idx"))
        aux_terms, moe = [], {}
        for layer in self.layers.values():
            h_BLD, a = layer(h_BLD, ctx)
            if a is not None:
                aux_terms.append(a.aux_loss)
                moe[layer.mixer.layer_idx] = a
        aux = torch.stack(aux_terms).sum() if aux_terms else None
        if not self.last:
            self.records.append(_Record(None, None if aux is None else aux.detach(), moe))
            out_LBD = h_BLD.transpose(0, 1).contiguous().to(self.config.pipeline_dtype)
            if aux is not None:
                out_LBD = _AuxLossGrad.apply(out_LBD, aux, 1.0 / self.n_micro)
            return out_LBD
        h_BLD = self.norm_f(h_BLD)
        labels = batch["labels"]
        loss_fn = self._owner[0].loss_fn
        ce_sum = self.lm_head(h_BLD.flatten(0, 1), labels=labels.flatten(), loss_fn=loss_fn)
        self.records.append(_Record(ce_sum.detach(), None if aux is None else aux.detach(), moe))
        loss = ce_sum * self.scale
        if aux is not None:
            loss = loss + aux / self.n_micro
        return loss


def _untie_head(model: nn.Module) -> None:
    """Give the last stage its own copy of a tied embedding: marked like the original, never
    decayed (the embedding is not), named after it in canonical state, left out of the gradient
    norm (its gradient is summed with the original's, which counts it)."""
    old = model.lm_head.weight
    new = nn.Parameter(old.detach().clone())
    spec = shard_spec.get(old)
    if spec is not None:
        shard_spec.mark(new, spec)
    new._no_weight_decay = True
    setattr(new, TIED_COPY_OF, "embed.weight")
    model.lm_head.weight = new


def build_stage(
    model: nn.Module,
    layer_range: range,
    first: bool,
    last: bool,
    *,
    config: Any = None,
    vp_stage: int | None = None,
) -> PipelineStage:
    """The module one pipeline rank runs for `layer_range` (a model chunk when interleaved:
    `vp_stage` is its index). `config`: megatron's config for the schedules (default
    `stage_config` from parallel_state and the model). Build it after the tensor-parallel
    plan is applied (the stage runs the model's own, possibly sharded, modules)."""
    if config is None:
        dtype = next(model.parameters()).dtype
        config = stage_config(model.cfg.d_model, dtype)
    stage = PipelineStage(model, layer_range, first, last, config)
    if vp_stage is not None:
        stage.vp_stage = vp_stage
    return stage


def release_other_stages(model: nn.Module, stages: list[PipelineStage]) -> None:
    """Move the parts of `model` that none of this rank's `stages` runs to the meta device and
    freeze them: they keep their names but no memory, and an optimizer built over the model's
    trainable parameters (`hybrid.train.optim`) holds only this rank's."""
    kept = {id(p) for s in stages for p in s.parameters()}
    for module in [model.embed, model.norm_f, model.lm_head, *model.layers]:
        if not any(id(p) in kept for p in module.parameters()):
            module.to("meta").requires_grad_(False)


def rank_chunks(ranges: list[range], pp: int, rank: int) -> list[tuple[range, bool, bool]]:
    """(layers, first, last) of each model chunk of pipeline rank `rank` when the layers are
    split into `len(ranges)` = pp * virtual_pp virtual stages (chunk v holds stage v*pp+rank,
    megatron's interleaved order)."""
    n = len(ranges)
    if n % pp:
        raise ValueError(f"{n} virtual stages do not divide over {pp} pipeline ranks")
    return [
        (ranges[v * pp + rank], v * pp + rank == 0, v * pp + rank == n - 1) for v in range(n // pp)
    ]


def _loss_func(n_tokens: Tensor, output: Tensor) -> tuple:
    # (loss, tokens, logged): with calculate_per_token_loss the schedule leaves `loss` as is
    return output, n_tokens, {}


def _forward_step(data_iterator: Iterator[dict[str, Tensor]], model: PipelineStage) -> tuple:
    batch = next(data_iterator)
    n_tokens = (batch["labels"] != IGNORE_INDEX).sum().to(torch.int)
    return model(batch), partial(_loss_func, n_tokens)


def forward_backward(
    stages: list[PipelineStage],
    batches: list[dict[str, Tensor]],
    *,
    total_tokens: float,
    data_parallel_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    forward_only: bool = False,
) -> tuple[Tensor, Tensor, dict]:
    """Forward and backward of this rank's micro-batches through the pipeline (see the module
    docstring); `stages` are this rank's model chunks in order. Returns (sum of token losses,
    mean aux loss, per-MoE-layer stats) for the whole model, the same on every stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n_micro = len(batches)
    B, L = batches[0]["input_ids"].shape
    for stage in stages:
        stage.scale = data_parallel_size / total_tokens
        stage.n_micro = n_micro
        stage.records = []
    virtual = len(stages) > 1
    pp = ps.get_pipeline_model_parallel_world_size()
    if virtual and stages[0].config.virtual_pipeline_model_parallel_size != len(stages):
        raise ValueError("interleaved stages need a config with virtual_pp = number of chunks")
    if virtual and n_micro % pp:
        raise ValueError(
            f"the interleaved schedule needs a multiple of pp={pp} micro-batches per step, "
            f"got {n_micro}"
        )
    schedule = get_forward_backward_func(pp_size=pp, vp_size=len(stages) if virtual else None)
    with autocast():
        schedule(
            forward_step_func=_forward_step,
            data_iterator=[iter(batches) for _ in stages] if virtual else iter(batches),
            model=stages if virtual else stages[0],
            num_microbatches=n_micro,
            seq_length=L,
            micro_batch_size=B,
            forward_only=forward_only,
        )
    if not forward_only:
        sync_tied_embedding_grads(stages)
    return _gather_results(stages, n_micro)


def local_results(stages: list[PipelineStage], n_micro: int) -> tuple[Tensor, Tensor, dict]:
    """(loss sum, aux mean, MoE stats) of the micro-batches these stages ran (before the
    pipeline group is combined)."""
    device = next(stages[0].parameters()).device
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    moe: dict = {}
    for stage in stages:
        for rec in stage.records:
            if rec.loss_sum is not None:
                loss_sum += rec.loss_sum.float()
            if rec.aux is not None:
                aux_sum += rec.aux.float() / n_micro
            merge_moe_stats(moe, rec.moe, n_micro)
    return loss_sum, aux_sum, moe


def _gather_results(stages: list[PipelineStage], n_micro: int) -> tuple[Tensor, Tensor, dict]:
    from megatron.core import parallel_state as ps

    loss_sum, aux_sum, moe = local_results(stages, n_micro)
    group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return loss_sum, aux_sum, moe
    dist.broadcast(loss_sum, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
    dist.all_reduce(aux_sum, group=group)
    local = {i: {**s, "load": s["load"].cpu()} for i, s in moe.items()}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, local, group=group)
    device = loss_sum.device
    merged = {i: {**s, "load": s["load"].to(device)} for d in everyone for i, s in d.items()}
    return loss_sum, aux_sum, dict(sorted(merged.items()))


def sync_tied_embedding_grads(stages: list[PipelineStage]) -> None:
    """Sum the gradients of a tied embedding's two copies (first stage's `embed.weight`, last
    stage's `lm_head.weight`) over megatron's embedding group (a no-op unless tied and PP > 1)."""
    from megatron.core import parallel_state as ps

    tied = [s for s in stages if (s.first or s.last) and s._owner[0].cfg.tie_embeddings]
    if not tied or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    params = {id(p): p for s in tied for p in _embedding_params(s)}
    if len(params) != 1:  # one rank holds both ends (not on a 1-rank embedding group)
        return
    (p,) = params.values()
    grad = getattr(p, "main_grad", None)
    grad = grad if grad is not None else p.grad
    if grad is None:
        grad = p.grad = torch.zeros_like(p)
    dist.all_reduce(grad, group=ps.get_embedding_group())


def _embedding_params(stage: PipelineStage) -> list[nn.Parameter]:
    out = []
    if stage.first:
        out.append(stage.embed.weight)
    if stage.last:
        out.append(stage.lm_head.weight)
    return out
