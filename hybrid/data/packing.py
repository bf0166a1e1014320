"""Packing documents into fixed-length training samples, keeping document boundaries.

Documents, each ending with the end-of-document (EOD) id, lie back to back in one token stream
(the `.bin` of an indexed dataset). As in Megatron-LM's GPT dataset, sample i is the window
`stream[i*L : i*L + L + 1]` (L = seq_len): rows of L+1 tokens, consecutive rows sharing one
token, so every token after the first is a label exactly once and documents may span rows.

A batch is (B = micro batch, L = seq_len):
    input_ids  int64 [B, L]  row[:, :-1]
    labels     int64 [B, L]  row[:, 1:]; with `eod_mask_loss`, -100 where input_ids is EOD;
                             with a loss mask (generated sources), -100 where the target
                             token's mask is 0
    seq_idx    int32 [B, L]  document index within the row: 0 at the start, +1 at the first
                             token after each EOD (the model resets attention and Mamba state
                             there)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hybrid.recipe.schema import ConfigError

IGNORE_INDEX = -100
_CHECK_DOCS = 10_000
_CHECK_TOKENS = 1 << 22


class PackedDataset:
    """Fixed-length samples over `tokens[start:end]` (a 1-D, usually memory-mapped, array)."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        *,
        start: int = 0,
        end: int | None = None,
        name: str = "",
        loss_mask: np.ndarray | None = None,
    ):
        if seq_len < 1:
            raise ValueError("seq_len must be positive")
        end = len(tokens) if end is None else end
        self.stream = tokens[start:end]
        self.mask_stream = None if loss_mask is None else loss_mask[start:end]
        if self.mask_stream is not None and len(self.mask_stream) != len(self.stream):
            raise ValueError(f"{name}: the loss mask does not match the tokens")
        self.seq_len = seq_len
        self.name = name
        self.num_samples = max(0, (len(self.stream) - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def row(self, i: int) -> np.ndarray:
        """Tokens of sample i: [seq_len + 1], a view into the stream."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        start = i * self.seq_len
        return self.stream[start : start + self.seq_len + 1]

    def mask_row(self, i: int) -> np.ndarray:
        """Loss mask of sample i: [seq_len + 1], 1 where a token is to be predicted (all ones
        without a mask)."""
        if self.mask_stream is None:
            return np.ones(self.seq_len + 1, dtype=np.uint8)
        self.row(i)  # bounds check
        start = i * self.seq_len
        return self.mask_stream[start : start + self.seq_len + 1]

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Samples `indices` stacked: int64 [len(indices), seq_len + 1]."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for j, i in enumerate(indices):
            out[j] = self.row(int(i))
        return out


def make_batch(
    rows: np.ndarray,
    eod_id: int,
    eod_mask_loss: bool = False,
    loss_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """`rows` int [B, L+1] -> {"input_ids", "labels", "seq_idx"} numpy arrays of [B, L].
    `loss_mask` [B, L+1]: 0 where a token of `rows` is not to be predicted (no label)."""
    rows = np.asarray(rows, dtype=np.int64)
    input_ids = rows[:, :-1]
    labels = rows[:, 1:].copy()
    if loss_mask is not None:
        labels[np.asarray(loss_mask)[:, 1:] == 0] = IGNORE_INDEX
    is_eod = input_ids == eod_id
    seq_idx = np.zeros(input_ids.shape, dtype=np.int32)
    np.cumsum(is_eod[:, :-1], axis=1, dtype=np.int32, out=seq_idx[:, 1:])
    if eod_mask_loss:
        labels[is_eod] = IGNORE_INDEX
    return {"input_ids": np.ascontiguousarray(input_ids), "labels": labels, "seq_idx": seq_idx}


def check_eod_terminated(
    tokens: np.ndarray,
    document_offsets: np.ndarray,
    eod_id: int,
    vocab_size: int,
    name: str,
) -> None:
    """Raise a ConfigError unless documents end with `eod_id` and ids are below `vocab_size`.

    Checks the first 10k documents and the first 4M tokens only, to stay cheap on huge data.
    """
    ends = np.asarray(document_offsets[1 : _CHECK_DOCS + 1], dtype=np.int64)
    starts = np.asarray(document_offsets[: len(ends)], dtype=np.int64)
    ends = ends[ends > starts]  # empty documents have no last token
    if len(ends) and not np.all(tokens[ends - 1] == eod_id):
        bad = int(np.count_nonzero(tokens[ends - 1] != eod_id))
        raise ConfigError(
            f"{name}: {bad} of the first {len(ends)} documents do not end with the "
            f"end-of-document id {eod_id}; prepare it with `hybrid data prepare` (or Megatron's "
            "preprocess_data.py --append-eod) and the same tokenizer"
        )
    head = np.asarray(tokens[:_CHECK_TOKENS])
    if head.size and int(head.max()) >= vocab_size:
        raise ConfigError(
            f"{name}: token id {int(head.max())} is outside the tokenizer's vocabulary "
            f"({vocab_size}); was it prepared with another tokenizer?"
        )


__all__ = ["IGNORE_INDEX", "PackedDataset", "check_eod_terminated", "make_batch"]
