"""Shared fixtures of the evaluation tests: a private data cache."""

import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Point HYBRID_CACHE at a fresh directory so no test touches ~/.cache/hybrid."""
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path / "hybrid-cache"))
