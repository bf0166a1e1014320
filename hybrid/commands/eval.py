"""`hybrid eval CHECKPOINT`: validation loss and perplexity, and recall probes (MQAR, passkey) at
several context lengths."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from hybrid.commands.generate import Loaded, add_checkpoint_args, load_for_inference
from hybrid.recipe.data_config import DataConfig
from hybrid.recipe.recipe import Recipe
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)

HELP = """Evaluate a checkpoint (a run directory, whose latest checkpoint is used, or one step
directory). Validation loss and perplexity are measured on the recipe's validation data (its
held-out share, or data.valid_sources); point it at any other data that `hybrid train` accepts
with --source. Recall probes generate fresh examples at each context length: MQAR (multi-query
associative recall; accuracy on the values of the repeated keys, teacher-forced) and passkey
retrieval (exact match of the greedily generated key, through the recurrent decoder). Probe
settings come from the recipe's first mqar / passkey source when it has one, else defaults."""

EPILOG = """examples:
  hybrid eval runs/probe-hybrid-1to3
  hybrid eval runs/hybrid-tiny --probes none --batches 50
  hybrid eval runs/x --source '{kind: hf, path: data/valid.jsonl}' --probes none
  hybrid eval runs/probe-mamba --probes mqar --contexts 64,128,256,512 --examples 256 --json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss / perplexity and recall probes (MQAR, passkey) of a checkpoint",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_args(p)
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="YAML",
        help="validation data as a data source mapping, e.g. '{kind: indexed, path: data/val}' "
        "(repeatable; replaces data.valid_sources and uses the sources whole)",
    )
    p.add_argument(
        "--batches", type=int, default=20, metavar="N", help="validation batches (0: skip)"
    )
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per batch")
    p.add_argument(
        "--seq-len", type=int, default=None, metavar="L", help="default: the recipe's train.seq_len"
    )
    p.add_argument(
        "--probes",
        default="mqar,passkey",
        metavar="LIST",
        help="comma-separated probes to run: mqar, passkey, or none (default both)",
    )
    p.add_argument(
        "--contexts",
        default=None,
        metavar="LIST",
        help="probe context lengths, e.g. 128,256,512 (default: 1/2, 1, 2 and 4 times the "
        "probe's example length)",
    )
    p.add_argument("--examples", type=int, default=128, metavar="N", help="examples per context")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe examples")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} expects positive integers, got {text!r}")
    return values


def _probe_names(text: str) -> list[str]:
    from hybrid.eval.probes import PROBES

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in PROBES]
    if unknown or not names:
        raise ConfigError(f"--probes: unknown {unknown or text!r}; choose from {sorted(PROBES)}")
    return names


def _check_args(args: argparse.Namespace) -> None:
    for flag in ("batches", "examples"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        raise ConfigError("--batch-size and --seq-len must be positive")


def _validation_data(args: argparse.Namespace, recipe: Recipe) -> DataConfig:
    from hybrid.recipe.data_config import DataSourceConfig
    from hybrid.recipe.loader import load_yaml
    from hybrid.recipe.schema import from_dict

    data = recipe.data
    if not args.source:
        return data
    sources = []
    for i, text in enumerate(args.source):
        try:
            value = load_yaml(text)
        except Exception:  # PyYAML's errors; say which flag
            raise ConfigError(f"--source {text!r}: not valid YAML") from None
        try:
            sources.append(from_dict(DataSourceConfig, value))
        except ConfigError as err:
            raise err.with_context(prefix=f"--source[{i}]") from None
    return dataclasses.replace(data, valid_sources=sources)


def run_perplexity(args: argparse.Namespace, loaded: Loaded) -> dict | None:
    from hybrid.data.loader import build_validation_batches
    from hybrid.eval.perplexity import perplexity

    if args.batches == 0:
        return None
    seq_len = args.seq_len or loaded.recipe.train.seq_len
    data = _validation_data(args, loaded.recipe)
    batches = build_validation_batches(
        data, seq_len, args.batch_size, num_batches=args.batches, tokenizer=loaded.tokenizer
    )
    if len(batches) == 0:
        raise ConfigError(
            f"no validation batch of {args.batch_size} x {seq_len} tokens in the data; lower "
            "--batch-size or --seq-len, or give --source"
        )
    res = perplexity(loaded.model, batches, progress=sys.stderr.isatty())
    return {
        "loss": res.loss,
        "perplexity": res.perplexity,
        "tokens": res.tokens,
        "seq_len": seq_len,
    }


def run_probes(args: argparse.Namespace, loaded: Loaded) -> list[dict]:
    from hybrid.eval.probes import PROBES, default_contexts, probe_settings

    rows = []
    for name in _probe_names(args.probes):
        settings, from_recipe = probe_settings(name, loaded.recipe.data.resolved_sources())
        log.info(
            "%s probe settings %s: %s",
            name,
            "of the recipe" if from_recipe else "default",
            settings,
        )
        contexts = _int_list(args.contexts, "--contexts") if args.contexts else None
        for context in contexts or default_contexts(settings):
            try:
                res = PROBES[name](
                    loaded.model,
                    settings,
                    loaded.tokenizer,
                    context=context,
                    examples=args.examples,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    progress=sys.stderr.isatty(),
                )
            except ConfigError as err:
                if contexts is not None:
                    raise
                log.warning("skipping: %s", err)
                continue
            rows.append(dataclasses.asdict(res))
    return rows


def render(result: dict) -> str:
    lines = [f"checkpoint {result['checkpoint']} (step {result['step']})"]
    ppl = result["validation"]
    if ppl is not None:
        lines.append(
            f"validation: loss {ppl['loss']:.4f}, perplexity {ppl['perplexity']:.3f} "
            f"({ppl['tokens']:,} label tokens at seq_len {ppl['seq_len']})"
        )
    if result["probes"]:
        lines.append(f"{'probe':<10}{'context':>9}{'examples':>10}{'accuracy':>10}  secondary")
        for r in result["probes"]:
            lines.append(
                f"{r['probe']:<10}{r['context']:>9}{r['examples']:>10}{r['accuracy']:>10.3f}  "
                f"{r['secondary_name']} {r['secondary']:.3f}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    names = _probe_names(args.probes)  # fail on a bad flag before loading anything
    if args.contexts:
        _int_list(args.contexts, "--contexts")
    if args.examples == 0 and names:
        raise ConfigError("--examples 0 leaves nothing to probe; use --probes none")
    loaded = load_for_inference(args.checkpoint, args.overrides, args.device, args.dtype)
    result = {
        "checkpoint": str(Path(loaded.path)),
        "step": loaded.step,
        "validation": run_perplexity(args, loaded),
        "probes": run_probes(args, loaded) if names else [],
    }
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
