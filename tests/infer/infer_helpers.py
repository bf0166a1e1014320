"""Helpers shared by the inference tests."""

from pathlib import Path

import torch

from hybrid.model import build_model
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.recipe import load_recipe
from hybrid.recipe.schema import from_dict

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DEBUG_RECIPES = sorted((RECIPES / "debug").glob("*-tiny.yaml"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the max abs of the reference."""
    return ((a - b).abs().max() / b.abs().max()).item()


def debug_model(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load_recipe(path).model, dtype=dtype).eval()


def small_cfg(**kw) -> ModelConfig:
    base = {
        "d_model": 32,
        "vocab_size": 50,
        "pad_vocab_multiple": 16,
        "layout": {"pattern": "M-*EM-*-"},
        "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 8, "n_groups": 2},
        "attention": {"n_heads": 4, "n_kv_heads": 2},
        "mlp": {"hidden_size": 48},
        "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 24},
    }
    base.update(kw)
    return from_dict(ModelConfig, base)
