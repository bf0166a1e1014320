"""The four recall-probe recipes have equal parameter counts within 10% by `hybrid inspect`'s
figures, and differ only in where attention is."""

import json
from pathlib import Path

from hybrid.cli import main

PROBES = Path(__file__).resolve().parents[2] / "recipes" / "probes"
NAMES = ("mamba", "hybrid-1to7", "hybrid-1to3", "attention")


def test_probe_recipes_have_equal_size_within_ten_percent(capsys):
    figures = {}
    for name in NAMES:
        assert main(["inspect", str(PROBES / f"{name}.yaml"), "--json"]) == 0
        figures[name] = json.loads(capsys.readouterr().out)
    sizes = [figures[n]["params_total"] for n in NAMES]
    assert max(sizes) / min(sizes) < 1.10, sizes
    attention = {n: figures[n]["pattern"].count("*") for n in NAMES}
    assert attention == {"mamba": 0, "hybrid-1to7": 1, "hybrid-1to3": 2, "attention": 8}
    assert all(len(figures[n]["pattern"]) == 16 for n in NAMES)
