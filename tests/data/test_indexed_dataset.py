import struct
import warnings

import numpy as np
import pytest

from hybrid.data.indexed import (
    INDEX_HEADER,
    IndexedDataset,
    IndexedDatasetWriter,
    dtype_for_vocab,
    exists,
)
from hybrid.recipe.schema import ConfigError

try:
    import torch

    with warnings.catch_warnings():  # megatron.core warns about missing Apex / TE on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    MEGATRON_ERROR = None
except Exception as err:  # ImportError, or megatron-core failing on this torch
    MEGATRON_ERROR = f"megatron.core cannot be imported: {err}"

needs_megatron = pytest.mark.skipif(MEGATRON_ERROR is not None, reason=str(MEGATRON_ERROR))


def random_docs(n=50, vocab=257, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(0, 40)) for _ in range(n)]


def write(prefix, docs, dtype):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
        w.finalize()


def test_dtype_for_vocab_matches_megatron():
    assert dtype_for_vocab(257) is np.uint16
    assert dtype_for_vocab(65499) is np.uint16
    assert dtype_for_vocab(65500) is np.int32
    assert dtype_for_vocab(None) is np.int32


@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 257), (np.int32, 200_000)])
def test_round_trip(tmp_path, dtype, vocab):
    docs = random_docs(vocab=vocab)
    prefix = tmp_path / "ds"
    write(prefix, docs, dtype)
    assert exists(prefix)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == ds.num_documents == len(docs)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
        assert np.array_equal(ds.document(i), d)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    assert np.array_equal(ds.document_offsets, offsets)
    assert np.array_equal(ds.tokens, np.concatenate(docs))
    raw = (tmp_path / "ds.idx").read_bytes()
    assert raw[:9] == INDEX_HEADER and struct.unpack("<Q", raw[9:17]) == (1,)


def test_writer_rejects_out_of_range_and_cleans_up(tmp_path):
    with (
        pytest.raises(ValueError, match="do not fit"),
        IndexedDatasetWriter(tmp_path / "x", np.uint16) as w,
    ):
        w.add_document([1, 70000])
    assert list(tmp_path.iterdir()) == []  # no temporary files left, nothing published


def test_reader_rejects_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no indexed dataset"):
        IndexedDataset(tmp_path / "missing")
    write(tmp_path / "ds", random_docs(5), np.uint16)
    with open(tmp_path / "ds.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ConfigError, match="does not match"):
        IndexedDataset(tmp_path / "ds")
    (tmp_path / "ds.idx").write_bytes(b"NOTANIDX" + bytes(40))
    with pytest.raises(ConfigError, match="not a Megatron"):
        IndexedDataset(tmp_path / "ds")


@needs_megatron
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_ours(tmp_path, dtype):
    docs = random_docs(seed=1)
    write(tmp_path / "ours", docs, dtype)
    theirs = MegatronDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs)
    assert theirs.index.dtype == dtype
    assert np.array_equal(theirs.document_indices, np.arange(len(docs) + 1))
    for i, d in enumerate(docs):
        assert np.array_equal(theirs[i], d)
    assert np.array_equal(theirs.get(3, offset=1, length=2), docs[3][1:3])


@needs_megatron
def test_we_read_megatrons(tmp_path):
    docs = random_docs(seed=2)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    # documents 0..9 as single sequences, then documents of two sequences each (sentence split)
    for d in docs[:10]:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    for a, b in zip(docs[10::2], docs[11::2]):
        builder.add_document(np.concatenate([a, b]), [len(a), len(b)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    ours = IndexedDataset(tmp_path / "theirs")
    assert len(ours) == len(docs)
    assert ours.num_documents == 10 + len(docs[10:]) // 2
    for i, d in enumerate(docs):
        assert np.array_equal(ours[i], d)
    assert np.array_equal(ours.document(10), np.concatenate([docs[10], docs[11]]))
    assert np.array_equal(ours.tokens, np.concatenate(docs))
