import json

import numpy as np
import pytest

from hybrid.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer, train_bpe_tokenizer
from hybrid.recipe.data_config import TokenizerConfig
from hybrid.recipe.schema import ConfigError, from_dict

TEXT = "def f(x):\n    return x + 1  # héllo ✓ 日本語 🐍\n"


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eod_id == 256
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids + [tok.eod_id]) == TEXT  # EOD is not text
    assert np.array_equal(tok.encode_array(TEXT), ids)
    assert tok.encode("") == [] and tok.encode_array("").size == 0


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    lines = [f"def function_{i}(value):\n    return value * {i} + 'héllo'\n" for i in range(300)]
    (root / "train.txt").write_text("".join(lines))
    tok = train_bpe_tokenizer(
        [str(root / "train.txt")], 400, str(root / "tok" / "tokenizer.json"), show_progress=False
    )
    assert 258 <= tok.vocab_size <= 400  # a small corpus may run out of merges
    return root / "tok" / "tokenizer.json"


def test_hf_tokenizer_from_trained_bpe(bpe_path):
    tok = build_tokenizer(TokenizerConfig(kind="hf", path=str(bpe_path)))
    assert isinstance(tok, HFTokenizer)
    assert tok.eod_token == "<|endoftext|>"
    assert tok.eod_id == 0  # the first special token
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.eod_id not in ids
    assert len(tok.encode("def function_7(value):")) < len("def function_7(value):")  # merges
    assert tok.encode_batch([TEXT, "x"]) == [ids, tok.encode("x")]
    assert tok.identity.startswith("hf-") and tok.identity != ByteTokenizer.identity
    # a directory holding tokenizer.json works too
    assert HFTokenizer(str(bpe_path.parent)).eod_id == tok.eod_id


def test_hf_tokenizer_eod_errors(bpe_path, tmp_path):
    data = json.loads(bpe_path.read_text())
    data["added_tokens"] = []  # no special tokens at all
    del data["model"]["vocab"]["<|endoftext|>"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="cannot find an end-of-document token"):
        HFTokenizer(str(bare))
    # naming a token that exists in the vocabulary works
    assert HFTokenizer(str(bare), eod_token="Ġ").eod_id == data["model"]["vocab"]["Ġ"]
    with pytest.raises(ConfigError, match="has no token"):
        HFTokenizer(str(bpe_path), eod_token="<nope>")
    with pytest.raises(ConfigError, match="not found"):
        HFTokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load"):
        HFTokenizer(str(tmp_path / "junk.json"))


def test_tokenizer_config_checks():
    assert build_tokenizer(TokenizerConfig()).vocab_size == 257
    with pytest.raises(ConfigError, match="path"):
        from_dict(TokenizerConfig, {"kind": "hf"})
    with pytest.raises(ConfigError, match="only an hf tokenizer"):
        from_dict(TokenizerConfig, {"kind": "byte", "path": "x.json"})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(TokenizerConfig, {"kind": "sentencepiece"})


def test_train_bpe_rejects_tiny_vocab(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(ConfigError, match="at least 258"):
        train_bpe_tokenizer([str(tmp_path / "a.txt")], 100, str(tmp_path / "t.json"))
