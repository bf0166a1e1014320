import numpy as np
import pytest
import torch
from data_helpers import random_texts, write_jsonl

from hybrid.data.loader import TrainDataLoader, build_validation_batches
from hybrid.recipe.data_config import DataConfig, DataSourceConfig
from hybrid.recipe.schema import ConfigError

SEQ = 32


@pytest.fixture
def one_source(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", random_texts(150, seed=11))
    src = DataSourceConfig(kind="hf", path=str(tmp_path / "a.jsonl"))
    return DataConfig(sources=[src], num_workers=1, valid_fraction=0.1)


@pytest.fixture
def two_sources(tmp_path):
    # source A writes only 'a' words, source B only 'b' words: a row's letters tell its source
    write_jsonl(tmp_path / "a.jsonl", random_texts(200, seed=1, words=["aa", "aaa"]))
    write_jsonl(tmp_path / "b.jsonl", random_texts(200, seed=2, words=["bb", "bbb"]))
    return DataConfig(
        sources=[
            DataSourceConfig(kind="hf", path=str(tmp_path / "a.jsonl"), weight=3),
            DataSourceConfig(kind="hf", path=str(tmp_path / "b.jsonl"), weight=1),
        ],
        num_workers=1,
    )


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_batch_format(one_source):
    loader = TrainDataLoader(one_source, SEQ, 4, seed=0, progress=False)
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels", "seq_idx"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["seq_idx"].shape == (4, SEQ)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["seq_idx"].dtype == torch.int32
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert loader.vocab_size == 257 and loader.eod_id == 256
    assert loader.state_dict()["consumed_samples"] == 4


def test_resume_gives_exactly_the_same_batches(one_source):
    seq = 512
    uninterrupted = TrainDataLoader(one_source, seq, 3, seed=7, progress=False)
    assert 2 * len(uninterrupted.datasets[0]) < 40 * 3  # the run crosses two epoch boundaries
    reference = take(uninterrupted, 40)
    first = TrainDataLoader(one_source, seq, 3, seed=7, progress=False)
    assert same(take(first, 13), reference[:13])
    state = first.state_dict()
    assert all(isinstance(v, int) for v in (state["consumed_samples"], state["seed"]))
    resumed = TrainDataLoader(one_source, seq, 3, seed=7, progress=False)
    resumed.load_state_dict(state)
    assert same(take(resumed, 27), reference[13:])
    other_seed = TrainDataLoader(one_source, seq, 3, seed=8, progress=False)
    assert not same(take(other_seed, 5), reference[:5])


def test_each_epoch_is_a_permutation(one_source):
    loader = TrainDataLoader(one_source, SEQ, 1, seed=3, progress=False)
    n = len(loader.datasets[0])
    _, first = loader.order(np.arange(n))
    _, second = loader.order(np.arange(n, 2 * n))
    assert sorted(first.tolist()) == list(range(n)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()  # a new shuffle each epoch


def test_rank_shards_are_disjoint_and_cover(one_source):
    world, micro = 3, 2
    ranks = [
        TrainDataLoader(one_source, SEQ, micro, seed=5, rank=r, world_size=world, progress=False)
        for r in range(world)
    ]
    single = TrainDataLoader(one_source, SEQ, micro * world, seed=5, progress=False)
    steps = 4
    for _ in range(steps):
        parts = [next(loader) for loader in ranks]
        whole = next(single)
        for key in whole:  # the ranks' batches side by side are the one big batch
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    for loader in ranks:
        assert loader.state_dict()["consumed_samples"] == steps * micro * world
    # rank slices are disjoint and together cover every global sample of every step
    taken = [loader.rank_samples(step * micro * world) for step in range(steps) for loader in ranks]
    flat = np.concatenate(taken)
    assert len(set(flat.tolist())) == len(flat)
    assert sorted(flat.tolist()) == list(range(steps * micro * world))
    _, packed = ranks[0].order(flat)  # within one epoch they are distinct packed samples
    assert len(set(packed.tolist())) == len(flat)


def test_blending_proportions_and_determinism(two_sources):
    loader = TrainDataLoader(two_sources, SEQ, 8, seed=0, progress=False)
    batches = take(loader, 50)
    rows = torch.cat([b["input_ids"] for b in batches])
    from_a = (rows == ord("a")).any(dim=1)
    from_b = (rows == ord("b")).any(dim=1)
    assert not torch.any(from_a & from_b)
    share = from_a.float().mean().item()
    assert abs(share - 0.75) < 0.01
    again = TrainDataLoader(two_sources, SEQ, 8, seed=0, progress=False)
    assert same(take(again, 50), batches)


def test_eod_mask_loss(one_source):
    one_source.eod_mask_loss = True
    loader = TrainDataLoader(one_source, SEQ, 16, seed=0, progress=False)
    batch = next(loader)
    is_eod = batch["input_ids"] == loader.eod_id
    assert is_eod.any()
    assert torch.all(batch["labels"][is_eod] == -100)
    assert torch.all(batch["labels"][~is_eod] >= 0)


def test_validation_batches(one_source):
    val = build_validation_batches(one_source, SEQ, 2, progress=False)
    assert len(val) > 0
    again = build_validation_batches(one_source, SEQ, 2, progress=False)
    assert same(list(val), list(again))
    assert same(list(val), list(val))  # the same on every pass
    capped = build_validation_batches(one_source, SEQ, 2, num_batches=2, progress=False)
    assert len(capped) == 2
    ranks = [
        build_validation_batches(one_source, SEQ, 1, rank=r, world_size=2, progress=False)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(val)
    for b in range(len(val)):
        both = torch.cat([ranks[0][b]["input_ids"], ranks[1][b]["input_ids"]])
        assert torch.equal(both, val[b]["input_ids"])
    one_source.valid_fraction = 0.0
    assert len(build_validation_batches(one_source, SEQ, 2, progress=False)) == 0


def test_default_config_builds_from_a_small_stdlib(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(30):
        (lib / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 5)
    cfg = DataConfig(
        sources=[DataSourceConfig(kind="stdlib", path=str(lib))], num_workers=1, valid_fraction=0.2
    )
    loader = TrainDataLoader(cfg, 64, 2, seed=0, progress=False)
    text = loader.tokenizer.decode(next(loader)["input_ids"][0].tolist())
    assert "return x *" in text
    assert len(build_validation_batches(cfg, 64, 2, progress=False)) > 0


def test_loader_errors(one_source):
    with pytest.raises(ConfigError, match="too few"):
        TrainDataLoader(one_source, 10**6, 1, seed=0, progress=False)
    with pytest.raises(ConfigError, match="rank"):
        TrainDataLoader(one_source, SEQ, 1, seed=0, rank=2, world_size=2, progress=False)
    with pytest.raises(ConfigError, match="non-negative"):
        TrainDataLoader(one_source, SEQ, 1, seed=-1, progress=False)
