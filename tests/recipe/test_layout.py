"""The layout resolver: every form expands to the canonical Megatron-LM / Nemotron-H string."""

import pytest

from hybrid.recipe.layout import LayoutConfig, canonical_pattern, resolve_layout
from hybrid.recipe.schema import ConfigError


def pattern(**kw) -> str:
    return canonical_pattern(resolve_layout(LayoutConfig(**kw)))


def test_canonical_pattern_round_trips_and_ignores_whitespace():
    assert pattern(pattern="M-M-*-ME") == "M-M-*-ME"
    assert pattern(pattern="M- M-\n*E") == "M-M-*E"


def test_stage_boundaries_are_kept_and_numbered():
    specs = resolve_layout(LayoutConfig(pattern="M-M*|M-E*|MM"))
    assert canonical_pattern(specs) == "M-M*|M-E*|MM"
    assert [s.stage for s in specs] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert [s.index for s in specs] == list(range(10))


def test_block_repeat():
    assert pattern(block="M-M-M-*E", repeat=3) == "M-M-M-*E" * 3
    assert pattern(block="M-*-|", repeat=3) == "M-*-|M-*-|M-*-"  # one stage per block


def test_jamba_v01_period_offset_rules():
    # Jamba v0.1: 32 layers, attention at layer i % 8 == 4, MoE FFN at i % 2 == 1.
    out = pattern(n_layers=32, attention_every=8, attention_offset=4, moe_every=2, moe_offset=1)
    layers = [out[i : i + 2] for i in range(0, len(out), 2)]
    assert len(layers) == 32
    for i, (mixer, ffn) in enumerate(layers):
        assert mixer == ("*" if i % 8 == 4 else "M")
        assert ffn == ("E" if i % 2 == 1 else "-")


def test_jamba_1to3_moe_every_other():
    out = pattern(n_layers=8, attention_every=4, attention_offset=2, moe_every=2, moe_offset=1)
    assert out == "M-ME*-ME" * 2


def test_ffn_none_and_moe():
    assert pattern(n_layers=4, ffn="none") == "MMMM"
    assert pattern(n_layers=2, ffn="moe", attention_every=2, attention_offset=1) == "ME*E"


@pytest.mark.parametrize(
    "ratio,n,expected",
    [
        ("1:7", 8, "MMMM*MMM"),
        (0.125, 8, "MMMM*MMM"),
        ("1:3", 8, "MM*MM*MM"),
        (0.0, 4, "MMMM"),
    ],
)
def test_ratio_spreads_attention_like_megatron(ratio, n, expected):
    out = pattern(n_layers=n, attention_ratio=ratio, ffn="none")
    assert out == expected
    assert out.count("*") == round(n * (expected.count("*") / n))


def test_ratio_count_matches_request():
    out = pattern(n_layers=48, attention_ratio="1:7", ffn="none")
    assert out.count("*") == 6
    assert out[0] == "M" and out[-1] == "M"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("M-X*", "unknown symbol 'X' at position 2"),
        ("M-G*", "does not implement"),
        ("MM+", "does not implement"),
        ("M*/MM", "multi-token-prediction"),
        ("|M*", "stage boundary"),
        ("M*|", "stage boundary"),
        ("M||*", "stage boundary"),
        ("", "no sublayers"),
    ],
)
def test_bad_patterns_are_config_errors(text, needle):
    with pytest.raises(ConfigError, match=needle):
        LayoutConfig(pattern=text)


def test_exactly_one_form():
    with pytest.raises(ConfigError, match="exactly one"):
        LayoutConfig(pattern="MM", block="M*")
    with pytest.raises(ConfigError, match="exactly one"):
        LayoutConfig()


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(n_layers=4, attention_every=4, attention_offset=4), "attention_offset"),
        (dict(n_layers=4, attention_every=2, attention_ratio="1:1"), "attention_ratio"),
        (dict(n_layers=4, attention_ratio="one:seven"), "attention_ratio"),
        (dict(n_layers=4, attention_ratio=1.5), "attention_ratio"),
        (dict(n_layers=4, ffn="none", moe_every=2), "moe_every"),
        (dict(pattern="MM", attention_every=2), "attention_every"),
        (dict(pattern="MM", repeat=2), "repeat"),
        (dict(pattern="MM", ffn="none"), "ffn"),
        (dict(n_layers=4, moe_offset=1), "moe_offset"),
        (dict(n_layers=4, attention_offset=1), "attention_offset"),
    ],
)
def test_bad_rules_name_the_key(kw, key):
    with pytest.raises(ConfigError) as info:
        LayoutConfig(**kw)
    assert info.value.key == key
