"""Helpers of the launch tests: the debug recipe and a `cluster:` section on top of it."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEBUG_RECIPE = ROOT / "recipes" / "debug" / "hybrid-tiny.yaml"


def write_recipe(path: Path, cluster: dict | None = None, **sections) -> Path:
    """A recipe file that starts from the debug recipe (absolute `base:`) and adds `cluster`."""
    data = {"base": str(DEBUG_RECIPE), **sections}
    if cluster is not None:
        data["cluster"] = cluster
    path.write_text(yaml.safe_dump(data))
    return path
