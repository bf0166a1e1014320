"""`hybrid generate CHECKPOINT --prompt TEXT`: continue prompts with a trained model, batched,
using the hybrid cache (fixed-size Mamba state, pre-allocated KV cache) and recurrent decoding.

Also home of `load_for_inference`, which `hybrid eval` shares: checkpoint -> recipe, model,
tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hybrid.recipe.recipe import Recipe
from hybrid.recipe.schema import ConfigError

if TYPE_CHECKING:  # torch and the model are imported only when a command runs
    import torch

    from hybrid.data.tokenizer import Tokenizer
    from hybrid.infer.sampling import SamplingConfig
    from hybrid.model.lm import HybridLM

log = logging.getLogger(__name__)

HELP = """Continue one or more prompts with the model of a checkpoint (a run directory, whose
latest checkpoint is used, or one step directory). Prompts are tokenised with the recipe's
tokenizer and run as one batch: the prompt in one prefill pass (chunked SSD, causal attention),
then one recurrent step per new token, O(1) per Mamba layer. Sampling: --temperature (0 or
--greedy: argmax), --top-k, --top-p. A row stops at the end-of-document token unless
--no-stop. Timing and cache size per sequence are printed to stderr."""

EPILOG = """examples:
  hybrid generate runs/hybrid-tiny --prompt "def main(" --max-new-tokens 200
  hybrid generate runs/hybrid-tiny --prompt "import os" --prompt "class A:" --greedy
  hybrid generate runs/hybrid-tiny/checkpoints/step-00000100 --prompt "for i in" \\
      --temperature 0.8 --top-p 0.9 --seed 3
"""

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """CHECKPOINT, --device, --dtype and --set (shared with `hybrid eval`)."""
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or step directory")
    p.add_argument(
        "--device", choices=DEVICES, default="auto", help="where to run (auto: cuda if present)"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights and cache dtype (auto: bf16 on cuda, fp32 on cpu); Mamba SSM states stay "
        "fp32",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the checkpoint's recipe, e.g. --set data.tokenizer.path=tok.json "
        "(repeatable; the model section must still match the weights)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue prompts with a checkpoint (recurrent decoding, hybrid cache)",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_args(p)
    p.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)"
    )
    p.add_argument(
        "--prompt-file", default=None, metavar="FILE", help="more prompts, one per line of FILE"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default 64")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--no-stop", action="store_true", help="do not stop at the end-of-document token"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


@dataclass
class Loaded:
    """What `load_for_inference` returns: the checkpoint's recipe (overrides applied), its model
    in eval mode, the recipe's tokenizer, the step and the step directory."""

    recipe: Recipe
    model: HybridLM
    tokenizer: Tokenizer
    step: int
    path: Path


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device: %s (automatic)", name)
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
        log.info("dtype: %s (automatic for %s)", name, device.type)
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_for_inference(
    checkpoint: str, overrides: list[str], device_name: str = "auto", dtype_name: str = "auto"
) -> Loaded:
    """Model (eval mode, on the device, in the dtype), recipe and tokenizer of a checkpoint."""
    from hybrid.checkpoint.store import RECIPE_FILE, load_checkpoint
    from hybrid.data.tokenizer import build_tokenizer
    from hybrid.model import build_model
    from hybrid.recipe.loader import apply_overrides
    from hybrid.recipe.recipe import recipe_from_dict

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    ckpt = load_checkpoint(Path(checkpoint))
    where = str(ckpt.path / RECIPE_FILE)
    recipe = recipe_from_dict(apply_overrides(ckpt.recipe, overrides, {}), file=where)
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    model = build_model(recipe.model, device="cpu", init=False)
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"{ckpt.path}: the weights do not fit the recipe's model ({first}); do not --set "
            "model.* keys"
        ) from None
    model.to(device=device, dtype=dtype).eval()
    log.info("loaded %s (step %d, %s parameters)", ckpt.path, ckpt.step, f"{model.num_params():,}")
    return Loaded(recipe, model, tokenizer, ckpt.step, ckpt.path)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--prompt-file {args.prompt_file}: cannot read it ({err})") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT (or --prompt-file FILE)")
    return prompts


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    from hybrid.infer.sampling import SamplingConfig

    try:
        return SamplingConfig(
            temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p
        )
    except ConfigError as err:
        raise ConfigError(f"--{err.key.replace('_', '-')}: {err.message}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from hybrid.infer.generate import generate

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    prompts, sampling = _prompts(args), _sampling(args)
    loaded = load_for_inference(args.checkpoint, args.overrides, args.device, args.dtype)
    tok = loaded.tokenizer
    ids = [tok.encode(p) or [tok.eod_id] for p in prompts]  # an empty prompt starts a document
    generator = torch.Generator(device=loaded.model.embed.weight.device).manual_seed(args.seed)
    out = generate(
        loaded.model,
        ids,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        eod_id=None if args.no_stop else tok.eod_id,
        vocab_size=tok.vocab_size,
        generator=generator,
        progress=sys.stderr.isatty(),
    )
    texts = [tok.decode(t) for t in out.tokens]
    stats = {
        "sequences": len(prompts),
        "new_tokens": [len(t) for t in out.tokens],
        "prefill_s": round(out.prefill_seconds, 4),
        "decode_ms_per_token": round(out.ms_per_token, 3),
        "cache_bytes_per_sequence": out.cache_bytes_per_sequence,
    }
    if args.json:
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, texts)]
        print(json.dumps({"checkpoint": str(loaded.path), "outputs": rows, **stats}, indent=2))
        return 0
    for prompt, text in zip(prompts, texts):
        print(prompt + text)
        print("-" * 40)
    print(
        f"{stats['sequences']} sequence(s), step {loaded.step}; prefill {out.prefill_seconds:.3f}"
        f" s; decode {out.ms_per_token:.2f} ms/token; cache "
        f"{out.cache_bytes_per_sequence / 1024:.1f} KiB per sequence",
        file=sys.stderr,
    )
    return 0
