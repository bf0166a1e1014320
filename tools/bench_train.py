"""Training throughput of a recipe on one GPU, beside a plain-PyTorch baseline of the same shape.

    python tools/bench_train.py recipes/bench/dense-1.5b.yaml --batch 4 --steps 10
    python tools/bench_train.py recipes/bench/moe-1.5b.yaml --activation-checkpointing selective
    python tools/bench_train.py RECIPE --no-baseline --json out.json

Ours: the model `hybrid train` builds, parallelized by the local backend (activation
checkpointing, `torch.compile` of each sublayer), stepped by `hybrid.train.step.train_step`
with `build_optimizer`'s AdamW (fused on CUDA) under the recipe's precision (bf16 autocast on
CUDA), on synthetic random token batches of `seq_len` (no data is read).
Baseline: `tools/bench_baseline.py` (mamba_ssm `Mamba2`, SDPA attention, SwiGLU, a per-expert
loop MoE, full-logits cross-entropy), the same AdamW, bf16 autocast, gradient clipping.

Each is timed over `--steps` steps after `--warmup` steps; tokens/s = batch * seq_len / step
time. MFU = tokens/s * training FLOPs per token (`hybrid inspect`'s count: forward + backward,
attention and SSD included; the same count for both models) / the bf16 matmul rate measured in
this run (an 8192^3 matmul), and also against the device's nominal peak. Peak memory is
`torch.cuda.max_memory_allocated` (the process's peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hybrid.model import build_model  # noqa: E402
from hybrid.parallel.local import LocalBackend  # noqa: E402
from hybrid.recipe.analysis import model_figures  # noqa: E402
from hybrid.recipe.recipe import Recipe, load_recipe  # noqa: E402
from hybrid.recipe.schema import ConfigError  # noqa: E402
from hybrid.train.loop import resolve_precision  # noqa: E402
from hybrid.train.metrics import memory_gb, peak_bf16_flops, reset_peak_memory  # noqa: E402
from hybrid.train.optim import build_optimizer  # noqa: E402
from hybrid.train.step import train_step  # noqa: E402


@dataclass
class BenchResult:
    model: str
    params: int
    batch: int
    seq_len: int
    steps: int
    step_ms: float
    tokens_per_s: float
    flops_per_token: float
    mfu_measured: float
    mfu_nominal: float | None
    peak_gb: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: torch.device, n: int = 8192) -> float:
    """FLOP/s of an n x n x n matmul: bf16 with `triton.testing.do_bench` on a GPU, fp32 by
    wall clock (best of 3) on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
        seconds = ms / 1e3
    else:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        seconds = min(times)
    return 2.0 * n**3 / seconds


def synthetic_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random next-token rows: input_ids and labels (B, L), on the CPU (the step moves them)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


def time_steps(
    step: Callable[[], object],
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    label: str,
    stream: TextIO | None = None,
) -> float:
    """Seconds per step, mean over `steps` timed steps after `warmup` untimed ones; prints a
    progress line (rewritten in place) to `stream` (default: stderr)."""
    stream = stream or sys.stderr
    for i in range(warmup):
        print(f"\r  {label}: warm-up {i + 1}/{warmup}", end="", file=stream, flush=True)
        step()
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step()
        sync(device)
        ms = (time.perf_counter() - start) / (i + 1) * 1e3
        print(
            f"\r  {label}: step {i + 1}/{steps}  {ms:.1f} ms/step", end="", file=stream, flush=True
        )
    elapsed = time.perf_counter() - start
    print(file=stream, flush=True)
    return elapsed / steps


def result(
    name: str,
    params: int,
    *,
    batch: int,
    seq_len: int,
    steps: int,
    step_s: float,
    flops_per_token: float,
    matmul_rate: float,
    nominal_peak: float | None,
    peak_gb: float,
) -> BenchResult:
    """The figures of one timed model (tokens/s and both MFUs derived from the step time)."""
    tps = batch * seq_len / step_s
    return BenchResult(
        model=name,
        params=params,
        batch=batch,
        seq_len=seq_len,
        steps=steps,
        step_ms=step_s * 1e3,
        tokens_per_s=tps,
        flops_per_token=flops_per_token,
        mfu_measured=tps * flops_per_token / matmul_rate,
        mfu_nominal=tps * flops_per_token / nominal_peak if nominal_peak else None,
        peak_gb=peak_gb,
    )


