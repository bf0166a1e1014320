import numpy as np
import pytest

from hybrid.data.packing import IGNORE_INDEX, PackedDataset, check_eod_terminated, make_batch
from hybrid.recipe.schema import ConfigError

E = 99  # the end-of-document id in these tests


def stream_of(docs):
    return np.concatenate([np.r_[d, E] for d in docs]).astype(np.uint16)


def test_rows_overlap_by_one_token_like_megatron():
    tokens = np.arange(23, dtype=np.uint16)
    ds = PackedDataset(tokens, seq_len=5)
    assert len(ds) == (23 - 1) // 5 == 4
    assert ds.row(0).tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.row(1).tolist() == [5, 6, 7, 8, 9, 10]
    assert ds.rows([3, 0]).tolist() == [list(range(15, 21)), list(range(0, 6))]
    with pytest.raises(IndexError):
        ds.row(4)
    sub = PackedDataset(tokens, seq_len=5, start=10, end=21)
    assert len(sub) == 2 and sub.row(1).tolist() == list(range(15, 21))
    assert len(PackedDataset(tokens, seq_len=30)) == 0


def test_labels_and_seq_idx():
    # documents [1 2 3] [4 5] [6 7 8 9]; a row spans the document boundaries
    stream = stream_of([[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    ds = PackedDataset(stream, seq_len=8)
    batch = make_batch(ds.rows([0]), eod_id=E)
    inputs, labels, seq_idx = batch["input_ids"][0], batch["labels"][0], batch["seq_idx"][0]
    assert inputs.tolist() == [1, 2, 3, E, 4, 5, E, 6]
    assert labels.tolist() == [2, 3, E, 4, 5, E, 6, 7]  # the next tokens
    assert seq_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]  # +1 right after each EOD
    assert batch["input_ids"].dtype == np.int64 and batch["labels"].dtype == np.int64
    assert batch["seq_idx"].dtype == np.int32

    masked = make_batch(ds.rows([0]), eod_id=E, eod_mask_loss=True)
    assert masked["labels"][0].tolist() == [2, 3, E, IGNORE_INDEX, 5, E, IGNORE_INDEX, 7]
    assert np.array_equal(masked["input_ids"], batch["input_ids"])
    assert np.array_equal(masked["seq_idx"], batch["seq_idx"])


def test_seq_idx_properties_random():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, E, size=rng.integers(1, 30)) for _ in range(200)]
    ds = PackedDataset(stream_of(docs), seq_len=64)
    batch = make_batch(ds.rows(range(len(ds))), eod_id=E)
    inp, seq = batch["input_ids"], batch["seq_idx"]
    assert np.all(seq[:, 0] == 0)
    step = np.diff(seq, axis=1)
    assert np.all((step == 0) | (step == 1))
    assert np.array_equal(step == 1, inp[:, :-1] == E)  # increments exactly after an EOD
    full = np.concatenate([ds.row(i)[:-1] for i in range(len(ds))])
    assert np.array_equal(inp.reshape(-1), full)  # rows tile the stream without gaps
    assert np.array_equal(batch["labels"][:, :-1], inp[:, 1:])


def test_check_eod_terminated():
    stream = stream_of([[1, 2], [3]])
    offsets = np.array([0, 3, 5])
    check_eod_terminated(stream, offsets, E, vocab_size=100, name="ok")
    with pytest.raises(ConfigError, match="do not end with"):
        check_eod_terminated(np.array([1, 2, 3, 4, E]), offsets, E, vocab_size=100, name="x")
    with pytest.raises(ConfigError, match="outside the tokenizer"):
        check_eod_terminated(stream, offsets, E, vocab_size=50, name="x")
