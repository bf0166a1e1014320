"""Equivalence checks of the megatron backend, run in every process of one 2-process launch:
`torchrun --nproc-per-node 2 megatron_driver.py OUT.json CASE [CASE ...]`.

Each case builds the same tiny hybrid (attention, Mamba-2, MLP, MoE) on every rank, computes a
single-device reference (forward logits, loss and every gradient, over all ranks' batches with
the trainer's loss scaling), then shards an identical copy with `MegatronBackend.parallelize`,
runs the backend's `forward_backward` on this rank's batch and makes the gradients whole
(`megatron_state.finish_grads`). Rank 0 writes, per case, the largest relative difference
(||a - b|| / ||b||) of logits, loss, each canonical gradient and the gradient norm.

Cases: tp2 (TP=2, DP=1), tp2_tied (tied embeddings, GQA, attention bias, QK-norm),
ep2 (TP=1, EP=2, DP=2), sp2 (TP=2 with sequence parallelism; megatron-core allocates the
outputs of its sequence gather / reduce-scatter on `torch.cuda.current_device()`, so on a
machine without CUDA this case points that call at the CPU; gloo has both collectives).
tp2_ep2 (4 processes: TP=2 x EP=2 with SP; each expert weight split over EP, then its hidden
size over TP) also writes the sharded model with `save_sharded` and consolidates it:
"checkpoint" is the largest difference from the gathered canonical state (0: same bytes).

distopt_ep2, distopt_tp2: 3 optimizer steps (AdamW, weight decay, clipping) through megatron's
DDP + distributed optimizer (`megatron_optim.Engine`) against the backend's plain path; the
largest differences of the gradient norms, the canonical weights and Adam moments, and of the
moments after a canonical save/load round trip. megatron-core's optimizer is CUDA-only code
(tensors made with device="cuda", a type check for torch.cuda.*Tensor); without CUDA these
cases run it on the CPU through `cpu_shims` (allocations redirected, fp32 reported as CUDA).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types
from unittest import mock

import torch
import torch.distributed as dist

from hybrid.model.lm import HybridLM, build_model
from hybrid.parallel import megatron_optim, megatron_state, shard_spec
from hybrid.parallel.megatron_backend import MegatronBackend
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import from_dict
from hybrid.recipe.train_config import OptimizerConfig
from hybrid.train.optim import build_optimizer

BATCH, SEQ = 2, 32


def model_config(tied: bool) -> ModelConfig:
    attention = {"n_heads": 4, "n_kv_heads": 2 if tied else 4, "qk_norm": tied, "bias": tied}
    return from_dict(
        ModelConfig,
        {
            "d_model": 64,
            "vocab_size": 250,
            "pad_vocab_multiple": 64,
            "tie_embeddings": tied,
            "layout": {"pattern": "M*-EM"},
            "mamba": {"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 16},
            "attention": attention,
            "mlp": {"hidden_size": 128, "bias": tied},
            "moe": {
                "n_experts": 4,
                "top_k": 2,
                "expert_hidden_size": 32,
                "n_shared_experts": 1,
                "aux_loss_coef": 0.01,
                "z_loss_coef": 0.001,
            },
        },
    )


CASES = {
    "tp2": dict(tp=2, tied=False),
    "tp2_tied": dict(tp=2, tied=True),
    "ep2": dict(ep=2, tied=False),
    "sp2": dict(tp=2, sequence_parallel=True, tied=True),
    # 4 processes: TP=2 x DP=2, the experts split over the 2 data-parallel ranks
    "tp2_ep2": dict(tp=2, ep=2, sequence_parallel=True, tied=False, checkpoint=True),
}
OUT_DIR = "."  # the output file's folder (checkpoints of the checkpoint cases go there)


def batches(n: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, :3] = -100  # some unlabelled tokens
        out.append({"input_ids": ids[:, :-1].to(DEVICE), "labels": labels.to(DEVICE)})
    return out


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fresh_model(cfg: ModelConfig) -> HybridLM:
    torch.manual_seed(5)
    return build_model(cfg, device=DEVICE)


def reference(cfg: ModelConfig, data: list[dict], total: float) -> dict:
    """Single-device logits of data[0], the mean loss over all batches and the gradient of the
    trainer's objective (sum over batches of CE * n / total + aux / n_batches)."""
    model = fresh_model(cfg)
    logits = model(data[0]["input_ids"]).logits.detach()
    loss_sum = 0.0
    for batch in data:
        out = model(batch["input_ids"], labels=batch["labels"], return_logits=False)
        n = float((batch["labels"] != -100).sum())
        (out.loss * n / total + out.aux_loss / len(data)).backward()
        loss_sum += float(out.loss.detach()) * n
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    return {"logits": logits, "loss": loss_sum / total, "grads": grads, "norm": float(norm)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(name: str) -> dict:
    opts = dict(CASES[name])
    cfg = model_config(opts.pop("tied"))
    checkpoint = opts.pop("checkpoint", False)
    backend = MegatronBackend(device=DEVICE.type, **opts)
    dp, dp_rank = backend.data_parallel_size, backend.data_parallel_rank
    data = batches(dp, cfg.vocab_size)
    total = float(sum(int((b["labels"] != -100).sum()) for b in data))
    ref = reference(cfg, data, total)

    model = fresh_model(cfg)
    module = backend.parallelize(model)
    mine = data[dp_rank]
    logits = module(mine["input_ids"]).logits.detach()
    loss_sum, _, _ = backend.forward_backward(module, [mine], precision="fp32", total_tokens=total)
    loss = float(backend.all_reduce_sum(loss_sum)) / total
    params = list(module.parameters())
    megatron_state.finish_grads(params, dp)
    norm = megatron_state.grad_norm(params)

    errors = {"loss": abs(loss - ref["loss"]) / abs(ref["loss"]), "norm": 0.0}
    errors["norm"] = abs(norm - ref["norm"]) / ref["norm"]
    if dp_rank == 0:
        errors["logits"] = rel(logits, ref["logits"])
    grads = {}
    for key, p in module.named_parameters():
        spec = shard_spec.get(p)
        grads[key] = megatron_state.gather_full(p.grad, spec) if spec is not None else p.grad
    assert grads.keys() == ref["grads"].keys(), sorted(set(grads) ^ set(ref["grads"]))
    errors["grads"] = {k: rel(g, ref["grads"][k]) for k, g in grads.items()}
    errors["sharded"] = sorted(k for k, p in module.named_parameters() if shard_spec.get(p))
    errors["nested"] = sorted(
        k for k, p in module.named_parameters() if len(shard_spec.groups(shard_spec.get(p))) > 1
    )
    if checkpoint:
        errors["checkpoint"] = checkpoint_error(module, os.path.join(OUT_DIR, f"{name}.ckpt"))
    backend.close()
    return errors


def checkpoint_error(module: torch.nn.Module, directory: str) -> float:
    """Save the sharded model with dist_checkpointing, consolidate it (every rank) and compare
    with the canonical state gathered through the shard marks (inf on a key mismatch)."""
    from hybrid.parallel.megatron_checkpoint import consolidate, megatron_group_ranks, save_sharded

    canonical = megatron_state.canonical_model_state(module)
    patches = contextlib.ExitStack()
    if DEVICE.type == "cpu":  # megatron's save path calls these two for CPU tensors too
        patches.enter_context(mock.patch("torch.cuda.synchronize", lambda *a, **k: None))
        patches.enter_context(mock.patch("torch.cuda.current_device", return_value="cpu"))
    with patches:
        save_sharded(module, None, directory, groups=megatron_group_ranks())
    stored = consolidate(directory)  # collective inside a process group: every rank reads
    if stored.keys() != canonical.keys():
        return float("inf")
    return max(float((stored[k].cpu() - v).abs().max()) for k, v in canonical.items())


@contextlib.contextmanager
def cpu_shims():
    """Let megatron-core's CUDA-only DDP / optimizer code run on the CPU (see the docstring)."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as utils

    def on_cpu(fn):
        def make(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)

        return make

    shim = types.ModuleType("torch")
    shim.__getattr__ = lambda name: getattr(torch, name)
    for name in ("tensor", "zeros", "empty", "ones", "full", "zeros_like", "empty_like"):
        setattr(shim, name, on_cpu(getattr(torch, name)))
    tensor_type = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        if not args and not kwargs and self.dtype == torch.float32:
            return "torch.cuda.FloatTensor"
        return tensor_type(self, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        for module in (clip_grads, distrib_optimizer, optimizer, utils):
            stack.enter_context(mock.patch.object(module, "torch", shim))
        stack.enter_context(mock.patch.object(torch.Tensor, "type", cuda_type))
        stack.enter_context(mock.patch("torch.cuda.current_device", return_value="cpu"))
        yield


def train_three_steps(opts: dict, engine: bool) -> tuple[list[float], dict, dict, float]:
    """(grad norms, canonical weights, canonical optimizer state, round-trip error)."""
    cfg = model_config(False)
    backend = MegatronBackend(device=DEVICE.type, **opts)
    model = fresh_model(cfg)
    module = backend.parallelize(model)
    hyper = from_dict(OptimizerConfig, {"lr": 1e-2, "weight_decay": 0.1, "grad_clip": 0.5})
    optimizer, _ = build_optimizer(model, hyper, DEVICE.type)
    eng = megatron_optim.Engine(module, optimizer, cfg) if engine else None
    module = eng.module if eng else module
    dp, rank = backend.data_parallel_size, backend.data_parallel_rank
    data = batches(3 * dp, cfg.vocab_size)
    norms = []
    for step in range(3):
        mine = data[step * dp : (step + 1) * dp]
        total = float(sum(int((b["labels"] != -100).sum()) for b in mine))
        backend.forward_backward(module, [mine[rank]], precision="fp32", total_tokens=total)
        norms.append(eng.step(0.5) if eng else backend.optimizer_step(module, optimizer, 0.5))
    weights = megatron_state.canonical_model_state(model)
    state = eng.optimizer_state() if eng else backend.optimizer_state(optimizer)
    round_trip = 0.0
    if eng:
        eng.load_optimizer_state(state)
        again = eng.optimizer_state()["state"]
        round_trip = max(rel(again[i]["exp_avg"], s["exp_avg"]) for i, s in state["state"].items())
    backend.close()
    return norms, weights, state, round_trip


def run_distopt(name: str) -> dict:
    opts = {"distopt_ep2": {"ep": 2}, "distopt_tp2": {"tp": 2}}[name]
    norms, weights, state, _ = train_three_steps(opts, engine=False)
    norms_e, weights_e, state_e, round_trip = train_three_steps(opts, engine=True)
    moments = [
        rel(state_e["state"][i][k], s[k])
        for i, s in state["state"].items()
        for k in ("exp_avg", "exp_avg_sq")
    ]
    return {
        "norms": max(abs(a - b) / b for a, b in zip(norms_e, norms)),
        "weights": max(rel(weights_e[k], w) for k, w in weights.items()),
        "moments": max(moments),
        "round_trip": round_trip,
    }


def main(out_path: str, names: list[str]) -> None:
    global OUT_DIR
    OUT_DIR = os.path.dirname(os.path.abspath(out_path))
    if DEVICE.type == "cuda":  # fp32 references: no TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    results = {}
    for name in names:
        if name.startswith("distopt"):
            with cpu_shims() if DEVICE.type == "cpu" else contextlib.nullcontext():
                results[name] = run_distopt(name)
        elif CASES[name].get("sequence_parallel") and DEVICE.type == "cpu":
            with mock.patch("torch.cuda.current_device", return_value="cpu"):
                results[name] = run_case(name)
        else:
            results[name] = run_case(name)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
