"""Sampling: top-k / top-p filtering equals a naive per-row implementation, sampled frequencies
match the filtered softmax, temperature 0 is argmax, bad settings are ConfigErrors."""

import math

import pytest
import torch

from hybrid.infer.sampling import SamplingConfig, filter_logits, sample
from hybrid.recipe.schema import ConfigError


def naive_keep(row: list[float], top_k, top_p) -> set[int]:
    """Indices kept: the top-k by value (ties at the k-th value kept), then the most likely
    tokens until the probability ranked above a token reaches top_p."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep = set(order)
    if top_k is not None:
        kth = row[order[min(top_k, len(row)) - 1]]
        keep = {i for i in keep if row[i] >= kth}
    if top_p is not None:
        z = sum(math.exp(row[i]) for i in keep)
        above, nucleus = 0.0, set()
        for i in (j for j in order if j in keep):
            if above >= top_p:
                break
            nucleus.add(i)
            above += math.exp(row[i]) / z
        keep = nucleus
    return keep


@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (None, 0.5), (5, 0.8), (1, 0.3)])
def test_filter_equals_naive(top_k, top_p):
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = filter_logits(logits, top_k=top_k, top_p=top_p)
    for row, filtered in zip(logits.tolist(), out):
        kept = {i for i, v in enumerate(filtered.tolist()) if v != float("-inf")}
        assert kept == naive_keep(row, top_k, top_p)
        assert all(filtered[i].item() == pytest.approx(row[i]) for i in kept)


def test_sampled_frequencies_match_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]]).expand(40000, -1)
    cfg = SamplingConfig(temperature=0.7, top_k=4, top_p=0.9)
    ids = sample(logits, cfg, torch.Generator().manual_seed(0))
    expected = torch.softmax(filter_logits(logits[:1] / 0.7, top_k=4, top_p=0.9), -1)[0]
    freq = torch.bincount(ids, minlength=6).double() / len(ids)
    assert expected[4:].sum() == 0 and freq[4:].sum() == 0  # filtered tokens never drawn
    # 4 standard deviations of a frequency over 40000 draws is at most 0.01
    assert (freq - expected.double()).abs().max() < 0.01


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(sample(logits, SamplingConfig(temperature=0)), logits.argmax(-1))


@pytest.mark.parametrize(
    "kw,key",
    [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0}, "top_p")],
)
def test_bad_settings_are_config_errors(kw, key):
    with pytest.raises(ConfigError) as err:
        SamplingConfig(**kw)
    assert err.value.key == key
