"""Fixtures of the launch tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_helpers import write_recipe


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    """The debug recipe with a small `cluster:` section (partition debug, 30 minutes)."""
    return write_recipe(tmp_path / "tiny.yaml", {"partition": "debug", "time": "00:30:00"})