@dataclass
class BenchSetup:
    """What both models are timed under."""

    recipe: Recipe
    device: torch.device
    batch: int
    seq_len: int
    steps: int
    warmup: int
    flops_per_token: float
    matmul_rate: float
    nominal_peak: float | None
    profile_rows: int = 0


def timed_result(
    s: BenchSetup, name: str, params: int, step_s: float, peak_gb: float
) -> BenchResult:
    """`result` for a model timed under setup `s`."""
    return result(
        name,
        params,
        batch=s.batch,
        seq_len=s.seq_len,
        steps=s.steps,
        step_s=step_s,
        flops_per_token=s.flops_per_token,
        matmul_rate=s.matmul_rate,
        nominal_peak=s.nominal_peak,
        peak_gb=peak_gb,
    )


def profile_step(step: Callable[[], object], device: torch.device, rows: int) -> None:
    """Profile one step and print the `rows` operators with the most device time (stderr)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), file=sys.stderr)


def bench_ours(s: BenchSetup, *, activation_checkpointing: str, compile: bool) -> BenchResult:
    """Time `hybrid train`'s step on our model (local backend, one device)."""
    t = s.recipe.train
    backend = LocalBackend(
        device=s.device.type, activation_checkpointing=activation_checkpointing, compile=compile
    )
    torch.manual_seed(t.seed)
    model = build_model(s.recipe.model, device=backend.device)
    params = model.num_params()
    train_model = backend.parallelize(model)
    optimizer, _ = build_optimizer(model, t.optimizer, backend.device.type)
    precision = resolve_precision(t.precision, backend.device)
    batch = synthetic_batch(s.recipe.model.vocab_size, s.batch, s.seq_len)

    def step() -> None:
        train_step(
            train_model,
            [batch],
            optimizer,
            backend,
            precision=precision,
            grad_clip=t.optimizer.grad_clip,
        )

    reset_peak_memory(backend.device)
    step_s = time_steps(step, backend.device, steps=s.steps, warmup=s.warmup, label="hybrid")
    peak = memory_gb(backend.device)
    if s.profile_rows:
        profile_step(step, backend.device, s.profile_rows)
    return timed_result(s, "hybrid", params, step_s, peak)


