"""Tokenise documents into a Megatron-format indexed dataset, with worker processes.

Documents are cut into chunks that worker processes tokenise; results are consumed in
submission order, so the output is byte-identical whatever the number of workers. Each
document gets the end-of-document id appended; documents with no tokens are skipped.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from hybrid.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from hybrid.data.tokenizer import HFTokenizer, Tokenizer, build_tokenizer
from hybrid.recipe.data_config import TokenizerConfig

CHUNK_DOCS = 256
CHUNK_CHARS = 4 << 20

Chunk = tuple[np.ndarray, np.ndarray]  # (tokens of all kept documents, their lengths)


@dataclass
class PrepareStats:
    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def summary(self, output: str) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        skipped = f", {self.skipped:,} empty skipped" if self.skipped else ""
        return (
            f"wrote {output}.bin/.idx: {self.documents:,} documents{skipped}, "
            f"{self.tokens:,} tokens in {self.seconds:.1f} s ({rate:,.0f} tokens/s)"
        )


# Per-process tokenizer of a worker, set once by `_init_worker`.
_WORKER_TOKENIZER: list[Tokenizer] = []


def _init_worker(cfg: TokenizerConfig) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _WORKER_TOKENIZER[:] = [build_tokenizer(cfg)]


def _tokenize_chunk(texts: Sequence[str]) -> Chunk:
    return tokenize_texts(_WORKER_TOKENIZER[0], texts)


def tokenize_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> Chunk:
    """Tokenise `texts`, drop empty ones, append EOD to each; return (tokens, lengths)."""
    if isinstance(tokenizer, HFTokenizer):
        arrays = [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(texts)]
    else:
        arrays = [tokenizer.encode_array(t) for t in texts]
    eod = np.array([tokenizer.eod_id], dtype=np.int32)
    kept = [part for a in arrays if a.size for part in (a, eod)]
    lengths = np.array([a.size + 1 for a in arrays if a.size], dtype=np.int64)
    tokens = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int32)
    return tokens, lengths


def _chunks(texts: Iterable[str | None]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in texts:
        text = text or ""
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class TokenizePool:
    """Tokenises chunks of documents in `workers` processes (in-process when 1), in order."""

    def __init__(
        self,
        cfg: TokenizerConfig,
        workers: int = 1,
        tokenizer: Tokenizer | None = None,
    ):
        self.cfg = cfg
        self.workers = max(1, int(workers))
        self.tokenizer = tokenizer or build_tokenizer(cfg)  # the one `cfg` builds, if at hand
        self._pool = None
        if self.workers > 1:
            ctx = mp.get_context("spawn")  # safe with threads (torch) in the parent
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(cfg,))

    def map(self, texts: Iterable[str | None]) -> Iterator[tuple[int, Chunk]]:
        """Yield (documents read, (tokens, lengths)) per chunk, in input order."""
        if self._pool is None:
            for chunk in _chunks(texts):
                yield len(chunk), tokenize_texts(self.tokenizer, chunk)
            return
        pending: collections.deque = collections.deque()
        for chunk in _chunks(texts):
            pending.append((len(chunk), self._pool.apply_async(_tokenize_chunk, (chunk,))))
            if len(pending) >= 4 * self.workers:  # bound the memory in flight
                n, result = pending.popleft()
                yield n, result.get()
        while pending:
            n, result = pending.popleft()
            yield n, result.get()

    def write(
        self,
        texts: Iterable[str | None],
        prefix: str,
        *,
        total: int | None = None,
        progress: bool = True,
        desc: str = "tokenising",
    ) -> PrepareStats:
        """Tokenise `texts` into `prefix.bin/.idx` (dtype chosen by vocabulary size)."""
        stats = PrepareStats()
        start = time.perf_counter()
        bar = tqdm(total=total, unit="doc", desc=desc, disable=not progress, dynamic_ncols=True)
        with IndexedDatasetWriter(prefix, dtype_for_vocab(self.tokenizer.vocab_size)) as writer:
            for read, (tokens, lengths) in self.map(texts):
                writer.add_documents(tokens, lengths)
                stats.skipped += read - len(lengths)
                bar.update(read)
                bar.set_postfix(tokens=f"{writer.num_tokens:,}", refresh=False)
            writer.finalize()
            stats.documents, stats.tokens = writer.num_documents, writer.num_tokens
        bar.close()
        stats.seconds = time.perf_counter() - start
        return stats

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> TokenizePool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._pool is not None:
            self._pool.terminate()
        self.close()


def prepare(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: TokenizerConfig | None = None,
    *,
    workers: int = 1,
    text_field: str = "text",
    sample_by: str = "document",
    max_files: int | None = None,
    progress: bool = True,
) -> PrepareStats:
    """`hybrid data prepare`: local .json/.jsonl/.parquet/.txt files (or directories, globs)
    -> `output_prefix.bin/.idx`, one document per json row / parquet row / txt `sample_by`."""
    from hybrid.data.sources import iter_local_texts, resolve_local_files

    files = resolve_local_files(inputs, max_files=max_files)
    texts = iter_local_texts(files, text_field=text_field, sample_by=sample_by)
    with TokenizePool(tokenizer or TokenizerConfig(), workers) as pool:
        return pool.write(texts, output_prefix, progress=progress, desc="prepare")


__all__ = ["PrepareStats", "TokenizePool", "prepare", "tokenize_texts"]
