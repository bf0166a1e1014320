"""Tokenizer files both ways.

Export: a recipe's Hugging Face `tokenizer.json` is copied byte for byte, with the
`tokenizer_config.json` beside it when there is one (else one is written naming the
end-of-document token as EOS). Our byte tokenizer (ids = UTF-8 bytes, 256 = end of document) is
written as an equivalent `tokenizer.json`: a byte-level BPE without merges whose vocabulary maps
each byte's GPT-2 character to the byte's value, plus `<|endoftext|>` = 256, so
`AutoTokenizer.from_pretrained(OUT_DIR)` encodes exactly as `hybrid` does.

Import: `tokenizer.json` (+ `tokenizer_config.json`) is copied into the new run directory and
the recipe points at it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hybrid.convert._hf import require_transformers
from hybrid.data.tokenizer import DEFAULT_EOD_TOKEN, ByteTokenizer, HFTokenizer
from hybrid.recipe.data_config import TokenizerConfig
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class TokenizerExport:
    eod_id: int
    note: str  # one line for the command output and README.md


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizes to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer_object():
    """A `tokenizers.Tokenizer` equal to `ByteTokenizer` (ids = bytes, 256 = <|endoftext|>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(DEFAULT_EOD_TOKEN, special=True)])
    assert tok.token_to_id(DEFAULT_EOD_TOKEN) == ByteTokenizer.eod_id
    return tok


def _save_fast(out_dir: Path, eos_token: str, **kwargs) -> None:
    hf = require_transformers()
    fast = hf.PreTrainedTokenizerFast(eos_token=eos_token, pad_token=eos_token, **kwargs)
    fast.save_pretrained(str(out_dir))


def write_tokenizer(cfg: TokenizerConfig, out_dir: Path, override: str | None) -> TokenizerExport:
    """Write the tokenizer files of `cfg` (or of the tokenizer.json `override`) into out_dir."""
    if override is not None:
        cfg = TokenizerConfig(kind="hf", path=override, eod_token=cfg.eod_token)
    if cfg.kind == "byte":
        _save_fast(out_dir, DEFAULT_EOD_TOKEN, tokenizer_object=byte_tokenizer_object())
        return TokenizerExport(
            ByteTokenizer.eod_id,
            "tokenizer: hybrid's byte tokenizer, written as a byte-level tokenizer.json (ids = "
            "UTF-8 bytes, 256 = <|endoftext|>)",
        )
    try:
        tok = HFTokenizer(str(cfg.path), cfg.eod_token)
    except ConfigError as err:
        raise ConfigError(
            f"{err.message}; pass --tokenizer PATH to name the tokenizer.json"
        ) from None
    source = Path(tok.path)
    if (source.parent / TOKENIZER_CONFIG).is_file():
        shutil.copyfile(source.parent / TOKENIZER_CONFIG, out_dir / TOKENIZER_CONFIG)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _save_fast(Path(tmp), tok.eod_token, tokenizer_file=str(source))
            shutil.copyfile(Path(tmp) / TOKENIZER_CONFIG, out_dir / TOKENIZER_CONFIG)
    shutil.copyfile(source, out_dir / TOKENIZER_JSON)
    return TokenizerExport(tok.eod_id, f"tokenizer: copied {source} (EOS {tok.eod_token!r})")


def import_tokenizer(hf_dir: Path, dest: Path) -> TokenizerConfig | None:
    """Copy HF_DIR's tokenizer files into `dest`; the TokenizerConfig pointing at the copy, or
    None (with a warning) when HF_DIR has no tokenizer.json."""
    source = hf_dir / TOKENIZER_JSON
    if not source.is_file():
        log.warning(
            "%s has no %s: set data.tokenizer in the recipe before training", hf_dir, TOKENIZER_JSON
        )
        return None
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest / TOKENIZER_JSON)
    eos = None
    if (hf_dir / TOKENIZER_CONFIG).is_file():
        shutil.copyfile(hf_dir / TOKENIZER_CONFIG, dest / TOKENIZER_CONFIG)
        eos = _eos_token(hf_dir / TOKENIZER_CONFIG)
    path = str((dest / TOKENIZER_JSON).resolve())
    try:
        HFTokenizer(path)  # finds an end-of-document token by name
        return TokenizerConfig(kind="hf", path=path)
    except ConfigError:
        if eos is None:
            log.warning("no end-of-document token found in %s: set data.tokenizer.eod_token", path)
        return TokenizerConfig(kind="hf", path=path, eod_token=eos)


def _eos_token(config_file: Path) -> str | None:
    try:
        eos = json.loads(config_file.read_text()).get("eos_token")
    except (OSError, ValueError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None
