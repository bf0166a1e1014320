"""`hybrid train`: the pretraining loop, wired from small builder functions.

Resumes exactly from the run directory's latest checkpoint (model, optimizer, scheduler, RNG,
data position); saves every `train.save_every` steps, at the end, and on SIGTERM / SIGUSR1 (then
exits cleanly so Slurm can requeue). Writes TensorBoard events and `metrics.jsonl` (one JSON line
per step) into the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybrid.checkpoint.rng import capture_rng_state, restore_rng_state
from hybrid.checkpoint.store import begin_save, find_latest, load_checkpoint, save_checkpoint
from hybrid.data.loader import TrainDataLoader, build_validation_batches
from hybrid.data.tokenizer import build_tokenizer
from hybrid.model import build_model
from hybrid.parallel.base import Backend
from hybrid.parallel.registry import build_backend
from hybrid.recipe.analysis import model_figures
from hybrid.recipe.recipe import Recipe, recipe_from_dict
from hybrid.recipe.schema import ConfigError, to_dict
from hybrid.train.logging_utils import MetricsLogger, ProgressLine
from hybrid.train.metrics import ThroughputMeter, memory_gb, mfu, peak_bf16_flops
from hybrid.train.optim import build_optimizer
from hybrid.train.schedule import build_scheduler
from hybrid.train.signals import PreemptionHandler
from hybrid.train.step import StepResult, evaluate, train_step, update_router_biases

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    stopped_by: str | None = None


@dataclass
class Session:
    """Everything a run holds, built by `setup`."""

    recipe: Recipe
    backend: Backend
    run_dir: Path
    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: TrainDataLoader
    val_batches: list
    precision: str
    flops_per_token: float
    step: int = 0


def resolve_run_dir(recipe: Recipe, override: str | None) -> Path:
    text = override or recipe.train.run_dir
    try:
        return Path(text.format(name=recipe.name)).expanduser()
    except (KeyError, IndexError, ValueError):
        raise ConfigError(
            f"run dir {text!r}: only the placeholder {{name}} is known", key="train.run_dir"
        ) from None


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "bf16" and device.type == "cpu":
        log.warning("bf16 autocast on CPU is slow; fp32 is the CPU default")
    return requested


def setup(recipe: Recipe, run_dir: Path) -> Session:
    """Build backend, tokenizer check, model, optimizer, schedule and data for `recipe`."""
    t = recipe.train
    backend = build_backend(recipe, run_dir)
    t.grad_accum_steps(backend.data_parallel_size)  # fail before building anything
    torch.manual_seed(t.seed)
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{recipe.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}",
            key="model.vocab_size",
        )
    model = build_model(recipe.model, device=backend.device)
    train_model = backend.parallelize(model)
    optimizer, groups = build_optimizer(model, t.optimizer, backend.device.type)
    train_model = backend.attach_optimizer(train_model, optimizer)
    scheduler = build_scheduler(optimizer, t.schedule, t.steps, t.optimizer.min_lr_ratio)
    loader = TrainDataLoader(
        recipe.data,
        tokenizer=tokenizer,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        rank=backend.data_parallel_rank,
        world_size=backend.data_parallel_size,
    )
    val = build_validation_batches(
        recipe.data,
        tokenizer=tokenizer,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        num_batches=t.eval_batches,
        rank=backend.data_parallel_rank,
        world_size=backend.data_parallel_size,
    )
    figures = model_figures(recipe.model, seq_len=t.seq_len, context=t.seq_len)
    if backend.is_main:
        log.info(
            "%s; %s parameters; optimizer groups %s",
            backend.describe(),
            f"{figures.params_total:,}",
            groups,
        )
    return Session(
        recipe=recipe,
        backend=backend,
        run_dir=run_dir,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        val_batches=val,
        precision=resolve_precision(t.precision, backend.device),
        flops_per_token=figures.flops_per_token,
    )


def save(s: Session, losses: dict[int, float]) -> None:
    """Every rank: engine shards into rank 0's temporary step directory, then the canonical
    state, which rank 0 writes and installs atomically."""
    b = s.backend
    tmp = b.broadcast_object(begin_save(s.run_dir, s.step) if b.is_main else None)
    b.save_shards(s.train_model, tmp)
    model_state = b.model_state(s.model)
    state = {
        "step": s.step,
        "optimizer": b.optimizer_state(s.optimizer),
        "scheduler": s.scheduler.state_dict(),
        "rng": capture_rng_state(),
        "data": s.loader.state_dict(),
        "backend": b.topology(),
    }
    if b.is_main:
        save_checkpoint(
            s.run_dir,
            s.step,
            model_state=model_state,
            train_state=state,
            recipe=s.recipe.to_dict(),
            keep=s.recipe.train.keep_checkpoints,
            tmp_dir=tmp,
        )
    b.barrier()


def check_compatible(recipe: Recipe, saved: dict) -> None:
    """Refuse to resume a checkpoint of a different model."""
    saved_model = to_dict(recipe_from_dict(saved).model)
    if saved_model != to_dict(recipe.model):
        raise ConfigError(
            "the run directory's checkpoint was made with a different model "
            "section; use another --run-dir or the original recipe"
        )


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metrics.jsonl rows of steps after the checkpoint (they will be trained again)."""
    if not path.exists():
        return
    rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """Load the LR scheduler; from a run with another number of parameter groups (an
    expert-parallel run keeps expert parameters in groups of their own) the per-group lists
    are rebuilt from this run's groups: every group follows the same schedule of the step."""
    groups = scheduler.optimizer.param_groups
    if len(state.get("base_lrs", groups)) != len(groups):
        state = {
            **state,
            "base_lrs": [g["initial_lr"] for g in groups],
            "_last_lr": [g["lr"] for g in groups],
        }
    scheduler.load_state_dict(state)


