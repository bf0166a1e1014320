"""`hybrid inspect RECIPE`: the layer map and the figures a designer needs, from the configs."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter

from hybrid.commands.common import add_recipe_args, recipe_from_args
from hybrid.recipe.analysis import recipe_figures
from hybrid.recipe.layout import SYMBOLS
from hybrid.recipe.recipe import Recipe
from hybrid.recipe.schema import ConfigError

HELP = """Print a recipe's expanded layer pattern and, beside an attention-only model of the same
width and depth: total and active parameters, training FLOPs per token at the recipe's sequence
length (forward+backward, attention and SSD included) and inference cache bytes per sequence."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="show a recipe's layout, parameters, FLOPs and cache size", description=HELP
    )
    add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="context length for the inference-cache figure (default: train.seq_len)",
    )
    p.add_argument("--layers", action="store_true", help="also list every sublayer")
    p.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the fully resolved recipe (base merged, overrides applied, every default "
        "filled in) as YAML and exit",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    if args.context is not None and args.context <= 0:
        raise ConfigError(f"--context must be positive, got {args.context}")
    context = args.context or recipe.train.seq_len
    figures = recipe_figures(recipe.model, seq_len=recipe.train.seq_len, context=context)
    if args.json:
        print(json.dumps({"name": recipe.name, **figures}, indent=2))
    else:
        print(render(recipe, figures, show_layers=args.layers))
    return 0


def human(n: float, unit: str = "") -> str:
    if n == 0:
        return f"0{unit}"
    prefixes = ["", "K", "M", "G", "T", "P"]
    i = min(int(math.log10(abs(n)) // 3), len(prefixes) - 1)
    return f"{n / 10 ** (3 * i):.3g}{prefixes[i]}{unit}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TiB"


def _wrap_pattern(pattern: str, width: int = 64) -> list[str]:
    return [f"  {i:>4}  {pattern[i : i + width]}" for i in range(0, len(pattern), width)]


def _kind_rows(figures: dict) -> list[str]:
    counts = Counter(r["symbol"] for r in figures["layers"])
    rows = [f"  {'kind':<10}{'count':>6}{'params':>12}{'active':>12}{'FLOP/tok':>12}{'cache':>12}"]
    for sym in SYMBOLS:
        layers = [r for r in figures["layers"] if r["symbol"] == sym]
        if not layers:
            continue
        rows.append(
            f"  {SYMBOLS[sym] + ' ' + sym:<10}{counts[sym]:>6}"
            f"{human(sum(r['params'] for r in layers)):>12}"
            f"{human(sum(r['active_params'] for r in layers)):>12}"
            f"{human(sum(r['flops_per_token'] for r in layers)):>12}"
            f"{human_bytes(sum(r['cache_bytes'] for r in layers)):>12}"
        )
    return rows


def _compare_rows(figures: dict) -> list[str]:
    base = figures["baseline"]
    rows = [f"  {'':<28}{'this recipe':>16}{'attention-only':>16}{'ratio':>8}"]
    items = [
        ("parameters", "params_total", human),
        ("active parameters / token", "params_active", human),
        (f"train FLOPs / token @{figures['seq_len']}", "flops_per_token", human),
        (f"cache / sequence @{figures['context']}", "cache_bytes", human_bytes),
    ]
    for label, key, fmt in items:
        ratio = figures[key] / base[key] if base[key] else float("nan")
        rows.append(f"  {label:<28}{fmt(figures[key]):>16}{fmt(base[key]):>16}{ratio:>8.3f}")
    return rows


def render(recipe: Recipe, figures: dict, *, show_layers: bool = False) -> str:
    m = recipe.model
    pattern = figures["pattern"]
    n = len(figures["layers"])
    lines = [
        f"recipe {recipe.name}: d_model {m.d_model}, vocab {m.vocab_size} "
        f"(padded {m.padded_vocab_size}), {n} sublayers"
        + (", tied embeddings" if m.tie_embeddings else ""),
        "",
        "pattern (M Mamba-2, * attention, - MLP, E MoE, | stage):",
        *_wrap_pattern(pattern),
        "",
        *_kind_rows(figures),
        "",
        *_compare_rows(figures),
    ]
    if show_layers:
        lines += [
            "",
            f"  {'#':>4} {'sym':<4}{'params':>12}{'active':>12}{'FLOP/tok':>12}{'cache':>12}",
        ]
        for r in figures["layers"]:
            lines.append(
                f"  {r['index']:>4} {r['symbol']:<4}{human(r['params']):>12}"
                f"{human(r['active_params']):>12}{human(r['flops_per_token']):>12}"
                f"{human_bytes(r['cache_bytes']):>12}"
            )
    return "\n".join(lines)
