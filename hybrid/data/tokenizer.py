"""Tokenizers: byte-level (the default) and any Hugging Face `tokenizer.json`.

Both expose `vocab_size`, `eod_id`, `encode(text) -> list[int]`, `decode(ids) -> str`,
`encode_array(text) -> np.ndarray` (the fast path `hybrid data prepare` uses) and `identity`
(a string that changes whenever the token ids would, used in cache keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from hybrid.recipe.data_config import TokenizerConfig
from hybrid.recipe.schema import ConfigError

# Names of end-of-document tokens, most common first (GPT-2/Llama-3/Mistral/Gemma/...).
EOD_CANDIDATES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "[EOS]",
    "<|end|>",
    "<|im_end|>",
)
DEFAULT_EOD_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eod_id: int
    identity: str

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus `eod_id` = 256; `vocab_size` = 257."""

    vocab_size = 257
    eod_id = 256
    identity = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; the end-of-document id is dropped, bad UTF-8 replaced."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` file."""

    def __init__(self, path: str, eod_token: str | None = None):
        from tokenizers import Tokenizer as HFBackend

        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"tokenizer file not found: {file}", key="data.tokenizer.path")
        data = file.read_bytes()
        try:
            self._tok = HFBackend.from_str(data.decode("utf-8"))
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise ConfigError(
                f"cannot load {file} as a tokenizer.json: {err}", key="data.tokenizer.path"
            ) from None
        self.path = str(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_token, self.eod_id = _find_eod(self._tok, eod_token, self.path)
        self.identity = f"hf-{hashlib.sha256(data).hexdigest()[:16]}-eod{self.eod_id}"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, eod={self.eod_token!r})"


def _find_eod(tok, eod_token: str | None, path: str) -> tuple[str, int]:
    if eod_token is not None:
        token_id = tok.token_to_id(eod_token)
        if token_id is None:
            raise ConfigError(f"{path} has no token {eod_token!r}", key="data.tokenizer.eod_token")
        return eod_token, token_id
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    for name in EOD_CANDIDATES:
        if name in special:
            return name, special[name]
    for name in EOD_CANDIDATES:  # some files list the EOS token in the vocab only
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return name, token_id
    found = ", ".join(sorted(special)) or "none"
    raise ConfigError(
        f"cannot find an end-of-document token in {path} (special tokens: {found}); "
        "set data.tokenizer.eod_token",
        key="data.tokenizer.eod_token",
    )


def build_tokenizer(cfg: TokenizerConfig) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a `TokenizerConfig` describes."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    assert cfg.path is not None  # checked by TokenizerConfig
    return HFTokenizer(cfg.path, cfg.eod_token)


def train_bpe_tokenizer(
    files: Sequence[str],
    vocab_size: int,
    output_path: str,
    *,
    eod_token: str = DEFAULT_EOD_TOKEN,
    text_field: str = "text",
    sample_by: str = "document",
    max_files: int | None = None,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer on local text files and save it as `output_path`.

    `files` may be .txt/.json/.jsonl/.parquet files, directories or globs, read as `hybrid data
    prepare` reads them (`text_field`, `sample_by`, `max_files`). The vocabulary holds the 256
    byte symbols, `eod_token` (a special token: the end-of-document id) and the merges.
    """
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from hybrid.data.sources import iter_local_texts, resolve_local_files

    if vocab_size < 258:
        raise ConfigError(
            f"the vocabulary size must be at least 258 (256 bytes, EOD, a merge): {vocab_size}"
        )
    paths = resolve_local_files(files, max_files=max_files)
    tok = HFBackend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    texts = (t for t in iter_local_texts(paths, text_field=text_field, sample_by=sample_by) if t)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(output_path).expanduser()
    if out.is_dir():
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out)
    return HFTokenizer(str(out), eod_token)


__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "train_bpe_tokenizer",
]
