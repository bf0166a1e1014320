"""Pipeline stages split by cost: optimal against brute force, count split for equal costs,
hybrid patterns split differently from a count split, explicit `|` stages, errors."""

from __future__ import annotations

import itertools
import random

import pytest

from hybrid.parallel.pipeline_split import (
    describe_split,
    layer_costs,
    split_by_cost,
    split_by_count,
    stage_ranges,
)
from hybrid.recipe.blocks import MoEConfig
from hybrid.recipe.layout import LayoutConfig
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError


def stage_costs(costs, ranges, first=0.0, last=0.0):
    out = [sum(costs[i] for i in r) for r in ranges]
    out[0] += first
    out[-1] += last
    return out


def brute_force_max(costs, stages, first=0.0, last=0.0):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        ranges = [range(bounds[k], bounds[k + 1]) for k in range(stages)]
        best = min(best, max(stage_costs(costs, ranges, first, last)))
    return best


def check_partition(ranges, n, stages):
    assert len(ranges) == stages
    assert ranges[0].start == 0 and ranges[-1].stop == n
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop == b.start
    assert all(len(r) > 0 for r in ranges)


@pytest.mark.parametrize("n", [1, 4, 7, 8, 12])
def test_equal_costs_split_by_count(n):
    for stages in range(1, n + 1):
        ranges = split_by_cost([2.5] * n, stages)
        check_partition(ranges, n, stages)
        assert ranges == split_by_count(n, stages)


def test_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 9)
        stages = rng.randint(1, n)
        costs = [rng.choice([1.0, 3.0, 7.5, 0.5]) * rng.randint(1, 4) for _ in range(n)]
        first, last = rng.choice([0.0, 2.0]), rng.choice([0.0, 5.0])
        ranges = split_by_cost(costs, stages, first=first, last=last)
        check_partition(ranges, n, stages)
        got = max(stage_costs(costs, ranges, first, last))
        assert got == pytest.approx(brute_force_max(costs, stages, first, last), rel=1e-12)


def test_hybrid_pattern_split_by_cost_differs_from_count():
    cfg = ModelConfig(
        d_model=256,
        vocab_size=1000,
        layout=LayoutConfig(pattern="MEMEM-M-"),
        moe=MoEConfig(n_experts=8, top_k=4),
    )
    costs, head = layer_costs(cfg, seq_len=2048)
    assert len(costs) == 8 and head == 3.0 * 2 * 256 * cfg.padded_vocab_size
    assert costs[1] > 3 * costs[5]  # an MoE layer (top-4) costs far more than an MLP
    by_cost = stage_ranges(cfg, 2, seq_len=2048)
    by_count = split_by_count(8, 2)
    assert by_cost != by_count
    assert describe_split(cfg, by_cost) == "MEM|EM-M-"
    assert max(stage_costs(costs, by_cost, last=head)) < max(
        stage_costs(costs, by_count, last=head)
    )


def test_explicit_stage_markers_are_kept():
    cfg = ModelConfig(d_model=64, vocab_size=100, layout=LayoutConfig(pattern="M-M|*-|M-"))
    assert stage_ranges(cfg, 3, seq_len=64) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ConfigError, match="marks 3 pipeline stages") as err:
        stage_ranges(cfg, 2, seq_len=64)
    assert err.value.key == "parallel.pp"


def test_more_stages_than_layers():
    with pytest.raises(ValueError, match="3 pipeline stages need at least 3 layers"):
        split_by_cost([1.0, 2.0], 3)
    cfg = ModelConfig(d_model=64, vocab_size=100, layout=LayoutConfig(pattern="M-"))
    with pytest.raises(ConfigError, match="need at least 4 layers") as err:
        stage_ranges(cfg, 4, seq_len=64)
    assert err.value.key == "parallel.pp"
    with pytest.raises(ValueError, match="at least one"):
        split_by_cost([1.0], 0)
    with pytest.raises(ValueError, match="non-negative"):
        split_by_cost([1.0, -1.0], 1)
