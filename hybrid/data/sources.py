"""Where documents come from, and their tokenised, cached form.

- `stdlib` (the embedded default): the `*.py` files of the running interpreter's standard
  library, sorted, split into train/validation by a stable hash of each relative path.
- `hf`: local .json/.jsonl/.parquet/.txt files read with `datasets.load_dataset`, or a hub
  dataset name (network needed).
- `indexed`: an existing Megatron-format `PREFIX.bin/.idx`, used as is.
- `mqar`, `passkey`: generated recall examples (`hybrid.data.synthetic`), each exactly the
  configured length, stored with a loss mask (`PREFIX.bin/.idx` of uint8, 1 on answer tokens).

`stdlib`, `hf` and generated sources are tokenised once into an indexed dataset under the cache
directory, keyed by everything that decides the tokens (files and their sizes/mtimes, tokenizer,
generator settings, ...).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import platform
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid.data.cache import cache_key, cached_entry
from hybrid.data.indexed import IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from hybrid.data.prepare import TokenizePool
from hybrid.data.synthetic import generate_examples
from hybrid.data.tokenizer import Tokenizer, build_tokenizer
from hybrid.recipe.data_config import SYNTHETIC_SOURCES, DataConfig, DataSourceConfig
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)

STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


# ---------------------------------------------------------------------------------------------
# The standard library


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: str | os.PathLike | None = None, max_files: int | None = None):
    """Sorted relative POSIX paths of the `*.py` files under `root` (default: the stdlib),
    skipping site-packages, test directories and caches; the first `max_files` if given."""
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise ConfigError(f"not a directory: {base}", key="path")
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        rel_dir = Path(dirpath).relative_to(base)
        found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    found.sort()
    return found[:max_files] if max_files is not None else found


def is_validation_path(rel_path: str, fraction: float) -> bool:
    """Stable (process- and machine-independent) hash split of a relative path."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < fraction


