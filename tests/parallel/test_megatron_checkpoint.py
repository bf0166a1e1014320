"""`dist_checkpointing` checkpoints of sharded models (CPU, gloo): saved at 2 ranks, loaded at 2
and at 1 rank, and consolidated by one process, against the canonical single-device tensors.

The parameters of a tiny hybrid (Mamba-2 with 2 groups, GQA attention, MLP, MoE with a shared
expert and a router bias buffer) are sharded as the TP plan shards them (Mamba's in_proj by the
sections z|x|B|C|dt, its conv by x|B|C, heads, row/column splits, vocabulary) and the routed
experts over "ep"; AdamW's moments are sharded like their parameters. Loading must give the
exact canonical tensors (tolerance 0: the same bytes are copied). A second save splits the
model over two "pipeline stages" (each rank holds other layers, tied embeddings on both ends).

megatron-core 0.16.1's torch_dist *save* path calls CUDA twice even for CPU tensors (a
`torch.cuda.synchronize()` after staging tensors to the host, and a one-int failure flag made
on `torch.cuda.current_device()`); neither does any work for CPU tensors, so the CPU test
processes replace just those two functions (`cpu_save_shim`). Loading and consolidation run
unpatched. The `gpu` test runs the same save/load on CUDA with nccl, unpatched.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("megatron.core")

from hybrid.model.lm import build_model  # noqa: E402
from hybrid.parallel.megatron_checkpoint import consolidate, load_sharded, save_sharded  # noqa: E402
from hybrid.parallel.megatron_pipeline import (  # noqa: E402
    build_stage,
    release_other_stages,
    stage_config_class,
)
from hybrid.parallel.shard_spec import Shard, mark, shard  # noqa: E402
from hybrid.recipe.blocks import AttentionConfig, Mamba2Config, MLPConfig, MoEConfig  # noqa: E402
from hybrid.recipe.layout import LayoutConfig  # noqa: E402
from hybrid.recipe.model_config import ModelConfig  # noqa: E402


def tiny(tied: bool = False) -> ModelConfig:
    return ModelConfig(
        d_model=64,
        vocab_size=257,
        tie_embeddings=tied,
        layout=LayoutConfig(pattern="M*-E"),
        mamba=Mamba2Config(d_state=8, head_dim=16, n_groups=2, chunk_size=16),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        mlp=MLPConfig(hidden_size=128),
        moe=MoEConfig(
            n_experts=4, top_k=2, expert_hidden_size=64, n_shared_experts=1, router="sigmoid"
        ),
    )


def tp_plan(cfg: ModelConfig) -> dict[str, Shard]:
    """Parameter-name suffix -> Shard, as the tensor-parallel plan splits the model."""
    d_inner = cfg.mamba.d_inner(cfg.d_model)
    gn = cfg.mamba.n_groups * cfg.mamba.d_state
    heads = cfg.mamba.n_heads(cfg.d_model)
    col, row, ep = Shard(0), Shard(1), Shard(0, group="ep")
    return {
        "embed.weight": col,
        "lm_head.weight": col,
        "mixer.in_proj.weight": Shard(0, (d_inner, d_inner, gn, gn, heads)),
        "mixer.conv1d.weight": Shard(0, (d_inner, gn, gn)),
        "mixer.conv1d.bias": Shard(0, (d_inner, gn, gn)),
        "mixer.dt_bias": col,
        "mixer.A_log": col,
        "mixer.D": col,
        "mixer.norm.weight": col,
        "mixer.out_proj.weight": row,
        "q_proj.weight": col,
        "k_proj.weight": col,
        "v_proj.weight": col,
        "o_proj.weight": row,
        "mixer.gate_proj.weight": col,
        "mixer.up_proj.weight": col,
        "mixer.down_proj.weight": row,
        "shared_experts.gate_proj.weight": col,
        "shared_experts.up_proj.weight": col,
        "shared_experts.down_proj.weight": row,
        "experts.gate_proj": ep,
        "experts.up_proj": ep,
        "experts.down_proj": ep,
    }


def spec_of(name: str, plan: dict[str, Shard]) -> Shard | None:
    hits = [s for suffix, s in plan.items() if name.endswith(suffix)]
    assert len(hits) <= 1, name
    return hits[0] if hits else None


def trained(cfg: ModelConfig, stage=None):
    """The canonical model and an AdamW over its trainable parameters that has stepped twice
    with gradients seeded by canonical name; `stage(model)` (a pipeline split) runs before the
    optimizer is built, as in the trainer."""
    torch.manual_seed(0)
    model = build_model(cfg, device=torch.get_default_device())
    model.layers[3].mixer.router.expert_bias.copy_(torch.randn(4))
    result = stage(model) if stage is not None else None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    for step in range(2):
        for name, p in named:
            if cfg.tie_embeddings and name == "lm_head.weight":
                name = "embed.weight"  # a last stage's copy of the tied embedding
            g = torch.Generator(p.device).manual_seed(zlib.crc32(name.encode()) + step)
            p.grad = torch.randn(p.shape, generator=g, device=p.device)
        opt.step()
    return (model, opt) if stage is None else (model, opt, result)


def shard_in_place(model, opt, cfg: ModelConfig, rank: int, world: int) -> None:
    plan = tp_plan(cfg)
    for name, p in model.named_parameters():
        spec = spec_of(name, plan)
        if spec is None:
            continue
        p.data = shard(p.data, spec, rank, world)
        mark(p, spec)
        for key in ("exp_avg", "exp_avg_sq"):
            if p in opt.state:
                opt.state[p][key] = shard(opt.state[p][key], spec, rank, world)


def expected_local(cfg: ModelConfig, rank: int, world: int):
    """This rank's pieces of the canonical model and optimizer state, by parameter name."""
    model, opt = trained(cfg)
    shard_in_place(model, opt, cfg, rank, world)
    named = dict(model.named_parameters())
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in named.items()}
    return params, moments


