"""Config dataclasses of the data layer: where text comes from, how it is tokenised, how the
validation set is held out, and where tokenised caches live.

`DataConfig()` is valid on its own and means the embedded default: the Python sources of the
running interpreter's standard library, byte-level tokenised, 2% of files held out.

Example recipe section::

    data:
      tokenizer: {kind: hf, path: /data/tok/tokenizer.json}
      sources:
        - {kind: hf, path: "/data/web/*.jsonl", weight: 3}
        - {kind: indexed, path: /data/code/code_text_document, weight: 1}
      valid_fraction: 0.005
      eod_mask_loss: true
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hybrid.recipe.schema import check

SourceKind = Literal["hf", "indexed", "stdlib"]
TokenizerKind = Literal["byte", "hf"]
TextSampleBy = Literal["document", "paragraph", "line"]


@dataclass(kw_only=True)
class TokenizerConfig:
    """`byte`: 256 byte ids + one end-of-document id (vocab 257). `hf`: a Hugging Face
    `tokenizer.json` at `path`; its end-of-document token is `eod_token` if set, else found among
    its special tokens (`<|endoftext|>`, `</s>`, `<|end_of_text|>`, `<eos>`, ...)."""

    kind: TokenizerKind = "byte"
    path: str | None = None
    eod_token: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "hf":
            check(bool(self.path), "path", "an hf tokenizer needs the path of a tokenizer.json")
        else:
            check(self.path is None, "path", "only an hf tokenizer takes a path")
            check(self.eod_token is None, "eod_token", "only an hf tokenizer takes eod_token")


@dataclass(kw_only=True)
class DataSourceConfig:
    """One source of documents.

    - `stdlib`: the `*.py` files of the running interpreter's standard library (tests and
      site-packages excluded); `path` may name another root directory of `*.py` files.
    - `hf`: `path` is a local file, glob or directory of .json/.jsonl/.parquet/.txt files (read
      with `datasets.load_dataset`), or a Hugging Face hub dataset name (needs network);
      `name` is the hub config, `split` its split, `text_field` the column holding the text,
      `sample_by` how a .txt file is cut into documents.
    - `indexed`: `path` is a Megatron-format prefix (`PREFIX.bin` + `PREFIX.idx`), made by
      `hybrid data prepare` or Megatron-LM's `preprocess_data.py --append-eod`.

    `weight` is the blending weight relative to the other sources; `max_files` keeps only the
    first N files (sorted) of a stdlib or local hf source.
    """

    kind: SourceKind = "stdlib"
    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    sample_by: TextSampleBy = "document"
    weight: float = 1.0
    max_files: int | None = None

    def __post_init__(self) -> None:
        check(0 < self.weight < float("inf"), "weight", "must be positive and finite")
        check(self.max_files is None or self.max_files > 0, "max_files", "must be positive")
        if self.kind in ("hf", "indexed"):
            check(bool(self.path), "path", f"a source of kind {self.kind!r} needs a path")
        if self.kind == "indexed":
            check(self.max_files is None, "max_files", "does not apply to an indexed source")
        check(self.kind == "hf" or self.name is None, "name", "only an hf source takes a name")

    def describe(self) -> str:
        """A short human-readable name for logs and errors."""
        return f"{self.kind}:{self.path}" if self.path else self.kind


def default_cache_dir() -> str:
    """`$HYBRID_CACHE` if set, else `$XDG_CACHE_HOME/hybrid`, else `~/.cache/hybrid`."""
    env = os.environ.get("HYBRID_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "hybrid")


@dataclass(kw_only=True)
class DataConfig:
    """The training data.

    - `sources`: blended by weight; empty means the embedded stdlib default.
    - `valid_sources`: if set, validation reads these and `sources` are used whole for
      training; otherwise `valid_fraction` of each source's documents is held out (stdlib: by a
      stable hash of the file path; other kinds: the last documents of the source).
    - `eod_mask_loss`: no loss where the input token is the end-of-document token, so the model
      is not asked to predict the first token of the next document (Megatron's option).
    - `num_workers`: processes that tokenise when a cache is built (None: min(8, CPUs)).
    - `cache_dir`: where tokenised caches live (None: `$HYBRID_CACHE` or ~/.cache/hybrid).
    """

    sources: list[DataSourceConfig] = field(default_factory=list)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    valid_sources: list[DataSourceConfig] = field(default_factory=list)
    valid_fraction: float = 0.02
    eod_mask_loss: bool = False
    num_workers: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check(0.0 <= self.valid_fraction < 1.0, "valid_fraction", "must be in [0, 1)")
        check(self.num_workers is None or self.num_workers > 0, "num_workers", "must be positive")
        check(self.cache_dir is None or bool(self.cache_dir), "cache_dir", "must not be empty")

    def resolved_sources(self) -> list[DataSourceConfig]:
        """The training sources: `sources`, or the embedded stdlib default when empty."""
        return list(self.sources) if self.sources else [DataSourceConfig(kind="stdlib")]

    def resolved_cache_dir(self) -> str:
        return os.path.expanduser(self.cache_dir) if self.cache_dir else default_cache_dir()

    def resolved_num_workers(self) -> int:
        return self.num_workers if self.num_workers else min(8, os.cpu_count() or 1)


__all__ = [
    "DataConfig",
    "DataSourceConfig",
    "TokenizerConfig",
    "default_cache_dir",
]
