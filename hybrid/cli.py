"""`hybrid` command line: parse arguments, call the layers below, print. Thin by design.

Every command that takes a recipe accepts `--set key.path=value` overrides. A user error
(`ConfigError`: a bad recipe, flag or file) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hybrid import __version__
from hybrid.commands import convert, data, generate, inspect, submit, train
from hybrid.commands import eval as eval_cmd
from hybrid.recipe.schema import ConfigError

COMMANDS = (inspect, train, submit, data, generate, eval_cmd, convert)

EPILOG = """examples:
  hybrid inspect recipes/jamba-1to3-moe16.yaml
  hybrid inspect recipes/nemotron-h-8b.yaml --json --context 131072
  hybrid train recipes/debug/hybrid-tiny.yaml --set train.steps=50
  hybrid submit recipes/jamba-1to3-moe16.yaml --nodes 4 --gpus-per-node 8 --time 2-00:00:00
  hybrid data prepare corpus.jsonl --output data/corpus --tokenizer byte --workers 4
  hybrid generate runs/hybrid-tiny --prompt "def main(" --max-new-tokens 100
  hybrid eval runs/hybrid-tiny --probes mqar,passkey --contexts 128,256,512
  hybrid convert to-hf runs/hybrid-tiny hf/hybrid-tiny --dtype bf16 --verify
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid",
        description="Build, inspect and pretrain hybrid Mamba-2 / attention / MoE language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hybrid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"hybrid {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hybrid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