def restore(s: Session, path: Path) -> None:
    ckpt = load_checkpoint(path)
    check_compatible(s.recipe, ckpt.recipe)
    st = ckpt.train_state
    how = s.backend.restore_state(
        s.model,
        s.train_model,
        s.optimizer,
        step_dir=ckpt.path,
        model_state=ckpt.model_state,
        optimizer_state=st["optimizer"],
        saved_topology=st.get("backend"),
    )
    load_scheduler_state(s.scheduler, st["scheduler"])
    s.loader.load_state_dict(st["data"])
    restore_rng_state(st["rng"])
    s.step = int(st["step"])
    if s.backend.is_main:  # rank 0 alone writes metrics.jsonl
        drop_metrics_after(s.run_dir / "metrics.jsonl", s.step)
        log.info("resumed from %s at step %d (%s)", path, s.step, how)


def next_batches(s: Session) -> list:
    n = s.recipe.train.grad_accum_steps(s.backend.data_parallel_size)
    return [next(s.loader) for _ in range(n)]


def step_scalars(s: Session, r: StepResult, lr: float, tps: float) -> dict[str, float]:
    """TensorBoard scalars of one step (tags documented in hybrid.train.logging_utils)."""
    scalars = {
        "train/loss": r.loss,
        "train/lr": lr,
        "train/grad_norm": r.grad_norm,
        "train/tokens_per_s": tps,
        "train/memory_gb": memory_gb(s.backend.device),
    }
    peak = peak_bf16_flops(s.backend.device)
    if peak and tps:
        scalars["train/mfu"] = mfu(tps, s.flops_per_token, peak * s.backend.world_size)
    if r.moe:
        scalars["moe/aux_loss"] = r.aux_loss
        for idx, stats in r.moe.items():
            scalars[f"moe/layer{idx}/router_entropy"] = stats["entropy"]
            scalars[f"moe/layer{idx}/dropped_fraction"] = stats["dropped"]
            for e, load in enumerate(stats["load"].tolist()):
                scalars[f"moe/layer{idx}/load/expert{e}"] = load
    return scalars


