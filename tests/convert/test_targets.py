"""Target choice, refusals, the pieces of the converter, and the remote-code model's cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert_helpers import perturbed_model, save_run, tiny_recipe

from hybrid.convert import ExportOptions, choose_target, export_to_hf
from hybrid.convert.base import StateReader
from hybrid.convert.layers import GATED_NORM_EPS
from hybrid.convert.safetensors_io import parse_size, read_safetensors, write_safetensors
from hybrid.convert.targets.remote import QK_NORM_EPS
from hybrid.model import build_model
from hybrid.recipe.recipe import load_recipe
from hybrid.recipe.schema import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize(
    "name,target",
    [
        ("nemotron-h-8b", "nemotron_h"),
        ("bamba-9b", "bamba"),
        ("granite-4.0-h-tiny", "granitemoehybrid"),
        ("mamba2-2.7b", "mamba2"),
        ("jamba-v0.1", "hybrid_lm"),
        ("jamba-1to3-moe16", "hybrid_lm"),
    ],
)
def test_shipped_recipes_get_their_class(name, target):
    chosen, refused = choose_target(load_recipe(RECIPES / f"{name}.yaml").model, None)
    assert chosen.name == target
    assert all(reasons for reasons in refused.values())


def test_forced_target_names_every_semantic_difference():
    cfg = load_recipe(RECIPES / "jamba-v0.1.yaml").model
    with pytest.raises(ConfigError) as err:
        choose_target(cfg, "granitemoehybrid")
    text = str(err.value)
    assert "MoE in some layers only" in text and "no shared expert" in text
    assert "renormalize False" in text


def test_eps_constants_match_the_model():
    cfg = tiny_recipe("eps", {"layout": {"pattern": "M*"}, "attention": {"qk_norm": True}}).model
    model = build_model(cfg, device="meta")
    assert model.layers[0].mixer.norm.eps == GATED_NORM_EPS
    assert model.layers[1].mixer.q_norm.eps == QK_NORM_EPS


def test_state_reader_reports_missing_and_unused():
    reader = StateReader({"a": torch.zeros(1), "b": torch.zeros(1)}, "here")
    reader.take("a")
    with pytest.raises(ConfigError, match="here: tensor 'c' is missing"):
        reader.take("c")
    with pytest.raises(ConfigError, match="1 tensors have no place.*b"):
        reader.finish()


def test_sharded_safetensors_round_trip(tmp_path):
    tied = torch.randn(8, 4)
    state = {"a": tied, "b": tied, "c": torch.randn(30), "d": torch.arange(5)}
    files = write_safetensors(state, tmp_path, max_shard_bytes=130)
    assert "model.safetensors.index.json" in files and len(files) >= 3
    back = read_safetensors(tmp_path)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ConfigError):
        parse_size("-3GB")


def test_model_and_trainer_do_not_import_transformers():
    code = "import sys, hybrid.model, hybrid.train.loop, hybrid.cli, hybrid.convert; "
    code += "sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_missing_transformers_is_a_clear_error(monkeypatch):
    from hybrid.convert import _hf

    _hf.require_transformers.cache_clear()
    monkeypatch.setitem(sys.modules, "transformers", None)
    try:
        with pytest.raises(ConfigError, match=r"pip install 'hybrid\[hf\]'"):
            _hf.require_transformers()
    finally:
        _hf.require_transformers.cache_clear()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_export_keeps_the_correction_bias_fp32(tmp_path, dtype):
    from safetensors import safe_open

    moe = {"router": "sigmoid", "activation": "squared_relu", "n_shared_experts": 1}
    model_cfg = {"layout": {"pattern": "M*E"}, "attention": {"position": "none"}, "moe": moe}
    recipe = tiny_recipe("lowp", model_cfg)
    run = save_run(tmp_path / "run", recipe, perturbed_model(recipe))
    result = export_to_hf(run, tmp_path / "hf", ExportOptions(dtype=dtype))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        bias = f.get_tensor("backbone.layers.2.mixer.gate.e_score_correction_bias")
        embed = f.get_tensor("backbone.embeddings.weight")
    assert bias.dtype == torch.float32 and embed.dtype == {"bf16": torch.bfloat16}.get(
        dtype, torch.float16
    )
    assert result.state["layers.2.mixer.router.expert_bias"].dtype == torch.float32


@torch.no_grad()
def test_remote_code_generates_left_padded_batches_and_beams(tmp_path):
    """Left padding gives each row the tokens it gets alone; beam search with the cache (reordered
    per step) equals beam search recomputing the whole sequence."""
    from transformers import AutoModelForCausalLM

    model_cfg = {"layout": {"pattern": "M*EM-"}, "attention": {"qk_norm": True}}
    recipe = tiny_recipe("pad", model_cfg)
    run = save_run(tmp_path / "run", recipe, perturbed_model(recipe))
    export_to_hf(run, tmp_path / "hf", ExportOptions())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    hf.generation_config.eos_token_id = None
    long, short = torch.randint(0, 300, (1, 11)), torch.randint(0, 300, (1, 6))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    alone = [
        hf.generate(p, attention_mask=torch.ones_like(p), **kwargs)[0, -6:] for p in (long, short)
    ]
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    together = hf.generate(batch, attention_mask=mask, **kwargs)[:, -6:]
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])
    beams = {
        cached: hf.generate(
            long, attention_mask=torch.ones_like(long), num_beams=3, use_cache=cached, **kwargs
        )
        for cached in (True, False)
    }
    assert torch.equal(beams[True], beams[False])  # reordered cache == recomputing every step
