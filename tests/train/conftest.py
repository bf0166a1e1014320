"""Shared fixtures of the training tests: one private data cache for the session and a tiny
recipe (the Python standard library corpus, byte tokenizer) that trains in seconds on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

TINY = {
    "name": "tiny",
    "model": {
        "d_model": 64,
        "vocab_size": 257,
        "layout": {"pattern": "M-*EM-"},
        "mamba": {"d_state": 8, "head_dim": 16, "chunk_size": 16},
        "attention": {"n_heads": 4},
        "mlp": {"hidden_size": 128},
        "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 64},
    },
    "data": {"sources": [{"kind": "stdlib", "max_files": 40}], "valid_fraction": 0.1},
    "train": {
        "seq_len": 64,
        "micro_batch_size": 2,
        "global_batch": 4,
        "steps": 8,
        "seed": 7,
        "log_every": 1,
        "eval_every": 4,
        "eval_batches": 2,
        "save_every": 2,
        "optimizer": {"lr": 3.0e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
    },
}


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hybrid-cache")
    old = os.environ.get("HYBRID_CACHE")
    os.environ["HYBRID_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("HYBRID_CACHE", None)
    else:
        os.environ["HYBRID_CACHE"] = old


@pytest.fixture
def tiny_recipe_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path
