"""`to-hf`: one of our checkpoints -> a directory `AutoModelForCausalLM.from_pretrained` loads.

OUT_DIR receives config.json, generation_config.json, the weights (model.safetensors, or shards
and model.safetensors.index.json above the shard size), the tokenizer files, for remote-code
targets configuration_hybrid_lm.py and modeling_hybrid_lm.py, `hybrid_recipe.yaml` (the recipe,
so `from-hf` restores it exactly) and a README.md. Everything is written into a staging
directory beside OUT_DIR and moved into place at the end, so a failed export leaves no
half-written OUT_DIR; an existing non-empty OUT_DIR is replaced only with `force`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import uuid
from pathlib import Path

import torch
from torch import Tensor

from hybrid.convert._hf import require_transformers
from hybrid.convert.base import ExportSpec, StateReader, Target, all_targets
from hybrid.convert.checkpoints import OurCheckpoint, load_ours
from hybrid.convert.safetensors_io import (
    DEFAULT_MAX_SHARD,
    cast_state,
    parse_size,
    write_safetensors,
)
from hybrid.convert.tokenizer_files import write_tokenizer
from hybrid.recipe.layout import MOE
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.recipe import Recipe
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KEEP_FP32 = ("router.expert_bias",)  # selection-only bias: float32 in our model and in HF's
RECIPE_FILE = "hybrid_recipe.yaml"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """target: a registered target name (None: the first that fits); dtype: auto (as stored),
    fp32, bf16 or fp16; tokenizer: a tokenizer.json replacing the recipe's; dropless: export
    an MoE with a capacity factor as the dropless model; force: replace a non-empty OUT_DIR."""

    target: str | None = None
    dtype: str = "auto"
    max_shard_bytes: int = parse_size(DEFAULT_MAX_SHARD)
    tokenizer: str | None = None
    dropless: bool = False
    force: bool = False


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    target: Target
    refused: dict[str, list[str]]
    model: ModelConfig
    state: dict[str, Tensor]  # our canonical state exactly as exported (in the export dtype)
    tokenizer_note: str
    files: list[str]


def choose_target(cfg: ModelConfig, requested: str | None) -> tuple[Target, dict[str, list[str]]]:
    """The requested target, or the first registered one that represents `cfg` exactly; also
    the reasons the ones before it were refused. ConfigError naming every mismatch."""
    targets = all_targets()
    if requested is not None:
        if requested not in targets:
            raise ConfigError(f"--target {requested!r}: known targets are {', '.join(targets)}")
        problems = targets[requested].mismatches(cfg)
        if problems:
            raise ConfigError(
                f"--target {requested}: {targets[requested].architecture} cannot represent this "
                f"model exactly: {'; '.join(problems)}"
            )
        return targets[requested], {}
    refused: dict[str, list[str]] = {}
    for name, target in targets.items():
        problems = target.mismatches(cfg)
        if not problems:
            return target, refused
        refused[name] = problems
    raise ConfigError(f"no Hugging Face target can represent this model: {'; '.join(problems)}")


def _export_dtype(name: str, state: dict[str, Tensor]) -> torch.dtype:
    if name == "auto":
        return state["embed.weight"].dtype
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _dropless(recipe: Recipe, enabled: bool) -> Recipe:
    moe = recipe.model.moe
    uses_moe = any(s.symbol == MOE for s in recipe.model.layers())
    if not (enabled and uses_moe and moe.capacity_factor is not None):
        return recipe
    log.info("--dropless: exporting the MoE without capacity_factor=%g", moe.capacity_factor)
    model = dataclasses.replace(recipe.model, moe=dataclasses.replace(moe, capacity_factor=None))
    return dataclasses.replace(recipe, model=model)


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"{out_dir}: not empty; choose a new directory or pass --force")


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished staging directory to out_dir (replacing an existing one)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def _readme(src: OurCheckpoint, target: Target, dtype: torch.dtype, out_dir: Path, tok: str) -> str:
    remote = ", trust_remote_code=True" if target.remote_code else ""
    kind = "self-contained remote code" if target.remote_code else "the native transformers class"
    return (
        f"# {src.recipe.name}\n\nConverted by `hybrid convert to-hf` from {src.path} (step "
        f"{src.step}) to `{target.architecture}` ({kind}); weights in {str(dtype)[6:]}.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("{out_dir}"{remote})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{out_dir}")\n```\n\n'
        f"{tok[0].upper() + tok[1:]}.\n\n`{RECIPE_FILE}` is the recipe the model was trained "
        "with; `hybrid convert from-hf` turns this directory back into a hybrid checkpoint.\n"
    )


def _write_configs(target: Target, cfg: ModelConfig, spec: ExportSpec, dtype, tmp: Path) -> None:
    hf = require_transformers()
    hf_cfg = target.hf_config(cfg, spec)
    hf_cfg.architectures = [target.architecture]
    hf_cfg.dtype = dtype
    hf_cfg.save_pretrained(str(tmp))
    gen = hf.GenerationConfig.from_model_config(hf_cfg)
    gen.pad_token_id = spec.eos_token_id
    gen.save_pretrained(str(tmp))


def export_to_hf(
    checkpoint: str | Path, out_dir: str | Path, options: ExportOptions
) -> ExportResult:
    """Convert `checkpoint` (a run or step directory) into the HF model directory `out_dir`."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, options.force)
    src = load_ours(checkpoint)
    recipe = _dropless(src.recipe, options.dropless)
    cfg = recipe.model
    target, refused = choose_target(cfg, options.target)
    for name, problems in refused.items():
        log.info("not %s: %s", name, "; ".join(problems))
    log.info("target %s (%s)", target.name, target.architecture)
    dtype = _export_dtype(options.dtype, src.state)
    state = cast_state(src.state, dtype, KEEP_FP32)
    reader = StateReader(state, f"checkpoint {src.path}")
    hf_state = target.to_hf(reader, cfg)
    reader.finish()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        tok = write_tokenizer(recipe.data.tokenizer, tmp, options.tokenizer)
        if tok.eod_id >= cfg.padded_vocab_size:
            raise ConfigError(
                f"the tokenizer's end-of-document id {tok.eod_id} is outside the model's "
                f"{cfg.padded_vocab_size}-entry vocabulary; pass the model's --tokenizer"
            )
        spec = ExportSpec(eos_token_id=tok.eod_id, max_position_embeddings=recipe.train.seq_len)
        _write_configs(target, cfg, spec, dtype, tmp)
        files = write_safetensors(hf_state, tmp, options.max_shard_bytes)
        for name, text in target.extra_files().items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(_readme(src, target, dtype, out_dir, tok.note))
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, target, refused, cfg, state, tok.note, files)
