"""HF -> ours for models made by transformers itself, the way published checkpoints are saved:
our converted model must give the HF model's logits and greedy generations. Also: Granite's
multipliers are folded exactly and export back to the native class, and a converted run
continues training with `hybrid train` from the converted weights."""

from __future__ import annotations

import pytest
import torch
from convert_helpers import compare_with_hf

from hybrid.convert import ExportOptions, export_to_hf, import_from_hf
from hybrid.convert.checkpoints import load_ours
from hybrid.recipe.schema import ConfigError
from hybrid.train.fresh_state import fresh_train_state


def _perturbed(model):
    """Random-init HF model moved off its init (norms, D, dt_bias, correction biases)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "correction" in name:
                b.add_(0.1 * torch.randn_like(b))
    return model.eval()


MAMBA = {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_chunk_size": 8}


def _granite(transformers):
    cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=300, hidden_size=64, intermediate_size=32, shared_intermediate_size=48,
        num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        mamba_n_groups=2, position_embedding_type="nope", tie_word_embeddings=True,
        embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=6.0,
        attention_multiplier=0.0078125, rms_norm_eps=1e-5, **MAMBA,
    )  # fmt: skip
    return transformers.GraniteMoeHybridForCausalLM(cfg)


def _bamba(transformers):  # BambaConfig's own rotary default: half of each head
    cfg = transformers.BambaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], **MAMBA,
    )  # fmt: skip
    return transformers.BambaForCausalLM(cfg)


def _nemotron(transformers):  # the legacy config names of the published Nemotron-H
    cfg = transformers.NemotronHConfig(
        vocab_size=300, hidden_size=64, hybrid_override_pattern="M-M*E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8,
        mamba_head_dim=16, ssm_state_size=8, n_groups=2, mamba_chunk_size=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=40, routed_scaling_factor=2.5,
    )  # fmt: skip
    return transformers.NemotronHForCausalLM(cfg)


def _mamba2(transformers):
    cfg = transformers.Mamba2Config(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
        state_size=8, n_groups=2, chunk_size=8, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.Mamba2ForCausalLM(cfg)


BUILDERS = {"granite": _granite, "bamba": _bamba, "nemotron": _nemotron, "mamba2": _mamba2}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_published_layout_to_ours(tmp_path, name):
    import transformers

    hf_model = _perturbed(BUILDERS[name](transformers))
    hf_model.save_pretrained(tmp_path / "hf")
    result = import_from_hf(tmp_path / "hf", tmp_path / "ours", train_state=fresh_train_state)
    assert not result.restored_recipe
    assert result.recipe.model.padded_vocab_size == 300
    err, same_generation = compare_with_hf(hf_model, result.recipe, result.state)
    assert err < 1e-5, err
    assert same_generation


def test_granite_multipliers_fold_and_export_back_to_granite(tmp_path):
    import transformers

    hf_model = _perturbed(_granite(transformers))
    hf_model.save_pretrained(tmp_path / "hf")
    result = import_from_hf(tmp_path / "hf", tmp_path / "ours", train_state=fresh_train_state)
    # the residual stream is divided by embedding_multiplier=12: block norms get eps / 144
    assert result.recipe.model.norm_eps == pytest.approx(1e-5 / 144, rel=1e-9)
    back = export_to_hf(tmp_path / "ours", tmp_path / "hf2", ExportOptions())
    assert back.target.name == "granitemoehybrid"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf2")).eval()
    assert reloaded.config.embedding_multiplier == pytest.approx(12.0)
    tokens = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = hf_model(tokens).logits, reloaded(tokens).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_unsupported_hf_features_are_refused(tmp_path):
    import transformers

    cfg = transformers.NemotronHConfig(
        vocab_size=300, hidden_size=64, hybrid_override_pattern="M*E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16,
        ssm_state_size=8, n_groups=2, n_routed_experts=4, moe_latent_size=32,
    )  # fmt: skip
    transformers.NemotronHForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match="moe_latent_size"):
        import_from_hf(tmp_path / "hf", tmp_path / "ours", train_state=fresh_train_state)
    assert not (tmp_path / "ours").exists()


def test_converted_run_resumes_training(tmp_path):
    """`hybrid train` continues the converted run at step 0 from the converted weights."""
    import transformers

    from hybrid.recipe.recipe import load_recipe
    from hybrid.train.loop import train

    _perturbed(_mamba2(transformers)).save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    imported = import_from_hf(tmp_path / "hf", run, train_state=fresh_train_state)
    assert imported.step_dir.name == "step-00000000"
    recipe = load_recipe(
        run / "recipe.yaml",
        [
            "data.sources=[{kind: stdlib, max_files: 12}]",
            "train.seq_len=32",
            "train.micro_batch_size=2",
            "train.steps=2",
            "train.eval_every=0",
            "train.save_every=1",
        ],
    )
    result = train(recipe, resume="always", stop_at_step=1)
    assert result.run_dir == run and result.step == 1
    before, after = load_ours(imported.step_dir).state, load_ours(run).state
    # one AdamW step moves each weight by about lr (3e-4): far less than fresh init would
    for key, weight in before.items():
        assert (after[key] - weight).abs().max() < 1e-2, key
    assert any(not torch.equal(after[k], before[k]) for k in before)
