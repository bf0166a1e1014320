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
