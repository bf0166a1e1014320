"""Tiny models for the conversion tests: recipes, perturbed weights, saved runs, and the
comparisons every test makes (logits, greedy decoding, exact round trips)."""

from __future__ import annotations

from pathlib import Path

import torch

from hybrid.checkpoint.store import save_checkpoint
from hybrid.convert.verify import build_ours, greedy_decode
from hybrid.model import build_model
from hybrid.recipe.recipe import Recipe, recipe_from_dict

# d_model 64; vocab 300 holds the byte tokenizer's 257 ids; chunk 8 so 40 tokens span chunks.
BASE = {
    "d_model": 64,
    "vocab_size": 300,
    "pad_vocab_multiple": 16,
    "mamba": {"d_state": 8, "head_dim": 16, "chunk_size": 8},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "mlp": {"hidden_size": 96},
    "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 32},
}


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def tiny_recipe(name: str, model: dict, **sections) -> Recipe:
    return recipe_from_dict(
        {"name": name, "model": merged(BASE, model), "train": {"seq_len": 64}, **sections}
    )


def perturbed_model(recipe: Recipe, seed: int = 0) -> torch.nn.Module:
    """Our model with every parameter and float buffer moved off its init (norm weights away
    from 1, biases and the router's correction bias away from 0), so a swapped or dropped
    tensor shows in the logits."""
    torch.manual_seed(seed)
    model = build_model(recipe.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(0.1 * torch.randn_like(b))
    return model.eval()


def save_run(run_dir: Path, recipe: Recipe, model: torch.nn.Module, step: int = 3) -> Path:
    save_checkpoint(
        run_dir, step, model_state=model.state_dict(), train_state={}, recipe=recipe.to_dict()
    )
    return run_dir


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@torch.no_grad()
def compare_with_hf(hf_model, recipe: Recipe, state: dict, *, seed: int = 1) -> tuple[float, bool]:
    """(max relative logits error on 2x40 random tokens, HF greedy generate == our recurrent
    decoding for 10 tokens after a 9-token prompt)."""
    ours = build_ours(recipe.model, state)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, recipe.model.vocab_size, (2, 40), generator=gen)
    err = rel_error(hf_model(input_ids=tokens).logits, ours(tokens).logits)
    prompt = tokens[:, :9]
    ours_new, _ = greedy_decode(ours, prompt, 10)
    hf_model.generation_config.eos_token_id = None  # greedy through EOS, as ours
    hf_new = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
    )[:, 9:]
    # our decoding must also be the argmax of a full forward over its own output
    full = ours(torch.cat([prompt, ours_new], 1)).logits[:, 8:-1].argmax(-1)
    assert torch.equal(full, ours_new)
    return err, torch.equal(ours_new, hf_new)


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