def log_step(
    s: Session,
    r: StepResult,
    lr: float,
    meter: ThroughputMeter,
    logger: MetricsLogger,
    progress: ProgressLine,
) -> None:
    """TensorBoard scalars, one metrics.jsonl line, and the console line every log_every."""
    tps = meter.tokens_per_second()
    scalars = step_scalars(s, r, lr, tps)
    logger.add_scalars(scalars, s.step)
    if s.backend.is_main:
        row = {
            "step": s.step,
            "loss": r.loss,
            "lr": lr,
            "grad_norm": r.grad_norm,
            "tokens_per_s": tps,
            "mfu": scalars.get("train/mfu"),
            "memory_gb": scalars["train/memory_gb"],
        }
        with open(s.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    if s.step % s.recipe.train.log_every == 0 or s.step == s.recipe.train.steps:
        progress.update(
            step=s.step,
            loss=r.loss,
            lr=lr,
            grad_norm=r.grad_norm,
            tokens_per_s=tps,
            seconds_per_step=meter.seconds_per_step(),
            mfu=scalars.get("train/mfu"),
        )


def maybe_evaluate(s: Session, logger: MetricsLogger, progress: ProgressLine) -> bool:
    """Validation loss and perplexity every eval_every steps and at the end; True if it ran."""
    t = s.recipe.train
    if not s.val_batches or not t.eval_every or s.step % t.eval_every and s.step != t.steps:
        return False
    loss = evaluate(s.train_model, s.val_batches, s.backend, s.precision)
    ppl = math.exp(min(loss, 50.0))
    logger.add_scalars({"val/loss": loss, "val/ppl": ppl}, s.step)
    progress.message(f"step {s.step}: validation loss {loss:.4f}, perplexity {ppl:.2f}")
    return True


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: str) -> Path | None:
    """Create the run dir; return the checkpoint to resume from (per `resume`)."""
    latest = find_latest(run_dir) if run_dir.exists() else None
    if resume == "always" and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir}")
    if resume == "never" and latest is not None:
        raise ConfigError(
            f"{run_dir} already has checkpoints; pass --resume to continue it or "
            "choose another --run-dir (nothing was overwritten)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run dir {run_dir}: {err.strerror}") from None
    return latest


def train(
    recipe: Recipe,
    *,
    run_dir: str | None = None,
    resume: str = "auto",
    stop_at_step: int | None = None,
) -> TrainResult:
    """Run (or continue) training; returns the per-step losses of this invocation."""
    path = resolve_run_dir(recipe, run_dir)
    latest = prepare_run_dir(recipe, path, resume)
    s = setup(recipe, path)
    try:
        if latest is not None:
            restore(s, latest)
        elif s.backend.is_main:
            (path / "recipe.yaml").write_text(recipe.to_yaml())
        return _run(s, stop_at_step)
    finally:
        s.backend.close()


def stop_requested(backend: Backend, preempt: PreemptionHandler) -> str | None:
    """All ranks stop at the same step if any rank received a preemption signal."""
    flag = torch.tensor(1.0 if preempt.requested else 0.0, device=backend.device)
    if float(backend.all_reduce_sum(flag)) > 0:
        return preempt.requested or "a signal on another rank"
    return None


def one_step(s: Session, meter: ThroughputMeter) -> tuple[StepResult, float]:
    """One optimizer step; returns its result and the learning rate it used."""
    lr = s.optimizer.param_groups[0]["lr"]
    t = s.recipe.train
    r = train_step(
        s.train_model,
        next_batches(s),
        s.optimizer,
        s.backend,
        precision=s.precision,
        grad_clip=t.optimizer.grad_clip,
    )
    s.scheduler.step()
    if r.moe:
        update_router_biases(s.model, r.moe, s.backend)
    s.step += 1
    meter.update(r.tokens)
    if not math.isfinite(r.loss):
        raise FloatingPointError(
            f"loss is {r.loss} at step {s.step}; lower the learning rate, "
            "check the data, or resume from an earlier checkpoint"
        )
    return r, lr


def _run(s: Session, stop_at_step: int | None) -> TrainResult:
    t = s.recipe.train
    result = TrainResult(run_dir=s.run_dir, step=s.step)
    logger = MetricsLogger(s.run_dir, enabled=s.backend.is_main)
    progress = ProgressLine(total_steps=t.steps, enabled=s.backend.is_main)
    meter = ThroughputMeter()
    last = min(t.steps, stop_at_step or t.steps)
    s.train_model.train()
    with PreemptionHandler() as preempt:
        while s.step < last:
            r, lr = one_step(s, meter)
            result.losses[s.step] = r.loss
            log_step(s, r, lr, meter, logger, progress)
            paused = maybe_evaluate(s, logger, progress)
            result.stopped_by = stop_requested(s.backend, preempt)
            if result.stopped_by:
                break
            if t.save_every and s.step % t.save_every == 0 and s.step < last:
                save(s, result.losses)
                paused = True
            if paused:
                meter.mark()  # evaluation / saving time is not training throughput
    save(s, result.losses)
    logger.close()
    progress.finish(step=s.step, stopped_by=result.stopped_by, final_loss=result.losses.get(s.step))
    result.step = s.step
    return result
