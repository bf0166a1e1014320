"""Pipeline stages of a tiny hybrid (Mamba-2, attention, MLP, MoE) against the single-device
model under the trainer's default micro-batch loop (`Backend.forward_backward`'s scaling).

CPU: two stages chained by hand (what megatron's p2p does between ranks), in one process and
over two gloo ranks with megatron's parallel_state (the tied-embedding gradient sum and the
results gathered over the pipeline group): the summed token loss, the mean aux loss, MoE stats
and every gradient equal the full model's (fp32, relative 1e-5), tied and untied embeddings.
GPU (2 processes, nccl): megatron-core's 1F1B schedule at PP=2, and the interleaved schedule at
PP=2 with 2 chunks per rank, same comparison (megatron's p2p and schedules allocate on CUDA).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core")

from hybrid.model.lm import IGNORE_INDEX, build_model  # noqa: E402
from hybrid.parallel.base import merge_moe_stats  # noqa: E402
from hybrid.parallel.megatron_pipeline import (  # noqa: E402
    build_stage,
    local_results,
    rank_chunks,
    stage_config_class,
)
from hybrid.parallel.pipeline_split import split_by_count  # noqa: E402
from hybrid.recipe.blocks import AttentionConfig, Mamba2Config, MLPConfig, MoEConfig  # noqa: E402
from hybrid.recipe.layout import LayoutConfig  # noqa: E402
from hybrid.recipe.model_config import ModelConfig  # noqa: E402

TOL = 1e-5


def tiny(tied: bool, pattern: str = "M*E-M-") -> ModelConfig:
    return ModelConfig(
        d_model=64,
        vocab_size=257,
        tie_embeddings=tied,
        layout=LayoutConfig(pattern=pattern),
        mamba=Mamba2Config(d_state=8, head_dim=16, n_groups=2, chunk_size=16),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        mlp=MLPConfig(hidden_size=128),
        moe=MoEConfig(n_experts=4, top_k=2, expert_hidden_size=64, aux_loss_coef=0.1),
    )


def make_batches(n: int, device: torch.device, vocab: int = 257) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 32), generator=g)
        labels = torch.randint(0, vocab, (2, 32), generator=g)
        labels[0, :5] = IGNORE_INDEX
        seq_idx = torch.zeros(2, 32, dtype=torch.int32)
        seq_idx[1, 20:] = 1  # two packed documents in the second row
        out.append({"input_ids": ids, "labels": labels, "seq_idx": seq_idx})
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def reference(model, batches: list[dict]):
    """Backend.forward_backward's loop (data-parallel size 1) on the full model."""
    total = float(sum((b["labels"] != IGNORE_INDEX).sum() for b in batches))
    n = len(batches)
    loss_sum, aux_sum, moe = 0.0, 0.0, {}
    for b in batches:
        out = model(b["input_ids"], labels=b["labels"], seq_idx=b["seq_idx"], return_logits=False)
        n_valid = float((b["labels"] != IGNORE_INDEX).sum())
        loss = out.loss * (n_valid / total) + out.aux_loss / n
        loss.backward()
        loss_sum += float(out.loss.detach()) * n_valid
        aux_sum += float(out.aux_loss.detach()) / n
        merge_moe_stats(moe, out.moe, n)
    return loss_sum, aux_sum, moe, total


def close(a, b) -> bool:
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return bool((a - b).norm() <= TOL * b.norm().clamp(min=1e-12))


def expected_grad(ref_model, name: str, tied: bool):
    if tied and name == "lm_head.weight":  # the last stage's copy of the tied embedding
        name = "embed.weight"
    return dict(ref_model.named_parameters())[name].grad


def check_stage_grads(stages, ref_model, tied: bool, tied_grad_sum=None) -> None:
    for stage in stages:
        for name, p in stage.named_parameters():
            want = expected_grad(ref_model, name, tied)
            got = p.grad
            if tied and name in ("embed.weight", "lm_head.weight") and tied_grad_sum is not None:
                got = tied_grad_sum
            assert got is not None, name
            assert close(got, want), (name, float((got - want).norm()), float(want.norm()))


