"""`hybrid data prepare` and `hybrid data train-tokenizer`: turn local text into the
Megatron-format indexed datasets and tokenizers that `hybrid train` reads."""

from __future__ import annotations

import argparse
import os
import time

from hybrid.recipe.data_config import TokenizerConfig
from hybrid.recipe.schema import ConfigError

PREPARE_HELP = """Tokenise local .jsonl/.json/.parquet/.txt files (files, directories or globs) into
a Megatron-LM indexed dataset PREFIX.bin + PREFIX.idx, appending the end-of-document token to
every document. One document per json/parquet row (column --text-field) or per .txt file
(--sample-by). The output is identical whatever --workers is. Use it in a recipe as
  data: {sources: [{kind: indexed, path: PREFIX}], tokenizer: <the same tokenizer>}"""

PREPARE_EXAMPLES = """\
  hybrid data prepare corpus.jsonl --output data/corpus --tokenizer byte --workers 4
  hybrid data prepare 'shards/*.parquet' --output data/web --tokenizer tok/tokenizer.json
  hybrid data prepare books/ --output data/books --sample-by paragraph
"""

TRAIN_TOKENIZER_HELP = """Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on local
.txt/.jsonl/.json/.parquet files and save it as a tokenizer.json, with an end-of-document
special token. Use it with `--tokenizer PATH` in `hybrid data prepare` and as
  data: {tokenizer: {kind: hf, path: PATH}}"""

TRAIN_TOKENIZER_EXAMPLES = """\
  hybrid data train-tokenizer corpus.jsonl --vocab-size 32000 --output tok/tokenizer.json
  hybrid data train-tokenizer 'books/*.txt' --vocab-size 8192 --output tok/
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `data` and its subcommands on the top-level subparsers."""
    p = sub.add_parser(
        "data",
        help="prepare datasets and tokenizers",
        description="Prepare training data: tokenise files, train tokenizers.",
        formatter_class=_formatter,
        epilog="examples:\n" + PREPARE_EXAMPLES + TRAIN_TOKENIZER_EXAMPLES,
    )
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    _add_prepare(data_sub)
    _add_train_tokenizer(data_sub)


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs")
    p.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="json/parquet column holding the text (default: text)",
    )
    p.add_argument(
        "--sample-by",
        choices=["document", "paragraph", "line"],
        default="document",
        help="how a .txt file is cut into documents (default: document, the whole file)",
    )
    p.add_argument("--max-files", type=int, default=None, metavar="N", help="read only N files")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenise files into PREFIX.bin/.idx",
        description=PREPARE_HELP,
        epilog="examples:\n" + PREPARE_EXAMPLES,
        formatter_class=_formatter,
    )
    _add_input_args(p)
    p.add_argument("--output", "-o", required=True, metavar="PREFIX", help="output path prefix")
    p.add_argument(
        "--tokenizer",
        default="byte",
        metavar="byte|PATH",
        help="'byte' (default) or the path of a Hugging Face tokenizer.json",
    )
    p.add_argument(
        "--eod-token",
        default=None,
        metavar="TOKEN",
        help="end-of-document token of an hf tokenizer (default: found among its special tokens)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="tokenising processes (default: min(8, CPUs))",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def _add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer.json",
        description=TRAIN_TOKENIZER_HELP,
        epilog="examples:\n" + TRAIN_TOKENIZER_EXAMPLES,
        formatter_class=_formatter,
    )
    _add_input_args(p)
    p.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size")
    p.add_argument(
        "--output", "-o", required=True, metavar="PATH", help="tokenizer.json path (or directory)"
    )
    p.add_argument(
        "--eod-token",
        default="<|endoftext|>",
        metavar="TOKEN",
        help="end-of-document special token (default: <|endoftext|>)",
    )
    p.add_argument("--min-frequency", type=int, default=2, metavar="N", help="(default: 2)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train_tokenizer)


def tokenizer_from_arg(value: str, eod_token: str | None = None) -> TokenizerConfig:
    """`--tokenizer byte` or `--tokenizer PATH` as a TokenizerConfig."""
    if value == "byte":
        if eod_token is not None:
            raise ConfigError("--eod-token applies only to an hf tokenizer.json")
        return TokenizerConfig()
    if not os.path.exists(os.path.expanduser(value)):
        raise ConfigError(f"--tokenizer: no file {value!r} (give 'byte' or a tokenizer.json)")
    return TokenizerConfig(kind="hf", path=value, eod_token=eod_token)


def run_prepare(args: argparse.Namespace) -> int:
    from hybrid.data.prepare import prepare

    if args.workers < 1:
        raise ConfigError(f"--workers must be positive, got {args.workers}")
    if args.max_files is not None and args.max_files < 1:
        raise ConfigError(f"--max-files must be positive, got {args.max_files}")
    tokenizer = tokenizer_from_arg(args.tokenizer, args.eod_token)
    stats = prepare(
        args.inputs,
        args.output,
        tokenizer,
        workers=args.workers,
        text_field=args.text_field,
        sample_by=args.sample_by,
        max_files=args.max_files,
        progress=not args.quiet,
    )
    print(stats.summary(args.output))
    return 0


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from hybrid.data.tokenizer import train_bpe_tokenizer

    if args.max_files is not None and args.max_files < 1:
        raise ConfigError(f"--max-files must be positive, got {args.max_files}")
    start = time.perf_counter()
    tok = train_bpe_tokenizer(
        args.inputs,
        args.vocab_size,
        args.output,
        eod_token=args.eod_token,
        text_field=args.text_field,
        sample_by=args.sample_by,
        max_files=args.max_files,
        min_frequency=args.min_frequency,
        show_progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    print(
        f"wrote {tok.path}: vocabulary {tok.vocab_size:,}, end-of-document "
        f"{tok.eod_token!r} = {tok.eod_id}, in {seconds:.1f} s"
    )
    return 0
