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

SourceKind = Literal["hf", "indexed", "stdlib", "mqar", "passkey"]
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
class MQARConfig:
    """Multi-query associative recall (Arora et al. 2023, "Zoology"), generated: each example is
    `seq_len` tokens (end-of-document included): `num_pairs` key-value pairs, then
    `num_queries` of those keys again, at random places among filler tokens, each followed by its
    value. Only those values carry a loss. Ids: keys `first_id + [0, key_vocab)`, values the
    next `value_vocab` ids, then one filler id. `examples` examples (of which the source's
    validation share is held out), drawn from `seed`."""

    seq_len: int = 128
    num_pairs: int = 8
    num_queries: int | None = None
    key_vocab: int = 64
    value_vocab: int = 64
    first_id: int = 0
    examples: int = 20000
    seed: int = 0

    def __post_init__(self) -> None:
        # messages name the key: a nested section's errors reach the user without their key path
        for key in ("seq_len", "num_pairs", "key_vocab", "value_vocab", "examples"):
            check(getattr(self, key) > 0, key, f"{key} must be positive")
        check(self.first_id >= 0, "first_id", "first_id must be >= 0")
        check(self.num_pairs <= self.key_vocab, "num_pairs", "num_pairs must be <= key_vocab")
        queries = self.queries
        check(0 < queries <= self.num_pairs, "num_queries", "num_queries must be in [1, num_pairs]")
        need = 2 * self.num_pairs + 2 * queries + 1
        check(
            self.seq_len >= need,
            "seq_len",
            f"seq_len {self.seq_len} is too short for {self.num_pairs} pairs and {queries} "
            f"queries: it must be at least {need}",
        )

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def filler_id(self) -> int:
        """The largest id used."""
        return self.first_id + self.key_vocab + self.value_vocab


@dataclass(kw_only=True)
class PasskeyConfig:
    """Passkey retrieval (Mohtashami & Jaggi 2023), generated as text and tokenised with the
    recipe's tokenizer: filler sentences with "The pass key is NNNNN. Remember it." at a random
    depth, then "What is the pass key? The pass key is" and the key; only the key carries a
    loss. Each example is exactly `seq_len` tokens (filler is cut to fit); `digits` digits per
    key; `examples` examples drawn from `seed`."""

    seq_len: int = 256
    digits: int = 5
    examples: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("seq_len", "digits", "examples"):
            check(getattr(self, key) > 0, key, f"{key} must be positive")
        check(self.digits <= 18, "digits", "digits must be at most 18")


# Generated source kinds and the settings section each takes (`kind: mqar` reads `mqar: {...}`).
SYNTHETIC_SOURCES: dict[str, type] = {"mqar": MQARConfig, "passkey": PasskeyConfig}


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
    - `mqar`, `passkey`: generated recall probes, set by the `mqar` / `passkey` section (see
      `MQARConfig`, `PasskeyConfig`); the loss is on the answer tokens only, and the example
      length must divide `train.seq_len`, so no example is cut between rows.

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
    mqar: MQARConfig | None = None
    passkey: PasskeyConfig | None = None

    def __post_init__(self) -> None:
        check(0 < self.weight < float("inf"), "weight", "must be positive and finite")
        for kind, settings in SYNTHETIC_SOURCES.items():
            if self.kind == kind and getattr(self, kind) is None:
                setattr(self, kind, settings())
            check(
                self.kind == kind or getattr(self, kind) is None,
                kind,
                f"only a source of kind {kind!r} takes these settings (this one is {self.kind!r})",
            )
        if self.kind in SYNTHETIC_SOURCES:
            check(self.path is None, "path", "a generated source takes no path")
            check(self.max_files is None, "max_files", "does not apply to a generated source")
        check(self.max_files is None or self.max_files > 0, "max_files", "must be positive")
        if self.kind in ("hf", "indexed"):
            check(bool(self.path), "path", f"a source of kind {self.kind!r} needs a path")
        if self.kind == "indexed":
            check(self.max_files is None, "max_files", "does not apply to an indexed source")
        check(self.kind == "hf" or self.name is None, "name", "only an hf source takes a name")

    def describe(self) -> str:
        """A short human-readable name for logs and errors."""
        if self.kind in SYNTHETIC_SOURCES:
            return f"{self.kind}:L{self.synthetic().seq_len}"
        return f"{self.kind}:{self.path}" if self.path else self.kind

    def synthetic(self) -> MQARConfig | PasskeyConfig:
        """The settings of a generated source (`mqar` or `passkey`)."""
        assert self.kind in SYNTHETIC_SOURCES, self.kind
        return getattr(self, self.kind)


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
    "SYNTHETIC_SOURCES",
    "DataConfig",
    "DataSourceConfig",
    "MQARConfig",
    "PasskeyConfig",
    "TokenizerConfig",
    "default_cache_dir",
]
