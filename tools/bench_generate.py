"""Decoding benchmark: ms per generated token and cache bytes per sequence at several contexts.

For each recipe (random weights, no checkpoint) and each context length N: allocate the hybrid
cache for N + warmup + steps positions, fill it with a prefill of N random tokens (or, with
`--fill random`, with random values: a decode step's cost depends only on the cache's shapes),
run `--warmup` decode steps, then time `--steps` decode steps (greedy, each step's token fed to
the next) with the device synchronised around the timed loop. Pure Mamba-2 models should show a
flat time per token; attention layers grow with the context (each step attends over all
pre-allocated slots under a mask, so the cost is that of N + warmup + steps keys).

    python tools/bench_generate.py                       # GPU: the three ~1B recipes, 1K/8K/32K
    python tools/bench_generate.py --tiny                # CPU check: the same layouts, tiny sizes
    python tools/bench_generate.py --contexts 1024,4096 --batch 8 --json bench.json

The Mamba-2 SSD implementation is chosen by `hybrid.ops` (Triton on CUDA when importable);
HYBRID_OPS_IMPL=ssd=torch forces the PyTorch reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from hybrid.infer import HybridCache, decode_step, prefill
from hybrid.infer.kv import KVCache
from hybrid.model import build_model
from hybrid.model.mamba2 import MambaState
from hybrid.recipe.recipe import load_recipe
from hybrid.recipe.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [
    ROOT / "recipes" / "probes" / f"bench-{k}-1b.yaml" for k in ("mamba", "hybrid", "attention")
]
TINY = [
    "model.d_model=64",
    "model.vocab_size=512",
    "model.mamba.head_dim=16",
    "model.mamba.d_state=16",
    "model.mamba.chunk_size=64",
    "model.attention.n_heads=4",
    "model.attention.n_kv_heads=2",
    "model.mlp.hidden_size=128",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger("bench_generate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--recipes",
        default=None,
        help="comma-separated recipe files (default: the "
        "three bench-*-1b recipes in recipes/probes)",
    )
    p.add_argument(
        "--contexts",
        default=None,
        help="context lengths (default 1024,8192,32768; --tiny: 64,256,1024)",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument(
        "--steps", type=int, default=None, help="timed decode steps (default 64; --tiny: 4)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 8; --tiny: 1)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights and KV cache (auto: bf16 on cuda, fp32 on cpu)",
    )
    p.add_argument(
        "--fill",
        default="prefill",
        choices=["prefill", "random"],
        help="how the cache reaches the context: a real prefill or random values",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="shrink every recipe to a tiny width "
        "(same layout) and use CPU-sized defaults: a quick check that all runs",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    return p.parse_args(argv)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--contexts expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--contexts expects positive integers, got {text!r}")
    return values


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def random_fill(cache: HybridCache, context: int) -> None:
    """Make the cache look like one after a prefill of `context` tokens, with random values."""
    for entry in cache.layers.values():
        if isinstance(entry, KVCache):
            entry.k.normal_()
            entry.v.normal_()
            n = min(context, entry.capacity)
            pos = torch.arange(context - n, context, device=entry.k.device)
            entry.slot_pos.index_copy_(0, pos % entry.capacity, pos)
        elif isinstance(entry, MambaState):
            entry.conv.normal_()
            entry.ssm.normal_().mul_(0.1)
    cache.pos.fill_(context)
    cache.length = context


@torch.inference_mode()
def bench_one(model, args, context: int, device: torch.device) -> dict:
    vocab = model.cfg.vocab_size
    cache = HybridCache.allocate(model, args.batch, context + args.warmup + args.steps)
    prefill_s = None
    if args.fill == "prefill":
        ids = torch.randint(0, vocab, (args.batch, context), device=device)
        t0 = sync(device)
        logits = prefill(model, ids, cache)
        prefill_s = sync(device) - t0
        token = logits[:, :vocab].argmax(-1)
    else:
        random_fill(cache, context)
        token = torch.randint(0, vocab, (args.batch,), device=device)
    for _ in range(args.warmup):
        token = decode_step(model, token, cache)[:, :vocab].argmax(-1)
    t0 = sync(device)
    for _ in range(args.steps):
        token = decode_step(model, token, cache)[:, :vocab].argmax(-1)
    elapsed = sync(device) - t0
    return {
        "context": context,
        "batch": args.batch,
        "decode_ms_per_token": 1000.0 * elapsed / args.steps,
        "prefill_s": prefill_s,
        "cache_bytes_per_sequence": cache.bytes_per_sequence(),
        "mamba_bytes_per_sequence": cache.nbytes("M") // args.batch,
        "kv_bytes_per_sequence": cache.nbytes("*") // args.batch,
    }


def bench_recipe(path: Path, args, contexts: list[int], device, dtype) -> list[dict]:
    recipe = load_recipe(path, TINY if args.tiny else [])
    torch.manual_seed(0)
    model = build_model(recipe.model, device=device, dtype=dtype).eval()
    rows = []
    for context in contexts:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = bench_one(model, args, context, device)
        except torch.cuda.OutOfMemoryError:
            row = {"context": context, "batch": args.batch, "error": "out of memory"}
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        row.update(recipe=recipe.name, pattern=recipe.model.pattern(), params=model.num_params())
        log.info("%s", row)
        rows.append(row)
    del model
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | params | context | decode ms/token | cache / sequence | Mamba state "
        "| KV cache |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['recipe']} | {size(r['params'])} | {r['context']} | {r['error']} | | | |"
            )
            continue
        lines.append(
            f"| {r['recipe']} | {size(r['params'])} | {r['context']} | "
            f"{r['decode_ms_per_token']:.2f} | {mib(r['cache_bytes_per_sequence'])} | "
            f"{mib(r['mamba_bytes_per_sequence'])} | {mib(r['kv_bytes_per_sequence'])} |"
        )
    return "\n".join(lines)


def size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 64)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 8)
    try:
        contexts = int_list(args.contexts or ("64,256,1024" if args.tiny else "1024,8192,32768"))
        if args.batch < 1 or args.steps < 1 or args.warmup < 0:
            raise ConfigError("--batch and --steps must be positive, --warmup >= 0")
        name = (
            args.device
            if args.device != "auto"
            else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if name == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        device = torch.device(name)
        dtype = DTYPES[
            args.dtype if args.dtype != "auto" else ("bf16" if name == "cuda" else "fp32")
        ]
        paths = [Path(p) for p in args.recipes.split(",")] if args.recipes else RECIPES
        rows = [row for p in paths for row in bench_recipe(p, args, contexts, device, dtype)]
    except ConfigError as err:
        print(f"bench_generate: error: {err}", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    note = " (--tiny: widths shrunk, times are mostly Python overhead)" if args.tiny else ""
    head = f"{where}, {dtype}, batch {args.batch}, {args.steps} timed steps, fill {args.fill}"
    print(f"\n{head}{note}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