@pytest.mark.parametrize("tied", [False, True])
def test_two_stages_chained_by_hand_equal_the_full_model(tied):
    torch.manual_seed(0)
    model = build_model(tiny(tied))
    ref_model = copy.deepcopy(model)
    batches = make_batches(3, torch.device("cpu"))
    ref_loss, ref_aux, ref_moe, total = reference(ref_model, batches)

    config = stage_config_class()(pipeline_dtype=torch.float32, hidden_size=64)
    (r0, f0, l0), (r1, f1, l1) = [
        c for rank in (0, 1) for c in rank_chunks(split_by_count(6, 2), 2, rank)
    ]
    stages = [
        build_stage(model, r0, f0, l0, config=config),
        build_stage(model, r1, f1, l1, config=config),
    ]
    assert stages[0].first and not stages[0].last and stages[1].last
    assert {n for s in stages for n, _ in s.named_parameters()} <= set(
        n for n, _ in ref_model.named_parameters()
    ) | {"lm_head.weight"}
    for s in stages:
        s.scale, s.n_micro, s.records = 1.0 / total, len(batches), []
    for b in batches:  # megatron's p2p between the two ranks, in one process
        out = stages[0](b)
        assert out.shape == (32, 2, 64)  # (L, B, D) as megatron sends it
        received = out.detach().requires_grad_()
        stages[1].set_input_tensor([received])
        stages[1](b).backward()
        out.backward(received.grad)
    loss_sum, aux_sum, moe = local_results(stages, len(batches))
    assert close(loss_sum, ref_loss) and close(aux_sum, ref_aux)
    assert moe.keys() == ref_moe.keys()
    for i in moe:
        assert close(moe[i]["load"], ref_moe[i]["load"])
        assert close(moe[i]["entropy"], ref_moe[i]["entropy"])
    tied_sum = None
    if tied:  # what sync_tied_embedding_grads sums over the embedding group
        assert stages[1].lm_head.weight is not stages[0].embed.weight
        assert stages[1].checkpoint_aliases == {"lm_head.weight": "embed.weight"}
        tied_sum = stages[0].embed.weight.grad + stages[1].lm_head.weight.grad
    check_stage_grads(stages, ref_model, tied, tied_sum)


def hand_pp_worker(rank: int, store: str, tied: bool) -> None:
    """Two ranks over gloo with megatron's parallel_state (PP=2): activations and their
    gradients sent by hand one micro-batch at a time (megatron's p2p needs CUDA), then the real
    cross-stage parts: the tied-embedding gradient sum and the results gathered on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hybrid.parallel.megatron_pipeline import (
        _gather_results,
        stage_config,
        sync_tied_embedding_grads,
    )

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ps.initialize_model_parallel(1, 2)
    torch.manual_seed(0)
    model = build_model(tiny(tied))
    ref_model = copy.deepcopy(model)
    batches = make_batches(3, torch.device("cpu"))
    ref_loss, ref_aux, ref_moe, total = reference(ref_model, batches)
    layers = split_by_count(6, 2)[rank]
    stage = build_stage(model, layers, rank == 0, rank == 1, config=stage_config(64, torch.float32))
    stage.scale, stage.n_micro, stage.records = 1.0 / total, len(batches), []
    for b in batches:
        if rank == 0:
            out = stage(b)
            dist.send(out.detach(), 1)
            grad = torch.empty_like(out)
            dist.recv(grad, 1)
            out.backward(grad)
        else:
            received = torch.empty(32, 2, 64)
            dist.recv(received, 0)
            received.requires_grad_()
            stage.set_input_tensor([received])
            stage(b).backward()
            dist.send(received.grad, 0)
    sync_tied_embedding_grads([stage])
    loss_sum, aux_sum, moe = _gather_results([stage], len(batches))
    assert close(loss_sum, ref_loss) and close(aux_sum, ref_aux), (rank, float(loss_sum))
    assert moe.keys() == ref_moe.keys()
    for i in moe:
        assert close(moe[i]["load"], ref_moe[i]["load"])
    check_stage_grads([stage], ref_model, tied)
    check_canonical_state_after_a_step(model, stage, ref_model, rank)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def check_canonical_state_after_a_step(model, stage, ref_model, rank: int) -> None:
    """One clipped AdamW step on both sides; the stages' gradient norm (a tied embedding counted
    once), canonical model and optimizer state gathered to rank 0, and a canonical optimizer
    state loaded back into the stages all equal the single-device optimizer's."""
    from hybrid.parallel import megatron_state
    from hybrid.parallel.megatron_pipeline import release_other_stages
    from hybrid.recipe.train_config import OptimizerConfig
    from hybrid.train.optim import build_optimizer

    cfg = OptimizerConfig(lr=1e-2, grad_clip=0.5)
    release_other_stages(model, [stage])
    opt, _ = build_optimizer(model, cfg, "cpu")
    ref_opt, _ = build_optimizer(ref_model, cfg, "cpu")
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
    norm = megatron_state.clip_grads([p for p in stage.parameters()], 0.5)
    assert close(norm, ref_norm), (norm, float(ref_norm))
    opt.step()
    ref_opt.step()
    want = ref_opt.state_dict()
    got = megatron_state.canonical_optimizer_state(model, opt)
    weights = megatron_state.canonical_model_state(model)
    if rank == 0:
        assert got["param_groups"] == want["param_groups"]
        assert got["state"].keys() == want["state"].keys()
        for idx, slot in want["state"].items():
            for key, value in slot.items():
                assert close(got["state"][idx][key], value), (idx, key)
        ref_weights = ref_model.state_dict()
        assert weights.keys() == ref_weights.keys()
        for key, value in ref_weights.items():
            assert close(weights[key], value), key
    fresh, _ = build_optimizer(model, cfg, "cpu")
    megatron_state.load_canonical_optimizer_state(model, fresh, want)
    ref_state = {n: ref_opt.state[p] for n, p in ref_model.named_parameters()}
    names = megatron_state.canonical_param_names(model)
    for p in stage.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], ref_state[names[id(p)]][key]), key


