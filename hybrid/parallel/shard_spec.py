"""How a parameter of the single-device model is split over tensor- or expert-parallel ranks.

The model code stays single-device; a parallel backend replaces its tensors by local shards
and marks each sharded parameter with a `Shard`. Checkpoint code reads the marks to write and
read the canonical (unsharded) form, whatever the layout.

A `Shard` splits the canonical tensor along `dim`, which is a concatenation of `sections`
(canonical sizes; one section if None). Each section is split evenly over the `world` ranks
and rank r keeps the r-th piece of every section, concatenated in order. So Mamba-2's fused
`in_proj` (rows z | x | B | C | dt) keeps, on rank r, its heads of z and x, its groups of B and
C and its heads of dt, which is what the sharded mixer computes with.

    spec = Shard(dim=0, sections=(d_inner, d_inner, G * N, G * N, H))
    local = shard(full, spec, rank, world)
    full == unshard([shard(full, spec, r, world) for r in range(world)], spec)

A tensor split over two groups carries nested marks: `Shard(dim=0, group="ep",
then=Shard(dim=2))` is an expert weight (E, D, F) whose experts are split over the
expert-parallel group and, inside each rank's experts, whose hidden F is split over the
tensor-parallel group (expert tensor parallelism). `levels(spec)` lists the splits, outermost
first; each level splits a different dim, so the order of applying them does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

ATTR = "hybrid_shard"
# On a pipeline stage's own copy of a tied parameter: the canonical name of the original.
TIED_COPY_OF = "hybrid_tied_copy_of"


@dataclass(frozen=True)
class Shard:
    """dim: the split axis; sections: canonical sizes along it, each split evenly (None: the
    whole axis is one section); group: which process group splits it ("tp" tensor parallel,
    "ep" expert parallel); then: a further split of this rank's piece over another group,
    along another dim (None: this is the only one)."""

    dim: int
    sections: tuple[int, ...] | None = None
    group: str = "tp"
    then: Shard | None = None

    def section_sizes(self, full_size: int) -> tuple[int, ...]:
        sizes = self.sections if self.sections is not None else (full_size,)
        if sum(sizes) != full_size:
            raise ValueError(f"sections {sizes} do not add up to the axis size {full_size}")
        return sizes

    def check_divisible(self, full_size: int, world: int, what: str = "tensor") -> None:
        for size in self.section_sizes(full_size):
            if size % world:
                raise ValueError(
                    f"{what}: a section of {size} along dim {self.dim} does not split over "
                    f"{world} ranks"
                )


def _one_level(spec: Shard) -> None:
    if spec.then is not None:
        raise ValueError(f"{spec} is nested: shard or unshard each of its levels()")


def local_index(spec: Shard, full_size: int, rank: int, world: int) -> Tensor:
    """Indices along `spec.dim` of the canonical tensor that rank `rank` keeps, in order."""
    spec.check_divisible(full_size, world)
    pieces, start = [], 0
    for size in spec.section_sizes(full_size):
        step = size // world
        pieces.append(torch.arange(start + rank * step, start + (rank + 1) * step))
        start += size
    return torch.cat(pieces)


def shard(full: Tensor, spec: Shard, rank: int, world: int) -> Tensor:
    """Rank `rank`'s local piece of the canonical tensor `full` (a new contiguous tensor);
    one level of a nested mark at a time (`levels`)."""
    _one_level(spec)
    idx = local_index(spec, full.shape[spec.dim], rank, world).to(full.device)
    return full.index_select(spec.dim, idx).contiguous()


def unshard(locals_: list[Tensor], spec: Shard) -> Tensor:
    """The canonical tensor from every rank's local piece (rank order); one level at a time."""
    _one_level(spec)
    world = len(locals_)
    local_size = locals_[0].shape[spec.dim]
    full_size = local_size * world
    spec.check_divisible(full_size, world)
    out_shape = list(locals_[0].shape)
    out_shape[spec.dim] = full_size
    out = locals_[0].new_empty(out_shape)
    for rank, piece in enumerate(locals_):
        idx = local_index(spec, full_size, rank, world).to(piece.device)
        out.index_copy_(spec.dim, idx, piece)
    return out


def levels(spec: Shard | None) -> list[Shard]:
    """The single-group splits of a (possibly nested) mark, outermost first; [] for None."""
    out = []
    while spec is not None:
        out.append(replace(spec, then=None))
        spec = spec.then
    return out


def groups(spec: Shard | None) -> tuple[str, ...]:
    """The groups that split a tensor, outermost first (() when replicated)."""
    return tuple(level.group for level in levels(spec))


def nest(outer: Shard | None, inner: Shard) -> Shard:
    """`outer` further split by `inner` (a new innermost level); `inner` alone for None."""
    if outer is None:
        return inner
    taken = levels(outer)
    if inner.dim in {t.dim for t in taken} or inner.group in {t.group for t in taken}:
        raise ValueError(f"{inner} splits a dim or group that {outer} already splits")
    return replace(outer, then=nest(outer.then, inner) if outer.then else inner)


def mark(param: Tensor, spec: Shard) -> Tensor:
    """Record how `param` is sharded (read back by `get`)."""
    setattr(param, ATTR, spec)
    return param


def get(param: Tensor) -> Shard | None:
    """The `Shard` a backend marked `param` with, or None for a replicated tensor."""
    return getattr(param, ATTR, None)
