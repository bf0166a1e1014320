"""Shared settings of the conversion tests: Hugging Face never goes online, and the dynamic
modules of remote-code models are cached in a private directory (not ~/.cache)."""

from __future__ import annotations

import os
import tempfile

import pytest

# Read by transformers when it is first imported, which happens inside these tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hybrid-hf-modules-"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """HYBRID_CACHE in the test's directory (the resume test prepares data)."""
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path / "hybrid-cache"))
