import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import random_texts, write_jsonl

from hybrid.data.indexed import IndexedDataset
from hybrid.data.prepare import TokenizePool, prepare, tokenize_texts
from hybrid.data.tokenizer import ByteTokenizer
from hybrid.recipe.data_config import TokenizerConfig
from hybrid.recipe.schema import ConfigError


def test_tokenize_texts_appends_eod_and_skips_empty():
    tok = ByteTokenizer()
    tokens, lengths = tokenize_texts(tok, ["ab", "", None or "", "c"])
    assert tokens.tolist() == [97, 98, 256, 99, 256]
    assert lengths.tolist() == [3, 2]


def test_prepare_mixed_inputs(tmp_path, corpus_jsonl):
    pq.write_table(pa.table({"text": ["from parquet", "second row"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("a whole text file\n\nwith two paragraphs\n")
    inputs = [str(corpus_jsonl), str(tmp_path / "b.parquet"), str(tmp_path / "c.txt")]
    stats = prepare(inputs, str(tmp_path / "out" / "mixed"), progress=False)
    ds = IndexedDataset(tmp_path / "out" / "mixed")
    tok = ByteTokenizer()
    assert stats.documents == ds.num_documents == 201 + 2 + 1  # the empty row is skipped
    assert stats.skipped == 1 and stats.tokens == ds.num_tokens
    assert all(ds.document(d)[-1] == tok.eod_id for d in range(ds.num_documents))
    assert tok.decode(ds.document(200)) == "héllo wörld ✓ 日本語\n"
    assert tok.decode(ds.document(201)) == "from parquet"
    assert tok.decode(ds.document(203)).startswith("a whole text file\n\nwith two")
    assert "204 documents" in stats.summary("x") and "tokens" in stats.summary("x")
    prepare(
        [str(tmp_path / "c.txt")], str(tmp_path / "para"), sample_by="paragraph", progress=False
    )
    assert IndexedDataset(tmp_path / "para").num_documents == 2


def test_one_and_two_workers_give_identical_files(tmp_path):
    texts = random_texts(3000, seed=3)  # several chunks of 256 documents
    write_jsonl(tmp_path / "a.jsonl", texts[:1500])
    write_jsonl(tmp_path / "b.jsonl", texts[1500:])
    inputs = [str(tmp_path / "*.jsonl")]
    one = prepare(inputs, str(tmp_path / "w1"), workers=1, progress=False)
    two = prepare(inputs, str(tmp_path / "w2"), workers=2, progress=False)
    assert one.documents == two.documents == 3000
    for ext in ("bin", "idx"):
        assert (tmp_path / f"w1.{ext}").read_bytes() == (tmp_path / f"w2.{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "w2")
    assert ByteTokenizer().decode(ds.document(2999)) == texts[2999]


def test_pool_with_hf_tokenizer(tmp_path):
    from hybrid.data.tokenizer import train_bpe_tokenizer

    write_jsonl(tmp_path / "a.jsonl", random_texts(100, seed=4))
    tok = train_bpe_tokenizer(
        [str(tmp_path / "a.jsonl")], 300, str(tmp_path / "tok.json"), show_progress=False
    )
    cfg = TokenizerConfig(kind="hf", path=str(tmp_path / "tok.json"))
    with TokenizePool(cfg, workers=1) as pool:
        pool.write(["alpha beta", "gamma"], str(tmp_path / "hf"), progress=False)
    ds = IndexedDataset(tmp_path / "hf")
    assert ds.document(0).tolist() == tok.encode("alpha beta") + [tok.eod_id]


def test_prepare_errors(tmp_path):
    with pytest.raises(ConfigError, match="no files match"):
        prepare([str(tmp_path / "nothing*.jsonl")], str(tmp_path / "x"), progress=False)
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(ConfigError, match="unsupported file type"):
        prepare([str(tmp_path / "a.csv")], str(tmp_path / "x"), progress=False)
    write_jsonl(tmp_path / "b.jsonl", ["hello"], field="content")
    with pytest.raises(ConfigError, match="no column 'text'"):
        prepare([str(tmp_path / "b.jsonl")], str(tmp_path / "x"), progress=False)
    assert not list(tmp_path.glob("x.*"))  # nothing half-written is left behind
    stats = prepare(
        [str(tmp_path / "b.jsonl")], str(tmp_path / "y"), text_field="content", progress=False
    )
    assert stats.documents == 1
