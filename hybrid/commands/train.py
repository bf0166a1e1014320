"""`hybrid train RECIPE`: pretrain on this machine (CPU, one GPU, or DDP under torchrun)."""

from __future__ import annotations

import argparse
import os
import sys

from hybrid.commands.common import add_recipe_args, recipe_from_args
from hybrid.recipe.schema import ConfigError

HELP = """Train a recipe. The run directory (train.run_dir, default runs/<recipe name>) receives
checkpoints, TensorBoard events (tensorboard --logdir runs/) and metrics.jsonl. A run directory
that has a checkpoint is resumed exactly where it stopped. SIGTERM or SIGUSR1 saves a checkpoint
and exits cleanly. For all GPUs of a node: torchrun --nproc-per-node=N -m hybrid.cli train ..."""

EPILOG = """examples:
  hybrid train recipes/debug/hybrid-tiny.yaml
  hybrid train recipes/debug/moe-tiny.yaml --set train.steps=50 --run-dir runs/try1
  hybrid train recipes/debug/hybrid-tiny.yaml --resume
  torchrun --nproc-per-node=8 -m hybrid.cli train recipes/jamba-1to3-moe16.yaml
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a recipe (CPU, GPU, or torchrun DDP)",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_recipe_args(p)
    p.add_argument(
        "--run-dir", default=None, help="where checkpoints and logs go (default: train.run_dir)"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const="always",
        default="auto",
        help="require a checkpoint in the run dir and continue it",
    )
    group.add_argument(
        "--no-resume",
        dest="resume",
        action="store_const",
        const="never",
        help="refuse to start if the run dir already has checkpoints",
    )
    p.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        metavar="N",
        help="save and stop after step N (the schedule still spans train.steps)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrid.train.loop import train  # heavy imports only when training

    recipe = recipe_from_args(args)
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise ConfigError(f"--stop-at-step must be at least 1, got {args.stop_at_step}")
    try:
        result = train(
            recipe, run_dir=args.run_dir, resume=args.resume, stop_at_step=args.stop_at_step
        )
    except FloatingPointError as err:  # diverged: say what to do, no traceback
        print(f"hybrid train: {err}", file=sys.stderr)
        return 1
    if result.stopped_by and os.environ.get("RANK", "0") == "0":
        print(
            f"stopped by {result.stopped_by} at step {result.step}; checkpoint saved in "
            f"{result.run_dir}"
        )
    return 0
