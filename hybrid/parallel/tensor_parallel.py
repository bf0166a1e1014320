"""The tensor- and sequence-parallel plan: shard the single-device model in place over a TP group.

Every rank builds the full model with the same seed; `apply_tensor_parallel` then replaces each
weight by this rank's piece (`shard_spec.shard`) and marks it (`shard_spec.mark`, group "tp"),
keeping every parameter's name. Communication uses megatron-core's pieces:
`tensor_parallel.mappings` (copy / reduce / gather / scatter with their autograd duals),
`VocabParallelEmbedding` and `vocab_parallel_cross_entropy`.

    embed      VocabParallelEmbedding (rows by vocab; tied heads share it)
    attention  q by heads, k/v by kv heads (GQA: kv heads % tp == 0), o row-parallel;
               QK-norm weights replicated (their gradient is summed over TP)
    Mamba-2    in_proj by heads and groups (sections z, x, B, C, dt), conv channels
               (x, B, C), dt_bias / A_log / D by heads, gated norm by groups, out_proj
               row-parallel (n_groups % tp == 0, so no norm group spans ranks)
    MLP        gate/up column-parallel, down row-parallel
    MoE        router replicated (every TP rank routes the same tokens); each expert's
               hidden size split over TP (expert tensor parallelism, megatron's
               expert_tensor_parallel_size = tp): gate/up by columns, down by rows, the
               partial outputs summed over TP before the down bias; shared experts as an MLP.
               Experts split over ranks by expert parallelism come first (expert_dispatch):
               their weights carry both marks, experts over "ep", then hidden over "tp"
    head       vocab-sharded weight; `model.loss_fn` becomes the vocab-parallel CE

Megatron's own `ColumnParallelLinear` / `RowParallelLinear` are not used: they work on
(S, B, H) tensors, return (output, bias) pairs and put one collective per linear, while our
single-device mixers work on (B, L, D) and call their linears as functions. Instead a TP mixer
enters the TP region once (a forward pre-hook: copy, or the sequence all-gather under sequence
parallel), its column-parallel linears are plain `nn.Linear`s holding their shard, and its
row-parallel output projection (`RowParallelLinear` below) leaves it (all-reduce, or the
sequence reduce-scatter).

Sequence parallel (SP): the residual stream between sublayers is split along L over the TP
group, (B, L/tp, D). Megatron's sequence mappings work on dim 0, so they run on (L, B, D)
views. Norm weights, row-parallel biases and the QK-norms then see only their rank's tokens:
their parameters are flagged `tp_partial_grad` and the backend sums their gradients over TP.

Legend: B batch, L length (L/tp local under SP), D d_model, V padded vocabulary, N tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel as mtp
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import mappings
from torch import Tensor, nn

from hybrid.model.attention import Attention
from hybrid.model.lm import IGNORE_INDEX, HybridLM, LMHead
from hybrid.model.mamba2 import Mamba2Mixer
from hybrid.model.mlp import MLP, apply_activation
from hybrid.model.moe import GroupedExperts, MoE
from hybrid.ops.moe import grouped_mm
from hybrid.parallel import shard_spec
from hybrid.parallel.expert_dispatch import ExpertDispatch
from hybrid.parallel.shard_spec import Shard
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError

PARTIAL_GRAD = "tp_partial_grad"  # parameter attribute: its gradient is summed over TP


@dataclasses.dataclass(frozen=True)
class TPContext:
    group: dist.ProcessGroup
    sequence_parallel: bool

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)


# -- checks -------------------------------------------------------------------------------------
def validate_tp(cfg: ModelConfig, tp: int) -> None:
    """ConfigError (key parallel.tp) unless every TP-split dimension of the model divides."""
    symbols = {spec.symbol for spec in cfg.layers()}
    needs: list[tuple[int, str]] = [(cfg.padded_vocab_size, "model padded vocabulary")]
    if "*" in symbols:
        att = cfg.attention
        needs += [(att.n_heads, "model.attention.n_heads"), (att.kv_heads(), "attention kv heads")]
    if "M" in symbols:
        m = cfg.mamba
        needs += [(m.n_heads(cfg.d_model), "Mamba heads"), (m.n_groups, "model.mamba.n_groups")]
    if "-" in symbols:
        needs.append((cfg.mlp.resolved_hidden(cfg.d_model), "model.mlp hidden size"))
    if "E" in symbols:
        needs.append((cfg.moe.expert_hidden(cfg.d_model), "MoE expert hidden size"))
        if cfg.moe.n_shared_experts:
            needs.append((cfg.moe.shared_hidden(cfg.d_model), "MoE shared-expert hidden size"))
    for size, what in needs:
        if size % tp:
            raise ConfigError(
                f"{what} ({size}) is not divisible by parallel.tp={tp}", key="parallel.tp"
            )


# -- sharding helpers ---------------------------------------------------------------------------
def _shard_param(module: nn.Module, name: str, spec: Shard, tp: TPContext) -> None:
    full = getattr(module, name)
    if full is None:
        return
    local = nn.Parameter(shard_spec.shard(full.detach(), spec, tp.rank, tp.size))
    local.requires_grad_(full.requires_grad)
    for attr, value in vars(full).items():  # keep marks such as _no_weight_decay
        setattr(local, attr, value)
    # an expert-parallel shard split again over TP carries both marks
    setattr(module, name, shard_spec.mark(local, shard_spec.nest(shard_spec.get(full), spec)))


def _flag_partial(module: nn.Module | None) -> None:
    for p in module.parameters() if module is not None else ():
        setattr(p, PARTIAL_GRAD, True)


def _column(linear: nn.Linear, tp: TPContext, sections: tuple[int, ...] | None = None) -> None:
    """Split the output features of `linear` (in place)."""
    spec = Shard(dim=0, sections=sections)
    _shard_param(linear, "weight", spec, tp)
    _shard_param(linear, "bias", spec, tp)
    linear.out_features = linear.weight.shape[0]


class RowParallelLinear(nn.Linear):
    """y = reduce(x_local @ W_local^T) + b: input features split over TP, the partial outputs
    summed (all-reduce; under SP a reduce-scatter along L); the bias (replicated) added after.
    x (B, L, F/tp) -> (B, L, D), or (B, L/tp, D) under SP."""

    tp_group: dist.ProcessGroup
    sequence_parallel: bool

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y_LBD = mappings.reduce_scatter_to_sequence_parallel_region(
                y.transpose(0, 1), group=self.tp_group
            )
            y = y_LBD.transpose(0, 1)
        else:
            y = mappings.reduce_from_tensor_model_parallel_region(y, group=self.tp_group)
        return y if self.bias is None else y + self.bias


def _row(linear: nn.Linear, tp: TPContext) -> None:
    """Turn `linear` into a RowParallelLinear holding its input-feature shard (in place)."""
    _shard_param(linear, "weight", Shard(dim=1), tp)
    linear.in_features = linear.weight.shape[1]
    linear.__class__ = RowParallelLinear
    linear.tp_group, linear.sequence_parallel = tp.group, tp.sequence_parallel
    if tp.sequence_parallel:
        _flag_partial_bias(linear)


def _flag_partial_bias(linear: nn.Linear) -> None:
    if linear.bias is not None:
        setattr(linear.bias, PARTIAL_GRAD, True)


# -- entering and leaving the TP region (forward hooks keep parameter names) --------------------
def _seq_gather(x_BLD: Tensor, tp: TPContext, tp_output_grad: bool = True) -> Tensor:
    x_LBD = mappings.gather_from_sequence_parallel_region(
        x_BLD.transpose(0, 1), tensor_parallel_output_grad=tp_output_grad, group=tp.group
    )
    return x_LBD.transpose(0, 1)


def _seq_scatter(x_BLD: Tensor, tp: TPContext) -> Tensor:
    x_LBD = mappings.scatter_to_sequence_parallel_region(x_BLD.transpose(0, 1), group=tp.group)
    return x_LBD.transpose(0, 1)


def _enter_hook(tp: TPContext) -> Callable:
    """Pre-hook of a TP-split mixer: its input enters the TP region (gradients summed)."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        if tp.sequence_parallel:
            x = _seq_gather(x, tp)
        else:
            x = mappings.copy_to_tensor_model_parallel_region(x, group=tp.group)
        return (x, *rest)

    return hook


