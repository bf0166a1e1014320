"""Shard / unshard of canonical tensors (the contract TP/EP backends and checkpoints share)."""

import pytest
import torch

from hybrid.parallel import shard_spec
from hybrid.parallel.shard_spec import Shard


@pytest.mark.parametrize("world", [1, 2, 4])
def test_round_trip_with_sections(world: int) -> None:
    d_inner, gn, heads = 16, 8, 4
    spec = Shard(dim=0, sections=(d_inner, d_inner, gn, gn, heads))
    full = torch.randn(2 * d_inner + 2 * gn + heads, 6)
    parts = [shard_spec.shard(full, spec, r, world) for r in range(world)]
    assert all(p.shape[0] == full.shape[0] // world for p in parts)
    assert torch.equal(shard_spec.unshard(parts, spec), full)


def test_rank_keeps_its_piece_of_every_section() -> None:
    spec = Shard(dim=1, sections=(4, 2))
    full = torch.arange(6.0).expand(3, 6)
    # rank 1 of 2: second half of section 0 (cols 2, 3) and of section 1 (col 5)
    assert torch.equal(shard_spec.shard(full, spec, 1, 2)[0], torch.tensor([2.0, 3.0, 5.0]))


def test_indivisible_section_is_refused() -> None:
    with pytest.raises(ValueError, match="does not split over 2 ranks"):
        shard_spec.shard(torch.zeros(5), Shard(dim=0, sections=(3, 2)), 0, 2)
    with pytest.raises(ValueError, match="do not add up"):
        shard_spec.shard(torch.zeros(5), Shard(dim=0, sections=(2, 2)), 0, 1)


def test_mark_and_get() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    assert shard_spec.get(p) is None
    spec = Shard(dim=0, group="ep")
    assert shard_spec.get(shard_spec.mark(p, spec)) == spec


def test_nested_marks_list_their_levels_and_round_trip() -> None:
    """An expert weight (E, D, F): experts over "ep", then F over "tp" (expert tensor
    parallelism). Sharding level by level and unsharding in reverse gives the canonical tensor
    back, whichever (ep rank, tp rank) holds the piece."""
    ep, tp = Shard(dim=0, group="ep"), Shard(dim=2)
    spec = shard_spec.nest(ep, tp)
    assert shard_spec.levels(spec) == [ep, tp] and shard_spec.groups(spec) == ("ep", "tp")
    assert shard_spec.nest(None, tp) == tp and shard_spec.levels(None) == []
    full = torch.randn(4, 3, 8)
    pieces = {
        (e, t): shard_spec.shard(shard_spec.shard(full, ep, e, 2), tp, t, 2)
        for e in range(2)
        for t in range(2)
    }
    assert pieces[(1, 0)].shape == (2, 3, 4)
    assert torch.equal(pieces[(1, 0)], full[2:, :, :4])
    per_ep = [shard_spec.unshard([pieces[(e, t)] for t in range(2)], tp) for e in range(2)]
    assert torch.equal(shard_spec.unshard(per_ep, ep), full)


def test_nesting_refuses_a_split_dim_or_group_twice_and_one_level_helpers_refuse_nests() -> None:
    ep = Shard(dim=0, group="ep")
    with pytest.raises(ValueError, match="already splits"):
        shard_spec.nest(ep, Shard(dim=0))
    with pytest.raises(ValueError, match="already splits"):
        shard_spec.nest(ep, Shard(dim=1, group="ep"))
    with pytest.raises(ValueError, match="levels"):
        shard_spec.shard(torch.zeros(4, 4), shard_spec.nest(ep, Shard(dim=1)), 0, 2)
