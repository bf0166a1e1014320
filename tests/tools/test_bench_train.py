"""tools/bench_train.py at tiny sizes on CPU: the reported numbers are consistent (tokens/s from
the step time, MFU from the given FLOPs per token and matmul rate), the whole command runs with
the baseline for a recipe without Mamba layers, and the baseline's parameter count equals ours
(the Mamba-2 piece only where mamba_ssm is importable)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hybrid.model import build_model
from hybrid.recipe.recipe import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]
HYBRID_TINY = ROOT / "recipes" / "debug" / "hybrid-tiny.yaml"


@pytest.fixture(scope="module")
def bench(load_tool):
    return load_tool("bench_train")


@pytest.fixture(scope="module")
def baseline(load_tool):
    return load_tool("bench_baseline")


def tiny_setup(bench, recipe, *, batch=2, seq_len=32, rate=1e9):
    return bench.BenchSetup(
        recipe=recipe,
        device=torch.device("cpu"),
        batch=batch,
        seq_len=seq_len,
        steps=2,
        warmup=1,
        flops_per_token=12345.0,
        matmul_rate=rate,
        nominal_peak=None,
    )


def test_measured_numbers_are_consistent(bench, capsys):
    s = tiny_setup(bench, load_recipe(HYBRID_TINY))
    r = bench.bench_ours(s, activation_checkpointing="none", compile=False)
    assert r.model == "hybrid" and r.steps == 2 and r.batch == 2 and r.seq_len == 32
    assert r.params == build_model(s.recipe.model, device="meta").num_params()
    assert r.step_ms > 0 and r.peak_gb > 0
    assert r.tokens_per_s == pytest.approx(2 * 32 / (r.step_ms / 1e3), rel=1e-9)
    assert r.mfu_measured == pytest.approx(r.tokens_per_s * 12345.0 / 1e9, rel=1e-9)
    assert r.mfu_nominal is None
    assert "hybrid: step 2/2" in capsys.readouterr().err


def test_selective_checkpointing_runs(bench):
    s = tiny_setup(bench, load_recipe(HYBRID_TINY))
    r = bench.bench_ours(s, activation_checkpointing="selective", compile=False)
    assert r.tokens_per_s > 0


def test_matmul_rate_is_positive(bench):
    assert bench.measure_matmul_rate(torch.device("cpu"), 64) > 0


def no_mamba_recipe():
    """A tiny recipe with attention, MLP and MoE sublayers (no `M`), untied head, GQA, biases."""
    return recipe_from_dict(
        {
            "name": "tiny-no-mamba",
            "model": {
                "d_model": 64,
                "vocab_size": 200,
                "layout": {"pattern": "*-*E"},
                "attention": {"n_heads": 4, "n_kv_heads": 2, "bias": True},
                "mlp": {"hidden_size": 96},
                "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 48},
            },
            "train": {"seq_len": 24, "micro_batch_size": 2},
        }
    )


@pytest.mark.parametrize("tie", [False, True])
def test_baseline_counts_match_ours_without_mamba(baseline, tie):
    recipe = no_mamba_recipe()
    cfg = recipe.model
    cfg.tie_embeddings = tie
    ours = build_model(cfg, device="meta").num_params()
    assert baseline.num_params(baseline.build_baseline(cfg, device="meta")) == ours


def test_baseline_mamba_count_or_clear_error(baseline):
    cfg = load_recipe(HYBRID_TINY).model
    if importlib.util.find_spec("mamba_ssm") is None:
        with pytest.raises(baseline.PeerUnavailableError, match="mamba_ssm is not installed"):
            baseline.build_baseline(cfg, device="meta")
        pytest.skip("mamba_ssm is not installed: the Mamba-2 piece is counted on the GPU image")
    ours = build_model(cfg, device="meta").num_params()
    assert baseline.num_params(baseline.build_baseline(cfg, device="meta")) == ours


def test_baseline_trains_and_main_writes_table_and_json(bench, tmp_path, capsys, monkeypatch):
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(no_mamba_recipe().to_yaml())
    out = tmp_path / "bench.json"
    argv = [str(recipe_path), "--device", "cpu", "--steps", "2", "--warmup", "1"]
    argv += ["--matmul-size", "64", "--json", str(out)]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    assert "| hybrid |" in table and "| baseline |" in table and "ours / baseline" in table
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["results"]}
    assert rows["hybrid"]["params"] == rows["baseline"]["params"]
    for r in rows.values():
        assert r["tokens_per_s"] == pytest.approx(2 * 24 / (r["step_ms"] / 1e3), rel=1e-9)
        expected = r["tokens_per_s"] * data["flops_per_token"] / data["matmul_rate"]
        assert r["mfu_measured"] == pytest.approx(expected, rel=1e-9)
