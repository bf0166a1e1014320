"""`hybrid convert to-hf | from-hf`: checkpoints to and from Hugging Face `transformers`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybrid.convert.verify import VerifyReport

HELP = """Convert checkpoints to and from Hugging Face transformers format.

to-hf writes a directory that AutoModelForCausalLM.from_pretrained loads: config.json,
generation_config.json, safetensors weights (sharded above --max-shard-size), the tokenizer
files, the recipe (hybrid_recipe.yaml) and a README. The target is the native transformers
class that represents the model exactly (Mamba2, GraniteMoeHybrid, Bamba, NemotronH); when none
does, a self-contained model (configuration/modeling files, loads with trust_remote_code=True).

from-hf turns a Bamba / Granite-4.0-H / Nemotron-H / Mamba-2 model directory (or one written by
to-hf) into step 0 of a new run directory, ready for `hybrid train RUN_DIR/recipe.yaml`."""

EPILOG = """examples:
  hybrid convert to-hf runs/hybrid-tiny hf/hybrid-tiny --dtype bf16 --verify
  hybrid convert to-hf runs/jamba/checkpoints/step-00001000 hf/jamba --target hybrid_lm
  hybrid convert from-hf ~/models/granite-4.0-h-tiny runs/granite-continued --verify
  hybrid train runs/granite-continued/recipe.yaml
"""

TARGET_HELP = """HF class to write: bamba, granitemoehybrid, mamba2, nemotron_h or hybrid_lm (the
self-contained remote code). Default: the first native class that represents the model
exactly, else hybrid_lm. A forced target that differs in anything that changes the logits is
refused with the list of differences."""

VERIFY_HELP = """run our model and the HF model in float32 on the same random tokens; print the
maximum relative logits error and greedy-generation agreement; exit 1 above 1e-4. Needs both
models in memory in float32."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert checkpoints to and from Hugging Face transformers",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    _add_to_hf(actions)
    _add_from_hf(actions)


def _add_to_hf(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "to-hf", help="write a Hugging Face model directory from a checkpoint", description=HELP
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or step directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) output directory")
    p.add_argument("--target", default=None, metavar="NAME", help=TARGET_HELP)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weight dtype to write (auto: as stored in the checkpoint, fp32 for a training run)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="split the weights into safetensors shards of at most SIZE (default 5GB)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer.json to write instead of the recipe's data.tokenizer (e.g. when the "
        "recipe's path is not valid on this machine)",
    )
    p.add_argument(
        "--dropless",
        action="store_true",
        help="export an MoE trained with moe.capacity_factor as the dropless model (HF classes "
        "never drop tokens)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    p.set_defaults(func=run_to_hf)


def _add_from_hf(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "from-hf", help="make a checkpoint of ours from a Hugging Face model", description=HELP
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="local HF model directory (safetensors)")
    p.add_argument("out", metavar="OUT_CHECKPOINT", help="new run directory to create")
    p.add_argument("--name", default=None, help="recipe name (default: the HF directory's name)")
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    p.set_defaults(func=run_from_hf)


def run_to_hf(args: argparse.Namespace) -> int:
    from hybrid.convert import ExportOptions, export_to_hf, verify_export
    from hybrid.convert.safetensors_io import parse_size

    options = ExportOptions(
        target=args.target,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        tokenizer=args.tokenizer,
        dropless=args.dropless,
        force=args.force,
    )
    result = export_to_hf(args.checkpoint, args.out_dir, options)
    kind = " (remote code: load with trust_remote_code=True)" if result.target.remote_code else ""
    print(
        f"wrote {result.out_dir}: {result.target.architecture}{kind}, "
        f"{len(result.files)} weight file(s)"
    )
    print(result.tokenizer_note)
    if not args.verify:
        return 0
    report = verify_export(
        result.out_dir, result.model, result.state, remote_code=result.target.remote_code
    )
    return _report(report, f"{result.out_dir} was written but does not match; do not publish it")


def run_from_hf(args: argparse.Namespace) -> int:
    from hybrid.convert import import_from_hf, verify_export
    from hybrid.train.fresh_state import fresh_train_state

    result = import_from_hf(args.hf_dir, args.out, name=args.name, train_state=fresh_train_state)
    source = "restored from hybrid_recipe.yaml" if result.restored_recipe else "from config.json"
    print(f"wrote {result.step_dir} from {result.target.architecture} (recipe {source})")
    print(f"continue pretraining: hybrid train {result.run_dir / 'recipe.yaml'}")
    if not args.verify:
        return 0
    report = verify_export(
        args.hf_dir, result.recipe.model, result.state, remote_code=result.target.remote_code
    )
    return _report(report, f"{result.run_dir} was written but does not match the HF model")


def _report(report: VerifyReport, failure: str) -> int:
    print(report.summary())
    if report.passed:
        return 0
    print(f"hybrid convert: {failure}", file=sys.stderr)
    return 1


__all__ = ["add_parser"]
