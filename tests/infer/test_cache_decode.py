"""Prefill + recurrent decoding through the hybrid cache equals the full forward pass, for every
debug recipe (fp32, relative error < 1e-5), for left-padded batches and for a sliding-window
ring buffer; the Mamba state does not grow with the context; the cache's bytes equal the figures
`hybrid inspect` reports; decode steps keep their tensors in place."""

import pytest
import torch
from infer_helpers import DEBUG_RECIPES, RECIPES, debug_model, rel, small_cfg

from hybrid.infer import HybridCache, decode_step, left_pad, prefill
from hybrid.model import build_model
from hybrid.recipe.analysis import model_figures
from hybrid.recipe.recipe import load_recipe


def prefill_then_decode(model, ids, split: int) -> torch.Tensor:
    """Logits (B, L-split+1, V) for positions split-1..L-2: prefill ids[:, :split], then one
    teacher-forced decode step per remaining token."""
    cache = HybridCache.allocate(model, ids.shape[0], ids.shape[1])
    outs = [prefill(model, ids[:, :split], cache)]
    for t in range(split, ids.shape[1] - 1):
        outs.append(decode_step(model, ids[:, t], cache))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("path", DEBUG_RECIPES, ids=lambda p: p.stem)
def test_prefill_and_decode_equal_full_forward_fp32(path):
    model = debug_model(path)
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    got = prefill_then_decode(model, ids, split=30)
    assert rel(got, full[:, 29:47]) < 1e-5


def test_left_padded_batch_equals_each_prompt_alone():
    model = debug_model(RECIPES / "debug" / "moe-tiny.yaml")
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 256, (n + 4,), generator=g).tolist() for n in (9, 23, 2)]
    prompts = [s[:-4] for s in seqs]
    ids, start = left_pad(prompts, pad_id=256)
    cache = HybridCache.allocate(model, 3, ids.shape[1] + 4)
    with torch.no_grad():
        got = [prefill(model, ids, cache, start)]
        for k in range(3):
            got.append(
                decode_step(
                    model, torch.tensor([s[len(p) + k] for s, p in zip(seqs, prompts)]), cache
                )
            )
        for row, (s, p) in enumerate(zip(seqs, prompts)):
            alone = model(torch.tensor([s])).logits[0, len(p) - 1 : len(p) + 3]
            assert rel(torch.stack([g_[row] for g_ in got]), alone) < 1e-5


@pytest.mark.parametrize("n_kv", [1, 2, 4])  # MQA, GQA (2 query heads per kv head), MHA
def test_grouped_query_decode_equals_full_forward(n_kv):
    cfg = small_cfg(attention={"n_heads": 4, "n_kv_heads": n_kv, "qk_norm": True})
    torch.manual_seed(0)
    model = build_model(cfg, dtype=torch.float64).eval()
    ids = torch.randint(0, 50, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
    assert rel(prefill_then_decode(model, ids, split=6), full[:, 5:14]) < 1e-10


def test_sliding_window_ring_buffer_equals_full_forward():
    cfg = small_cfg(attention={"n_heads": 4, "n_kv_heads": 2, "sliding_window": 5})
    torch.manual_seed(0)
    model = build_model(cfg, dtype=torch.float64).eval()
    ids = torch.randint(0, 50, (2, 21))
    cache = HybridCache.allocate(model, 2, 21)
    kv = [e for i, e in cache.layers.items() if cache.symbols[i] == "*"]
    assert kv and all(e.capacity == 5 for e in kv)  # a ring of the window, not max_len
    with torch.no_grad():
        full = model(ids).logits
    got = prefill_then_decode(model, ids, split=8)
    assert rel(got, full[:, 7:20]) < 1e-10


def test_mamba_state_size_does_not_depend_on_context():
    model = debug_model(RECIPES / "debug" / "hybrid-tiny.yaml")
    sizes = {}
    for context in (16, 64, 256):
        cache = HybridCache.allocate(model, 1, context)
        with torch.no_grad():
            prefill(model, torch.randint(0, 256, (1, context)), cache)
        sizes[context] = (cache.nbytes("M"), cache.nbytes("*"))
    mamba = {m for m, _ in sizes.values()}
    assert len(mamba) == 1 and mamba.pop() > 0
    assert sizes[64][1] == 4 * sizes[16][1] and sizes[256][1] == 16 * sizes[16][1]


@pytest.mark.parametrize(
    "path", [*DEBUG_RECIPES, RECIPES / "jamba-1to3-moe16.yaml"], ids=lambda p: p.stem
)
def test_cache_bytes_equal_inspect_figures(path):
    cfg = load_recipe(path).model
    model = build_model(cfg, device="meta")
    cache = HybridCache.allocate(model, 3, 1000, device="meta", dtype=torch.bfloat16)
    figures = model_figures(cfg, seq_len=1000, context=1000)
    assert cache.bytes_per_sequence() == figures.cache_bytes
    per_layer = {r.index: r.cache_bytes for r in figures.sublayers if r.cache_bytes}
    assert {i: n // 3 for i, n in cache.layer_bytes().items()} == per_layer


def test_decode_steps_write_in_place_with_static_shapes():
    model = debug_model(RECIPES / "debug" / "hybrid-tiny.yaml")
    cache = HybridCache.allocate(model, 2, 12)
    tensors = [t for e in cache.layers.values() for t in vars(e).values() if torch.is_tensor(t)]
    before = [(t.data_ptr(), tuple(t.shape)) for t in tensors]
    with torch.no_grad():
        prefill(model, torch.randint(0, 256, (2, 5)), cache)
        for _ in range(6):
            decode_step(model, torch.randint(0, 256, (2,)), cache)
    assert [(t.data_ptr(), tuple(t.shape)) for t in tensors] == before
    assert cache.length == 11 and int(cache.pos) == 11
    decode_step(model, torch.zeros(2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="full"):
        decode_step(model, torch.zeros(2, dtype=torch.long), cache)
