"""Batched generation: greedy output is what the full forward pass picks token by token
(a naive decoder without a cache), rows stop at the end-of-document id, padded vocabulary ids are
never produced, a fixed seed gives the same samples."""

import torch
from infer_helpers import RECIPES, debug_model, small_cfg

from hybrid.infer import SamplingConfig, generate
from hybrid.model import build_model

GREEDY = SamplingConfig(temperature=0)


def naive_greedy(model, prompt: list[int], n: int, vocab: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1, :vocab].argmax()))
    return seq[len(prompt) :]


def test_greedy_generation_equals_naive_decoding():
    torch.manual_seed(0)
    model = build_model(small_cfg(), dtype=torch.float64).eval()
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8]]
    out = generate(model, prompts, max_new_tokens=9, sampling=GREEDY, vocab_size=50)
    assert out.tokens == [naive_greedy(model, p, 9, 50) for p in prompts]
    assert out.decode_steps == 8 and out.cache_bytes_per_sequence > 0


def test_rows_stop_at_eod_and_padded_ids_are_never_produced():
    model = debug_model(RECIPES / "debug" / "hybrid-tiny.yaml", seed=3)
    with torch.no_grad():  # make the two padded ids (>= 257) win every argmax
        w = model.lm_head.weight
        w[-1], w[-2] = 100 * w[0], -100 * w[0]
    free = generate(model, [[1, 2, 3]], max_new_tokens=6, sampling=GREEDY)
    assert all(t >= 257 for t in free.tokens[0])
    capped = generate(model, [[1, 2, 3], [7]], max_new_tokens=6, sampling=GREEDY, vocab_size=257)
    assert all(t < 257 for row in capped.tokens for t in row)
    first = capped.tokens[0]
    stop = first[3]
    out = generate(
        model, [[1, 2, 3]], max_new_tokens=6, sampling=GREEDY, vocab_size=257, eod_id=stop
    )
    assert out.tokens[0] == first[: first.index(stop)] and out.finished == [True]


def test_sampling_is_reproducible_from_the_seed():
    model = debug_model(RECIPES / "debug" / "mamba-tiny.yaml")
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, [[10, 20], [30]], max_new_tokens=8, sampling=cfg, generator=g).tokens

    assert run(1) == run(1) and run(1) != run(2)