def _read_source(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _stdlib_cache(
    src: DataSourceConfig, cfg: DataConfig, tokenizer: Tokenizer, fraction: float, progress: bool
) -> Path:
    root = Path(src.path).expanduser() if src.path else stdlib_root()
    files = list_stdlib_files(root, src.max_files)
    if not files:
        raise ConfigError(f"no *.py files under {root}", key="path")
    listing = "\n".join(f"{f}\t{(root / f).stat().st_size}" for f in files)
    key = cache_key(
        {
            "kind": "stdlib",
            "python": f"{platform.python_implementation()}-{platform.python_version()}",
            "root": str(root) if src.path else None,
            "files": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
            "tokenizer": tokenizer.identity,
            "valid_fraction": fraction,
        }
    )
    valid = [f for f in files if is_validation_path(f, fraction)]
    train = [f for f in files if not is_validation_path(f, fraction)]

    def build(tmp: Path) -> dict:
        log.info("tokenising %d stdlib files from %s into the cache", len(files), root)
        with TokenizePool(cfg.tokenizer, cfg.resolved_num_workers(), tokenizer) as pool:
            stats = {}
            for split, names in (("train", train), ("valid", valid)):
                texts = (_read_source(root / f) for f in names)
                desc = f"stdlib {split}"
                out = pool.write(
                    texts, str(tmp / split), total=len(names), progress=progress, desc=desc
                )
                stats[split] = {"documents": out.documents, "tokens": out.tokens}
        return {"source": "stdlib", "root": str(root), "files": len(files), **stats}

    py = platform.python_version()
    return cached_entry(cfg.resolved_cache_dir(), f"stdlib-py{py}", key, build)


# ---------------------------------------------------------------------------------------------
# Local files and the Hugging Face hub


def _builder_of(path: Path) -> str | None:
    return LOCAL_BUILDERS.get(path.suffix.lower())


def resolve_local_files(patterns: Iterable[str], max_files: int | None = None) -> list[Path]:
    """Files named by `patterns` (files, directories searched recursively, or globs), each
    pattern's matches sorted, in pattern order, duplicates dropped; the first `max_files`."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and _builder_of(p))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            matches = [p for p in matches if p.is_file()]
        if not matches:
            raise ConfigError(f"no files match {pattern!r}")
        for match in matches:
            if not _builder_of(match):
                kinds = ", ".join(LOCAL_BUILDERS)
                raise ConfigError(f"{match}: unsupported file type (supported: {kinds})")
        files.extend(m.resolve() for m in matches)
    files = list(dict.fromkeys(files))
    return files[:max_files] if max_files is not None else files


def iter_local_texts(
    files: Sequence[Path], *, text_field: str = "text", sample_by: str = "document"
) -> Iterator[str | None]:
    """The documents of local files in order: json/jsonl/parquet rows' `text_field`, or the
    .txt files cut by `sample_by` ("document": whole file, "paragraph", "line")."""
    import datasets

    runs: list[tuple[str, list[str]]] = []
    for file in files:
        builder = _builder_of(Path(file))
        if runs and runs[-1][0] == builder:
            runs[-1][1].append(str(file))
        else:
            runs.append((builder, [str(file)]))
    for builder, group in runs:
        kwargs = {"sample_by": sample_by} if builder == "text" else {}
        try:
            rows = datasets.load_dataset(
                builder, data_files=group, split="train", streaming=True, **kwargs
            )
        except Exception as err:
            raise ConfigError(f"cannot read {group[0]} ...: {err}") from None
        yield from _texts(rows, "text" if builder == "text" else text_field, group[0])


def _texts(rows: Iterable[dict], field: str, where: str) -> Iterator[str | None]:
    for row in rows:
        if field not in row:
            columns = ", ".join(row)
            raise ConfigError(
                f"{where}: no column {field!r} (columns: {columns})", key="text_field"
            )
        yield row[field]


def iter_hub_texts(src: DataSourceConfig) -> Iterator[str | None]:
    """The documents of a hub dataset (streamed; needs network access)."""
    import datasets

    try:
        rows = datasets.load_dataset(src.path, src.name, split=src.split, streaming=True)
    except Exception as err:
        raise ConfigError(
            f"cannot load hub dataset {src.path!r} ({type(err).__name__}: {err}); hub datasets "
            "need network access; for local files give a path that exists",
            key="path",
        ) from None
    return _texts(rows, src.text_field, src.path or "")


def _is_local(path: str) -> bool:
    expanded = os.path.expanduser(path)
    return (
        os.path.exists(expanded)
        or any(c in path for c in "*?[")
        or path.startswith(("/", ".", "~"))
        or Path(path).suffix.lower() in LOCAL_BUILDERS
    )


def _hf_cache(src: DataSourceConfig, cfg: DataConfig, tokenizer: Tokenizer, progress: bool) -> Path:
    assert src.path is not None
    parts: dict = {"kind": "hf", "text_field": src.text_field, "tokenizer": tokenizer.identity}
    local = _is_local(src.path)
    if local:
        files = resolve_local_files([src.path], src.max_files)
        parts["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        parts["sample_by"] = src.sample_by
    else:
        parts["hub"] = [src.path, src.name, src.split]

    def build(tmp: Path) -> dict:
        log.info("tokenising %s into the cache", src.describe())
        if local:
            texts = iter_local_texts(files, text_field=src.text_field, sample_by=src.sample_by)
        else:
            texts = iter_hub_texts(src)
        with TokenizePool(cfg.tokenizer, cfg.resolved_num_workers(), tokenizer) as pool:
            out = pool.write(texts, str(tmp / "data"), progress=progress, desc=src.describe())
        return {"source": src.describe(), "documents": out.documents, "tokens": out.tokens}

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", src.path.strip("/"))[-40:]
    return cached_entry(cfg.resolved_cache_dir(), f"hf-{slug}", cache_key(parts), build)


# ---------------------------------------------------------------------------------------------
# Generated recall examples


def _synthetic_cache(src: DataSourceConfig, cfg: DataConfig, tokenizer: Tokenizer) -> Path:
    settings = src.synthetic()
    parts = {"kind": src.kind, "settings": dataclasses.asdict(settings)}
    parts["tokenizer"] = tokenizer.identity

    def build(tmp: Path) -> dict:
        log.info("generating %d %s examples into the cache", settings.examples, src.describe())
        examples = generate_examples(src.kind, settings, tokenizer, settings.examples)
        lengths = np.full(len(examples), settings.seq_len, dtype=np.int64)
        for name, array, dtype in (
            ("data", examples.tokens, dtype_for_vocab(tokenizer.vocab_size)),
            ("mask", examples.loss_mask, np.uint8),
        ):
            with IndexedDatasetWriter(tmp / name, dtype=dtype) as writer:
                writer.add_documents(array.reshape(-1), lengths)
                writer.finalize()
        return {"source": src.describe(), "documents": len(examples)}

    return cached_entry(
        cfg.resolved_cache_dir(), src.describe().replace(":", "-"), cache_key(parts), build
    )


# ---------------------------------------------------------------------------------------------
# Sources as document spans of indexed datasets


@dataclass(frozen=True)
class DocSpan:
    """Documents `start:end` of an indexed dataset. `loss_mask`: an indexed dataset of the same
    documents, 1 where a token is to be predicted (generated sources; None: every token);
    `example_len`: every document has this length and must not be cut between rows."""

    dataset: IndexedDataset
    start: int
    end: int
    name: str
    loss_mask: IndexedDataset | None = None
    example_len: int | None = None

    @property
    def num_documents(self) -> int:
        return self.end - self.start

    def token_range(self) -> tuple[int, int]:
        offsets = self.dataset.document_offsets
        return int(offsets[self.start]), int(offsets[self.end])


@dataclass(frozen=True)
class SourceData:
    name: str
    weight: float
    train: DocSpan
    valid: DocSpan | None


def _tail_split(
    ds: IndexedDataset, fraction: float, name: str, **extra
) -> tuple[DocSpan, DocSpan | None]:
    n = ds.num_documents
    n_valid = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    train = DocSpan(ds, 0, n - n_valid, name, **extra)
    return train, (DocSpan(ds, n - n_valid, n, name, **extra) if n_valid else None)


def load_source(
    src: DataSourceConfig,
    cfg: DataConfig,
    *,
    holdout: bool = True,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
) -> SourceData:
    """Tokenise (or find in the cache) one source; hold out `cfg.valid_fraction` of it if
    `holdout` (stdlib: by path hash; hf and indexed: the last documents). `tokenizer` is
    `cfg.tokenizer` built, if the caller has it."""
    tokenizer = tokenizer or build_tokenizer(cfg.tokenizer)
    fraction = cfg.valid_fraction if holdout else 0.0
    name = src.describe()
    if src.kind == "stdlib":
        entry = _stdlib_cache(src, cfg, tokenizer, fraction, progress)
        train = IndexedDataset(entry / "train")
        valid = IndexedDataset(entry / "valid")
        valid_span = DocSpan(valid, 0, valid.num_documents, name) if valid.num_documents else None
        return SourceData(
            name, src.weight, DocSpan(train, 0, train.num_documents, name), valid_span
        )
    if src.kind in SYNTHETIC_SOURCES:
        entry = _synthetic_cache(src, cfg, tokenizer)
        mask, example_len = IndexedDataset(entry / "mask"), src.synthetic().seq_len
        train_span, valid_span = _tail_split(
            IndexedDataset(entry / "data"), fraction, name, loss_mask=mask, example_len=example_len
        )
        return SourceData(name, src.weight, train_span, valid_span)
    if src.kind == "hf":
        dataset = IndexedDataset(_hf_cache(src, cfg, tokenizer, progress) / "data")
    else:
        dataset = IndexedDataset(os.path.expanduser(src.path or ""))
    train_span, valid_span = _tail_split(dataset, fraction, name)
    return SourceData(name, src.weight, train_span, valid_span)


def load_sources(
    cfg: DataConfig,
    *,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
) -> tuple[Tokenizer, list[SourceData], list[DocSpan]]:
    """The tokenizer, the training sources and the validation spans of a `DataConfig`
    (`tokenizer`: the one `cfg.tokenizer` builds, if the caller has it already)."""
    tokenizer = tokenizer or build_tokenizer(cfg.tokenizer)
    holdout = not cfg.valid_sources
    train = []
    for i, src in enumerate(cfg.resolved_sources()):
        try:
            train.append(
                load_source(src, cfg, holdout=holdout, tokenizer=tokenizer, progress=progress)
            )
        except ConfigError as err:
            raise err.with_context(prefix=f"data.sources[{i}]") from None
    if holdout:
        valid = [s.valid for s in train if s.valid is not None]
    else:
        valid = []
        for i, src in enumerate(cfg.valid_sources):
            try:
                data = load_source(src, cfg, holdout=False, tokenizer=tokenizer, progress=progress)
                valid.append(data.train)
            except ConfigError as err:
                raise err.with_context(prefix=f"data.valid_sources[{i}]") from None
    return tokenizer, train, valid


__all__ = [
    "DocSpan",
    "SourceData",
    "is_validation_path",
    "iter_hub_texts",
    "iter_local_texts",
    "list_stdlib_files",
    "load_source",
    "load_sources",
    "resolve_local_files",
    "stdlib_root",
]
