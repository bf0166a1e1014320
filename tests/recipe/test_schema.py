"""YAML dict -> typed dataclasses: type checks, unknown keys with suggestions, key paths."""

import math
from dataclasses import dataclass, field
from typing import Literal

import pytest

from hybrid.recipe.blocks import AttentionConfig, Mamba2Config, MoEConfig
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError, check, from_dict, to_dict


@dataclass(kw_only=True)
class Inner:
    size: int = 1
    rate: float = 0.5
    kind: Literal["a", "b"] = "a"
    pair: tuple[float, float] = (0.0, 1.0)
    maybe: int | None = None

    def __post_init__(self):
        check(self.size > 0, "size", "must be positive")


@dataclass(kw_only=True)
class Outer:
    name: str = "x"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    items: list[int] = field(default_factory=list)


def test_round_trip():
    obj = from_dict(Outer, {"name": "n", "flag": True, "inner": {"size": 3, "pair": [1, 2]}})
    assert obj.inner.size == 3 and obj.inner.pair == (1.0, 2.0)
    assert from_dict(Outer, to_dict(obj)) == obj


def test_numbers_from_yaml_strings_and_ints_as_floats():
    obj = from_dict(Inner, {"size": "1e3", "rate": 2})
    assert obj.size == 1000 and obj.rate == 2.0 and isinstance(obj.rate, float)


@pytest.mark.parametrize(
    "data,key,needle",
    [
        ({"inner": {"szie": 2}}, "inner.szie", "did you mean 'size'"),
        ({"inner": {"size": "big"}}, "inner.size", "expected int"),
        ({"inner": {"size": 1.5}}, "inner.size", "expected an integer"),
        ({"inner": {"size": True}}, "inner.size", "expected int"),
        ({"flag": 1}, "flag", "expected true or false"),
        ({"inner": {"kind": "c"}}, "inner.kind", "not one of"),
        ({"inner": {"pair": [1]}}, "inner.pair", "list of 2"),
        ({"inner": {"size": 0}}, "inner.size", "must be positive"),
        ({"inner": 5}, "inner", "expected a mapping"),
        ({"items": [1, "x"]}, "items[1]", "expected int"),
    ],
)
def test_errors_name_the_key_path(data, key, needle):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert info.value.key == key
    assert needle in str(info.value)


def test_model_config_cross_checks():
    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {"d_model": 96, "attention": {"n_heads": 7}})
    assert info.value.key == "attention.n_heads"
    with pytest.raises(ConfigError) as info:
        from_dict(
            ModelConfig, {"d_model": 80, "layout": {"pattern": "MM"}, "mamba": {"head_dim": 64}}
        )
    assert info.value.key == "mamba.head_dim"
    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {"d_model": 128, "mamba": {"head_dim": 32, "n_groups": 3}})
    assert info.value.key == "mamba.n_groups"


def test_block_config_ranges():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        AttentionConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="dt_min"):
        Mamba2Config(dt_min=0.2, dt_max=0.1)
    assert Mamba2Config().dt_limit == (0.0, math.inf)