def check_loaded(model, opt, cfg: ModelConfig, rank: int, world: int) -> None:
    params, moments = expected_local(cfg, rank, world)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for name, p in model.named_parameters():
        for key, ref in moments[name].items():
            # (AdamW keeps `step` on the CPU; a loaded one may sit on the parameter's device)
            assert torch.equal(opt.state[p][key].cpu(), ref.cpu()), (name, key)


def cpu_save_shim() -> None:
    """Let megatron's torch_dist save run on CPU tensors over gloo (see the module docstring)."""
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"


def init(rank: int, world: int, store: str, device: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
        torch.set_default_device(f"cuda:{rank}")
    else:
        cpu_save_shim()
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)


def tp_worker(rank: int, world: int, store: str, ckpt: str, save: bool, device: str) -> None:
    init(rank, world, store, device)
    groups = {"tp": (rank, world), "ep": (rank, world)}
    cfg = tiny()
    if save:
        model, opt = trained(cfg)
        shard_in_place(model, opt, cfg, rank, world)
        save_sharded(model, opt, ckpt, groups=groups)
    # a differently initialised model with a fresh optimizer, loaded from the checkpoint
    torch.manual_seed(100 + rank)
    model = build_model(cfg, device=torch.get_default_device())
    shard_in_place(model, torch.optim.AdamW(model.parameters()), cfg, rank, world)
    for p in model.parameters():
        p.data.normal_()
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    load_sharded(model, opt, ckpt, groups=groups)
    check_loaded(model, opt, cfg, rank, world)
    assert opt.param_groups[0]["lr"] == 1e-2
    dist.destroy_process_group()


def pp_worker(rank: int, world: int, store: str, ckpt: str) -> None:
    """Two pipeline stages (layers 0-1 with the embedding, 2-3 with the head), as the Megatron
    backend builds them; the parts of the model a rank does not run are released to meta."""
    init(rank, world, store, "cpu")
    config = stage_config_class()(pipeline_dtype=torch.float32, hidden_size=64)

    def split(model):
        layers = [range(0, 2), range(2, 4)][rank]
        stage = build_stage(model, layers, rank == 0, rank == 1, config=config)
        release_other_stages(model, [stage])
        return stage

    model, opt, stage = trained(tiny(tied=True), split)
    assert all(p.device.type == "meta" for p in model.layers[2 - 2 * rank].parameters())
    assert len(opt.param_groups[0]["params"]) == len(list(stage.parameters()))
    chunks = torch.nn.ModuleList([stage])  # as the backend hands its stages over
    save_sharded(chunks, opt, ckpt, groups={"tp": (0, 1), "ep": (0, 1)})
    dist.destroy_process_group()


def one_rank_load(rank: int, store: str, ckpt: str, device: str) -> None:
    tp_worker(0, 1, store, ckpt, False, device)


def spawn(fn, nprocs: int, *args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(fn, args=args, nprocs=nprocs, join=True)


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mcore-ckpt")
    spawn(tp_worker, 2, 2, str(base / "store"), str(base / "tp2"), True, "cpu")  # 2 -> 2
    return base / "tp2"


def test_tp2_checkpoint_loads_at_one_rank(tp_checkpoint, tmp_path):
    spawn(one_rank_load, 1, str(tmp_path / "store"), str(tp_checkpoint), "cpu")


@pytest.mark.gpu
def test_tp2_checkpoint_on_cuda(tmp_path):
    """The same 2 -> 2 and 2 -> 1 round trips on CUDA tensors over nccl, megatron unpatched."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn(tp_worker, 2, 2, str(tmp_path / "store"), str(tmp_path / "tp2"), True, "cuda")
    spawn(one_rank_load, 1, str(tmp_path / "store1"), str(tmp_path / "tp2"), "cuda")


def test_consolidate_gives_the_canonical_state(tp_checkpoint):
    model, opt = trained(tiny())
    state = consolidate(tp_checkpoint, optimizer=True)
    canonical = model.state_dict()
    for k, v in canonical.items():
        assert torch.equal(state[k], v), k
    for name, p in model.named_parameters():
        for key, ref in opt.state[p].items():
            assert torch.equal(state[f"optimizer.{name}.{key}"], ref), (name, key)
    assert len(state) == len(canonical) + 3 * len(list(model.parameters()))


def test_pipeline_stages_with_tied_embeddings(tmp_path):
    spawn(pp_worker, 2, 2, str(tmp_path / "store"), str(tmp_path / "pp2"))
    model, opt = trained(tiny(tied=True))
    state = consolidate(tmp_path / "pp2", optimizer=True)
    n_opt = 3 * len(list(model.parameters()))  # the tied weight once
    assert len(state) == len(model.state_dict()) + n_opt
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    for name, p in model.named_parameters():
        for key, ref in opt.state[p].items():
            assert torch.equal(state[f"optimizer.{name}.{key}"], ref), (name, key)
