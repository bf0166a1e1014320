"""The data layer: tokenizers, Megatron-format indexed datasets, `hybrid data prepare`,
sources with their tokenised caches, packing with document boundaries, blending, and the
deterministic resumable training loader.

Names are imported lazily, so `hybrid data ...` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ByteTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
    "IndexedDataset": "indexed",
    "IndexedDatasetWriter": "indexed",
    "prepare": "prepare",
    "PrepareStats": "prepare",
    "TokenizePool": "prepare",
    "list_stdlib_files": "sources",
    "load_sources": "sources",
    "PackedDataset": "packing",
    "make_batch": "packing",
    "BlendedIndex": "blend",
    "blend_schedule": "blend",
    "TrainDataLoader": "loader",
    "ValidationBatches": "loader",
    "build_validation_batches": "loader",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"hybrid.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'hybrid.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