def bench_baseline(s: BenchSetup, expected_params: int | None) -> BenchResult:
    """Time a plain PyTorch training step of the peer baseline (same AdamW, clipping, autocast)."""
    from bench_baseline import build_baseline, num_params

    t = s.recipe.train
    torch.manual_seed(t.seed)
    model = build_baseline(s.recipe.model, device=s.device)
    params = num_params(model)
    if expected_params is not None:
        print(f"  parameters: hybrid {expected_params:,}, baseline {params:,}", file=sys.stderr)
        assert abs(params - expected_params) <= 0.01 * expected_params, (params, expected_params)
    optimizer, _ = build_optimizer(model, t.optimizer, s.device.type)
    precision = resolve_precision(t.precision, s.device)
    batch = {
        k: v.to(s.device)
        for k, v in synthetic_batch(s.recipe.model.vocab_size, s.batch, s.seq_len).items()
    }
    clip = t.optimizer.grad_clip or float("inf")

    def step() -> None:
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(batch["input_ids"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    reset_peak_memory(s.device)
    step_s = time_steps(step, s.device, steps=s.steps, warmup=s.warmup, label="baseline")
    peak = memory_gb(s.device)
    return timed_result(s, "baseline", params, step_s, peak)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def human_params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render(results: list[BenchResult], header: dict) -> str:
    """The summary printed last: run facts, one row per model, the tokens/s ratio."""
    lines = [
        f"{header['recipe']} on {header['device']} ({header['date']}), L {header['seq_len']}, "
        f"{header['flops_per_token'] / 1e9:.2f} GFLOP/token, matmul rate measured "
        f"{header['matmul_rate'] / 1e12:.1f} TFLOP/s"
        + (f" (nominal {header['nominal_peak'] / 1e12:.0f})" if header["nominal_peak"] else ""),
        f"hybrid: activation checkpointing {header['activation_checkpointing']}, "
        f"compile {header['compile']}, precision {header['precision']}",
        "",
        "| model | params | batch | tokens/s | MFU (measured rate) | MFU (nominal) | peak GB "
        "| step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        nominal = f"{100 * r.mfu_nominal:.1f}%" if r.mfu_nominal is not None else "-"
        lines.append(
            f"| {r.model} | {human_params(r.params)} | {r.batch} | {r.tokens_per_s:,.0f} | "
            f"{100 * r.mfu_measured:.1f}% | {nominal} | {r.peak_gb:.1f} | {r.step_ms:.1f} |"
        )
    by_name = {r.model: r for r in results}
    if {"hybrid", "baseline"} <= by_name.keys():
        ratio = by_name["hybrid"].tokens_per_s / by_name["baseline"].tokens_per_s
        lines += ["", f"ours / baseline tokens/s: {ratio:.2f}x"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=None, help="default: train.micro_batch_size")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=None, help="default: train.seq_len")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-baseline", action="store_true")
    which.add_argument("--baseline-only", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each of our sublayers")
    p.add_argument(
        "--activation-checkpointing",
        choices=["none", "selective", "full"],
        default=None,
        help="ours only (default: train.activation_checkpointing)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--matmul-size", type=int, default=8192, help="n of the n^3 matmul timed")
    p.add_argument("--json", metavar="PATH", default=None, help="write the numbers as JSON")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="after timing ours, profile one step and print the ROWS costliest operators",
    )
    args = p.parse_args(argv)
    for name in ("steps", "matmul_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def setup_from_args(args: argparse.Namespace) -> BenchSetup:
    recipe = load_recipe(args.recipe, args.overrides)
    seq_len = args.seq_len or recipe.train.seq_len
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    figures = model_figures(recipe.model, seq_len=seq_len, context=seq_len)
    return BenchSetup(
        recipe=recipe,
        device=device,
        batch=args.batch or recipe.train.micro_batch_size,
        seq_len=seq_len,
        steps=args.steps,
        warmup=args.warmup,
        flops_per_token=figures.flops_per_token,
        matmul_rate=measure_matmul_rate(device, args.matmul_size),
        nominal_peak=peak_bf16_flops(device),
        profile_rows=args.profile,
    )


def main(argv: list[str] | None = None) -> int:
    from bench_baseline import PeerUnavailableError

    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, PeerUnavailableError) as err:
        print(f"bench_train: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    s = setup_from_args(args)
    if not args.no_baseline and "M" in s.recipe.model.pattern():
        from bench_baseline import require_mamba2

        require_mamba2()  # fail before timing ours, not after
    ac = args.activation_checkpointing or s.recipe.train.activation_checkpointing
    compile = args.compile or s.recipe.train.compile
    header = {
        "recipe": s.recipe.name,
        "device": device_name(s.device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "seq_len": s.seq_len,
        "flops_per_token": s.flops_per_token,
        "matmul_rate": s.matmul_rate,
        "nominal_peak": s.nominal_peak,
        "activation_checkpointing": ac,
        "compile": compile,
        "precision": resolve_precision(s.recipe.train.precision, s.device),
    }
    results: list[BenchResult] = []
    ours_params = model_figures(s.recipe.model, seq_len=s.seq_len, context=s.seq_len).params_total
    if not args.baseline_only:
        results.append(bench_ours(s, activation_checkpointing=ac, compile=compile))
        release(s.device)  # the model and optimizer went with bench_ours's frame
    if not args.no_baseline:
        results.append(bench_baseline(s, ours_params))
        release(s.device)
    print(render(results, header))
    if args.json:
        Path(args.json).write_text(
            json.dumps({**header, "results": [asdict(r) for r in results]}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