def _replicated_hooks(module: nn.Module, tp: TPContext) -> None:
    """Under SP, the MoE (its router replicated over TP) runs on the whole sequence: gather its
    input (the gradient is split back, as every rank computes the same) and keep this rank's
    output part."""

    def pre(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        return (_seq_gather(x, tp, tp_output_grad=False), *rest)

    def post(module: nn.Module, args: tuple, out: tuple) -> tuple:
        y, *rest = out
        return (_seq_scatter(y, tp), *rest)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


# -- per sublayer kind --------------------------------------------------------------------------
def shard_attention(att: Attention, tp: TPContext) -> None:
    for lin in (att.q_proj, att.k_proj, att.v_proj):
        _column(lin, tp)
    _row(att.o_proj, tp)
    att.n_heads //= tp.size
    att.n_kv //= tp.size
    _flag_partial(att.q_norm)  # each rank normalises only its heads with the shared weight
    _flag_partial(att.k_norm)


def shard_mamba(mixer: Mamba2Mixer, tp: TPContext) -> None:
    world, cfg = tp.size, mixer.cfg
    gn = cfg.n_groups * cfg.d_state
    I, H = mixer.d_inner, mixer.n_heads  # noqa: E741
    _column(mixer.in_proj, tp, sections=(I, I, gn, gn, H))
    conv_spec = Shard(dim=0, sections=(I, gn, gn))
    _shard_param(mixer.conv1d, "weight", conv_spec, tp)
    _shard_param(mixer.conv1d, "bias", conv_spec, tp)
    channels = mixer.conv1d.weight.shape[0]
    mixer.conv1d.in_channels = mixer.conv1d.out_channels = mixer.conv1d.groups = channels
    for name in ("dt_bias", "A_log", "D"):
        _shard_param(mixer, name, Shard(dim=0), tp)
    if mixer.norm is not None:
        _shard_param(mixer.norm, "weight", Shard(dim=0), tp)  # whole groups: n_groups % tp == 0
    _row(mixer.out_proj, tp)
    mixer.cfg = dataclasses.replace(cfg, n_groups=cfg.n_groups // world)
    mixer.d_inner, mixer.n_heads, mixer.conv_dim = I // world, H // world, channels
    mixer.split_sizes = [s // world for s in mixer.split_sizes]


def shard_mlp(mlp: MLP, tp: TPContext) -> None:
    for lin in (mlp.gate_proj, mlp.up_proj):
        if lin is not None:
            _column(lin, tp)
    _row(mlp.down_proj, tp)


def _tp_expert_ffn(
    experts: GroupedExperts, x_MD: Tensor, counts_E: Tensor, expert_M: Tensor | None
) -> Tensor:
    """The expert MLPs with this rank's slice of every expert's hidden size: the rows enter the
    TP region (their gradient is summed over TP), the partial down projections are summed over
    TP, then the (replicated) down bias is added once."""
    group = experts.tp_group
    x_MD = mappings.copy_to_tensor_model_parallel_region(x_MD, group=group)
    up_MF = experts._proj(x_MD, experts.up_proj, experts.up_proj_bias, counts_E, expert_M)
    gate_MF = None
    if experts.gate_proj is not None:
        gate_MF = experts._proj(x_MD, experts.gate_proj, experts.gate_proj_bias, counts_E, expert_M)
    h_MF = apply_activation(experts.activation, up_MF, gate_MF)
    y_MD = mappings.reduce_from_tensor_model_parallel_region(
        grouped_mm(h_MF, experts.down_proj, counts_E), group=group
    )
    return y_MD if experts.down_proj_bias is None else y_MD + experts.down_proj_bias[expert_M]


class TensorParallelExperts(GroupedExperts):
    """`GroupedExperts` holding its TP slice of each expert's hidden size."""

    tp_group: dist.ProcessGroup
    ffn = _tp_expert_ffn


class TensorParallelExpertDispatch(ExpertDispatch):
    """This rank's expert-parallel experts (`ExpertDispatch`), each split over TP as well."""

    tp_group: dist.ProcessGroup
    ffn = _tp_expert_ffn


def shard_moe(moe: MoE, tp: TPContext) -> None:
    experts = moe.experts
    for name in ("gate_proj", "up_proj"):  # (E, D, F)
        _shard_param(experts, name, Shard(dim=2), tp)
    for name in ("gate_proj_bias", "up_proj_bias"):  # (E, F)
        _shard_param(experts, name, Shard(dim=1), tp)
    _shard_param(experts, "down_proj", Shard(dim=1), tp)  # (E, F, D); its bias stays whole
    dispatched = isinstance(experts, ExpertDispatch)
    experts.__class__ = TensorParallelExpertDispatch if dispatched else TensorParallelExperts
    experts.tp_group = tp.group
    if moe.shared_experts is not None:
        # inside the MoE every TP rank holds the whole sequence (see _replicated_hooks)
        whole = TPContext(group=tp.group, sequence_parallel=False)
        shard_mlp(moe.shared_experts, whole)
        moe.shared_experts.register_forward_pre_hook(_enter_hook(whole))


SHARDERS: dict[type, Callable[[nn.Module, TPContext], None]] = {
    Attention: shard_attention,
    Mamba2Mixer: shard_mamba,
    MLP: shard_mlp,
}


# -- embedding, head and loss -------------------------------------------------------------------
class _GatherVocab(torch.autograd.Function):
    """Logits (..., V/tp) of each TP rank -> (..., V); backward keeps this rank's slice. (Megatron's
    `gather_from_tensor_model_parallel_region` allocates on CUDA only.)"""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(world, dim=-1)[rank].contiguous(), None


class VocabParallelLMHead(LMHead):
    """LM head holding V/tp rows. Without labels: full logits (gathered over TP); with labels:
    `loss_fn(h, local weight, labels)` (the vocab-parallel CE)."""

    tp_group: dist.ProcessGroup

    def forward(self, h: Tensor, labels: Tensor | None = None, loss_fn: Callable | None = None):
        if labels is None:
            return _GatherVocab.apply(F.linear(h, self.weight), self.tp_group)
        assert loss_fn is not None, "labels need a loss_fn"
        return loss_fn(h, self.weight, labels)


# At most this many fp32 logits per chunk of the vocab-parallel loss (2^27 = 512 MiB).
_CHUNK_ELEMENTS = 1 << 27


def _chunk_loss(h_TD: Tensor, w_VD: Tensor, labels_T: Tensor) -> Tensor:
    logits_TV = (h_TD @ w_VD.t()).float()
    valid_T = labels_T != IGNORE_INDEX
    loss_T = mtp.vocab_parallel_cross_entropy(logits_TV, torch.where(valid_T, labels_T, 0))
    return (loss_T * valid_T).sum()


def vocab_parallel_loss(h_ND: Tensor, weight_VD: Tensor, labels_N: Tensor) -> Tensor:
    """Summed token CE (fp32) with the vocabulary split over the TP group: h (N, D) full on
    every TP rank, weight (V/tp, D) this rank's rows, labels (N,) (IGNORE_INDEX = no loss).
    Tokens are taken in chunks (recomputed in backward) so the fp32 logits stay bounded."""
    chunk = max(1, _CHUNK_ELEMENTS // max(weight_VD.shape[0], 1))
    if h_ND.shape[0] <= chunk or not torch.is_grad_enabled():
        return _chunk_loss(h_ND, weight_VD, labels_N)
    total = h_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, h_ND.shape[0], chunk):
        part = slice(start, start + chunk)
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_loss, h_ND[part], weight_VD, labels_N[part], use_reentrant=False
        )
    return total


def _shard_embedding(model: HybridLM, tp: TPContext) -> None:
    full = model.embed.weight
    V, D = full.shape
    config = ModelParallelConfig(
        tensor_model_parallel_size=tp.size,
        sequence_parallel=tp.sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=full.dtype,
    )
    embed = mtp.VocabParallelEmbedding(
        V,
        D,
        init_method=nn.init.zeros_,
        reduce_scatter_embeddings=tp.sequence_parallel,
        config=config,
        tp_group=tp.group,
    )
    embed.weight = full  # replaced by its shard next
    _shard_param(embed, "weight", Shard(dim=0), tp)
    embed.weight._no_weight_decay = True  # as an nn.Embedding's (hybrid.train.optim)
    if tp.sequence_parallel:  # megatron returns (L/tp, B, D)
        embed.register_forward_hook(lambda m, args, out: out.transpose(0, 1))
    model.embed = embed


def _shard_head(model: HybridLM, tp: TPContext) -> None:
    head = model.lm_head
    if model.cfg.tie_embeddings:
        head.weight = model.embed.weight
    else:
        _shard_param(head, "weight", Shard(dim=0), tp)
    head.out_features = head.weight.shape[0]
    head.__class__ = VocabParallelLMHead
    head.tp_group = tp.group

    def enter_head(module: nn.Module, args: tuple, h: Tensor) -> Tensor:
        if tp.sequence_parallel:
            return _seq_gather(h, tp)
        return mappings.copy_to_tensor_model_parallel_region(h, group=tp.group)

    model.norm_f.register_forward_hook(enter_head)
    model.loss_fn = vocab_parallel_loss


def apply_tensor_parallel(
    model: HybridLM, group: dist.ProcessGroup, *, sequence_parallel: bool = False
) -> None:
    """Shard `model` in place over `group` (see the module docstring). Every rank must hold the
    same full weights before the call."""
    tp = TPContext(group=group, sequence_parallel=sequence_parallel)
    validate_tp(model.cfg, tp.size)
    _shard_embedding(model, tp)
    for layer in model.layers:
        mixer = layer.mixer
        sharder = SHARDERS.get(type(mixer))
        if sharder is not None:
            sharder(mixer, tp)
            mixer.register_forward_pre_hook(_enter_hook(tp))
        elif isinstance(mixer, MoE):
            shard_moe(mixer, tp)
            if sequence_parallel:
                _replicated_hooks(mixer, tp)
        else:
            raise ConfigError(
                f"no tensor-parallel plan for layer kind {layer.symbol!r}", key="parallel.tp"
            )
        if sequence_parallel:
            _flag_partial(layer.norm)
    if sequence_parallel:
        _flag_partial(model.norm_f)
    _shard_head(model, tp)


def partial_grad_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters whose gradients are partial per TP rank (sum them over TP)."""
    return [p for p in model.parameters() if getattr(p, PARTIAL_GRAD, False)]
