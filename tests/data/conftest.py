"""Shared fixtures of the data tests: a private cache directory and a small corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import random_texts, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Point HYBRID_CACHE at a fresh directory so no test touches ~/.cache/hybrid."""
    cache = tmp_path / "hybrid-cache"
    monkeypatch.setenv("HYBRID_CACHE", str(cache))
    return cache


@pytest.fixture
def corpus_jsonl(tmp_path) -> Path:
    """200 random word documents, one empty document and one with non-ASCII text."""
    texts = random_texts(200, seed=1) + ["", "héllo wörld ✓ 日本語\n"]
    return write_jsonl(tmp_path / "corpus.jsonl", texts)