@pytest.mark.parametrize("tied", [False, True])
def test_two_ranks_gather_results_and_sum_tied_grads(tmp_path, tied):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(hand_pp_worker, args=(str(tmp_path / "store"), tied), nprocs=2, join=True)


def test_rank_chunks_interleaved_order():
    ranges = split_by_count(8, 4)  # pp=2, virtual_pp=2
    assert rank_chunks(ranges, 2, 0) == [(range(0, 2), True, False), (range(4, 6), False, False)]
    assert rank_chunks(ranges, 2, 1) == [(range(2, 4), False, False), (range(6, 8), False, True)]
    with pytest.raises(ValueError, match="do not divide"):
        rank_chunks(split_by_count(8, 3), 2, 0)


# -- GPU: megatron-core's schedules over 2 ranks ------------------------------------------------


def pp_worker(rank: int, world: int, store: str, tied: bool, virtual: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hybrid.parallel.megatron_pipeline import forward_backward, stage_config

    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    vpp = virtual if virtual > 1 else None
    ps.initialize_model_parallel(1, 2, virtual_pipeline_model_parallel_size=vpp)
    device = torch.device("cuda", rank)
    pattern = "M*E-M-" if virtual == 1 else "M*-EM-*E"
    torch.manual_seed(0)
    model = build_model(tiny(tied, pattern), device=device)
    ref_model = copy.deepcopy(model)
    batches = make_batches(4, device)
    ref_loss, ref_aux, ref_moe, total = reference(ref_model, batches)

    config = stage_config(64, torch.float32, virtual_pp=vpp)
    ranges = split_by_count(len(model.layers), 2 * virtual)
    stages = [
        build_stage(model, r, first, last, config=config, vp_stage=v if vpp else None)
        for v, (r, first, last) in enumerate(rank_chunks(ranges, 2, rank))
    ]
    loss_sum, aux_sum, moe = forward_backward(
        stages, batches, total_tokens=total, data_parallel_size=1
    )
    loads = {i: float((moe[i]["load"] - ref_moe[i]["load"]).abs().max()) for i in moe}
    why = (float(loss_sum), ref_loss, float(aux_sum), ref_aux, "load diffs", loads)
    assert close(loss_sum, ref_loss) and close(aux_sum, ref_aux), why
    assert moe.keys() == ref_moe.keys()
    for i in moe:
        assert close(moe[i]["load"], ref_moe[i]["load"])
    check_stage_grads(stages, ref_model, tied)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize(("tied", "virtual"), [(False, 1), (True, 1), (False, 2)])
def test_megatron_schedule_pp2_equals_single_device(tmp_path, tied, virtual):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = (2, str(tmp_path / "store"), tied, virtual)
    mp.spawn(pp_worker, args=args, nprocs=2, join=True)
