"""Deterministic blending of several sources by weight (Megatron-LM's `BlendedDataset`).

`blend_schedule` is Megatron's greedy interleaving: sample k goes to the source with the
largest deficit `weight_i * (k + 1) - count_i`, so after any prefix of n samples each source
has had within one sample of `weight_i * n`. `BlendedIndex` repeats that schedule in blocks,
which makes it cheap to jump to any global sample (for resuming) without replaying history.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLOCK = 1 << 16


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    return w / w.sum()


def blend_schedule(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blending of `size` samples.

    Returns (source [size] int32: which source sample k comes from,
             draw [size] int64: how many samples that source had given before k).
    """
    w = normalized_weights(weights).tolist()
    counts = [0] * len(w)
    source = np.empty(size, dtype=np.int32)
    draw = np.empty(size, dtype=np.int64)
    order = range(len(w))
    for k in range(size):
        best = max(order, key=lambda i: w[i] * (k + 1) - counts[i])
        source[k] = best
        draw[k] = counts[best]
        counts[best] += 1
    return source, draw


class BlendedIndex:
    """Maps global sample numbers to (source, draw number within that source).

    The greedy schedule of `block` samples repeats, so global sample g is position `g % block`
    of block `g // block`, and a source's draw number continues across blocks.
    """

    def __init__(self, weights: Sequence[float], block: int = BLOCK):
        self.num_sources = len(weights)
        self.block = block if self.num_sources > 1 else 1
        self.source, self.draw = blend_schedule(weights, self.block)
        self.per_block = np.bincount(self.source, minlength=self.num_sources).astype(np.int64)

    def __call__(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample numbers [n] -> (source [n] int32, draw number [n] int64)."""
        samples = np.asarray(samples, dtype=np.int64)
        blocks, pos = np.divmod(samples, self.block)
        source = self.source[pos]
        return source, blocks * self.per_block[source] + self.draw[pos]


__all__ = ["BlendedIndex", "blend_schedule", "normalized_weights"]
