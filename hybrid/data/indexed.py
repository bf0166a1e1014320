"""Megatron-LM's memory-mapped indexed dataset format (`PREFIX.bin` + `PREFIX.idx`).

`.bin` holds the tokens of every sequence back to back in one dtype. `.idx` (little endian):

    b"MMIDIDX\\x00\\x00"            9-byte magic
    <Q  version = 1
    <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q  sequence count S
    <Q  document count D+1 (entries of `document_indices`)
    int32[S]    sequence lengths (tokens)
    int64[S]    sequence pointers (byte offsets into .bin)
    int64[D+1]  document indices: 0, then the sequence index after each document's last sequence

As in Megatron-LM's `megatron/core/datasets/indexed_dataset.py`, files we write are readable by
`megatron.core.datasets.indexed_dataset.IndexedDataset` and vice versa. We write one sequence per
document (Megatron's `preprocess_data.py` without sentence splitting).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from hybrid.recipe.schema import ConfigError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def dtype_for_vocab(vocab_size: int | None) -> type[np.number]:
    """Megatron's choice (`DType.optimal_dtype`): uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def exists(prefix: str | os.PathLike) -> bool:
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


class IndexedDatasetWriter:
    """Streams documents to `PREFIX.bin`; `finalize()` writes `PREFIX.idx`.

    Both files are written under temporary names and renamed into place by `finalize()`, so a
    reader never sees a half-written dataset. Use as a context manager to clean up on error.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number] | np.dtype = np.int32):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported dtype {self.dtype}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = f".tmp-{os.getpid()}-{id(self):x}"
        self._bin = open(bin_path(self.prefix) + self._tmp, "wb")  # noqa: SIM115
        self._lengths: list[int] = []
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self.num_tokens = 0

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document (one sequence) of token ids."""
        array = np.asarray(tokens)
        self.add_documents(array, np.array([array.size], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: `tokens` concatenated, `lengths` per document."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"documents must be 1-D, got shape {tokens.shape}")
        if int(np.sum(lengths)) != tokens.size:
            raise ValueError(f"lengths sum to {int(np.sum(lengths))}, tokens are {tokens.size}")
        if tokens.size and self._info is not None:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(f"token ids {lo}..{hi} do not fit {self.dtype}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.extend(int(n) for n in lengths)
        self.num_tokens += int(tokens.size)

    def finalize(self) -> None:
        """Write the index and move both files into place."""
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(idx_path(self.prefix) + self._tmp, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(documents)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))
        os.replace(bin_path(self.prefix) + self._tmp, bin_path(self.prefix))
        os.replace(idx_path(self.prefix) + self._tmp, idx_path(self.prefix))

    def abort(self) -> None:
        """Close and delete the temporary files."""
        self._bin.close()
        for path in (bin_path(self.prefix), idx_path(self.prefix)):
            if os.path.exists(path + self._tmp):
                os.remove(path + self._tmp)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader. `ds[i]` is sequence i (a read-only numpy view of `.bin`);
    `tokens` is all of `.bin` as one 1-D array; `document_offsets[d]:document_offsets[d+1]` is
    document d's token range in it (Megatron's files store sequences contiguously)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        if not exists(self.prefix):
            raise ConfigError(f"no indexed dataset at {self.prefix} (.bin and .idx needed)")
        header = _read_header(idx_path(self.prefix))
        self.dtype, sequence_count, document_count = header
        index = np.memmap(idx_path(self.prefix), dtype=np.uint8, mode="r")
        offset = _HEADER_BYTES
        self.sequence_lengths = np.frombuffer(index, np.int32, sequence_count, offset)
        offset += 4 * sequence_count
        self.sequence_pointers = np.frombuffer(index, np.int64, sequence_count, offset)
        offset += 8 * sequence_count
        self.document_indices = np.frombuffer(index, np.int64, document_count, offset)
        size = os.path.getsize(bin_path(self.prefix))
        if size == 0:
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(bin_path(self.prefix), dtype=self.dtype, mode="r")
        self._check()
        starts = self.sequence_pointers // self.dtype.itemsize
        self.sequence_offsets = np.append(starts, len(self.tokens)).astype(np.int64)
        self.document_offsets = self.sequence_offsets[self.document_indices]

    def _check(self) -> None:
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        ok = len(self.document_indices) >= 1 and self.document_indices[-1] == len(lengths)
        total = int(lengths.sum(dtype=np.int64))
        ok = ok and total * self.dtype.itemsize == os.path.getsize(bin_path(self.prefix))
        expected = np.cumsum(lengths, dtype=np.int64) - lengths  # each sequence's start
        ok = ok and np.array_equal(pointers, expected * self.dtype.itemsize)
        if not ok:
            raise ConfigError(f"{self.prefix}: .idx does not match .bin (corrupt or truncated?)")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start, stop = self.sequence_offsets[i], self.sequence_offsets[i + 1]
        return self.tokens[start:stop]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document(self, d: int) -> np.ndarray:
        """The tokens of document d (all its sequences)."""
        return self.tokens[self.document_offsets[d] : self.document_offsets[d + 1]]

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, documents={self.num_documents}, "
            f"tokens={self.num_tokens}, dtype={self.dtype})"
        )


def _read_header(path: str) -> tuple[np.dtype, int, int]:
    with open(path, "rb") as f:
        raw = f.read(_HEADER_BYTES)
    if len(raw) < _HEADER_BYTES or raw[:9] != INDEX_HEADER:
        raise ConfigError(f"{path} is not a Megatron MMIDIDX index file")
    version, code, sequences, documents = struct.unpack("<QBQQ", raw[9:])
    if version != INDEX_VERSION:
        raise ConfigError(f"{path}: unsupported index version {version}")
    if code not in DTYPE_CODES:
        raise ConfigError(f"{path}: unknown dtype code {code}")
    return np.dtype(DTYPE_CODES[code]), sequences, documents


__all__ = [
    "IndexedDataset",
    "IndexedDatasetWriter",
    "bin_path",
    "dtype_for_vocab",
    "exists",
    "idx_path",
]
