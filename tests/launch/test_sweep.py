"""`--sweep` parsing, the Cartesian product, and run directory names."""

import pytest

from hybrid.launch.sweep import SweepAxis, expand, overrides_of, parse_sweep, run_dir_name
from hybrid.recipe.schema import ConfigError


def test_parse_and_expand():
    a = parse_sweep("model.layout.attention_ratio=1:3, 1:7,1:15")
    b = parse_sweep("train.optimizer.lr=1e-3,3e-3")
    assert a == SweepAxis("model.layout.attention_ratio", ("1:3", "1:7", "1:15"))
    combos = expand([a, b])
    assert len(combos) == 6
    assert combos[0] == (("model.layout.attention_ratio", "1:3"), ("train.optimizer.lr", "1e-3"))
    assert combos[1] == (("model.layout.attention_ratio", "1:3"), ("train.optimizer.lr", "3e-3"))
    assert combos[-1] == (("model.layout.attention_ratio", "1:15"), ("train.optimizer.lr", "3e-3"))
    assert overrides_of(combos[1]) == [
        "model.layout.attention_ratio=1:3",
        "train.optimizer.lr=3e-3",
    ]
    assert expand([]) == [()]


@pytest.mark.parametrize(
    "text,match",
    [
        ("train.steps", "expects key.path=v1,v2"),
        ("=1,2", "expects key.path=v1,v2"),
        ("train..steps=1", "expects key.path=v1,v2"),
        ("train.steps=", "empty value"),
        ("train.steps=1,,2", "empty value"),
        ("train.steps=1,1", "repeated"),
        ("cluster.nodes=1,2", "cannot differ"),
        ("cluster=x", "cannot differ"),
        ("train.run_dir=a,b", "cannot differ"),
    ],
)
def test_bad_sweeps(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_sweep(text)


def test_same_key_twice():
    with pytest.raises(ConfigError, match="given twice"):
        expand([parse_sweep("train.seed=1,2"), parse_sweep("train.seed=3")])


def test_run_dir_names_are_safe_and_unique():
    combos = expand([parse_sweep("model.layout.pattern=M*M*,M-M-*-,$(touch x);rm")])
    names = [run_dir_name(i, c) for i, c in enumerate(combos)]
    assert names == ["0-pattern=M_M_", "1-pattern=M-M-_-", "2-pattern=_touch_x_rm"]
    assert len(run_dir_name(7, (("a", "x" * 500),))) <= 96
