import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from data_helpers import random_texts, write_jsonl

from hybrid.data.cache import cached_entry
from hybrid.data.indexed import IndexedDataset
from hybrid.data.sources import (
    is_validation_path,
    list_stdlib_files,
    load_source,
    load_sources,
    stdlib_root,
)
from hybrid.data.tokenizer import ByteTokenizer
from hybrid.recipe.data_config import DataConfig, DataSourceConfig
from hybrid.recipe.schema import ConfigError


def test_default_stdlib_listing_is_real_sorted_and_split_stably():
    files = list_stdlib_files()
    assert len(files) > 300
    assert files == sorted(files) and len(set(files)) == len(files)
    root = stdlib_root()
    assert all((root / f).is_file() for f in files[:: max(1, len(files) // 50)])
    assert "os.py" in files and "json/__init__.py" in files
    assert not any(
        part in ("test", "tests", "site-packages", "__pycache__")
        for f in files
        for part in f.split("/")
    )
    valid = [f for f in files if is_validation_path(f, 0.02)]
    assert 0 < len(valid) < 0.06 * len(files)
    # the split depends on the path only, not on the process (PYTHONHASHSEED, ...)
    code = (
        "from hybrid.data.sources import list_stdlib_files, is_validation_path;"
        "print('\\n'.join(f for f in list_stdlib_files() if is_validation_path(f, 0.02)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == valid
    assert list_stdlib_files(max_files=7) == files[:7]


def make_py_root(root: Path, n: int = 40) -> Path:
    for i, text in enumerate(random_texts(n, seed=5)):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"# module {i}\nNAME = {text!r}\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("excluded = True\n")
    (root / "empty.py").write_text("")  # tokenises to nothing: skipped
    return root


def test_stdlib_source_on_custom_root_is_cached(tmp_path, private_cache, monkeypatch):
    root = make_py_root(tmp_path / "lib")
    src = DataSourceConfig(kind="stdlib", path=str(root))
    cfg = DataConfig(sources=[src], valid_fraction=0.2, num_workers=1)
    data = load_source(src, cfg, progress=False)
    files = list_stdlib_files(root)
    assert len(files) == 41 and "tests/test_x.py" not in files
    n_valid = sum(is_validation_path(f, 0.2) for f in files)
    assert data.train.num_documents + data.valid.num_documents == 40
    assert data.valid.num_documents == n_valid
    tok = ByteTokenizer()
    train_texts = [tok.decode(data.train.dataset.document(d)) for d in range(3)]
    assert train_texts[0].startswith("# module ")
    entries = [p for p in private_cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()

    # a second load finds the cache and tokenises nothing
    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr("hybrid.data.sources.TokenizePool", refuse)
    again = load_source(src, cfg, progress=False)
    assert again.train.dataset.num_tokens == data.train.dataset.num_tokens
    # editing a file changes the key and so rebuilds
    (root / "pkg0" / "mod0.py").write_text("# changed, and longer than before\n")
    with pytest.raises(AssertionError, match="reused"):
        load_source(src, cfg, progress=False)
    # max_files takes a prefix of the sorted listing
    monkeypatch.undo()
    monkeypatch.setenv("HYBRID_CACHE", str(private_cache))
    small = DataSourceConfig(kind="stdlib", path=str(root), max_files=5)
    part = load_source(small, cfg, holdout=False, progress=False)
    assert part.valid is None and part.train.num_documents == 4  # empty.py is one of 5


def test_cache_build_is_atomic_and_race_safe(tmp_path):
    calls = []

    def slow_build(tmp):
        calls.append(tmp)
        (tmp / "data.txt").write_text("x")
        time.sleep(0.2)
        return {"ok": True}

    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cached_entry(tmp_path, "n", "k", slow_build))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # the lock made the others wait and reuse
    assert len(set(results)) == 1 and (results[0] / "data.txt").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]

    # a builder that loses the rename race uses the winner's entry
    def racing_build(tmp):
        winner = tmp_path / "m-k"
        winner.mkdir()
        (winner / "meta.json").write_text("{}")
        return {}

    assert cached_entry(tmp_path, "m", "k", racing_build) == tmp_path / "m-k"

    def failing_build(tmp):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_entry(tmp_path, "f", "k", failing_build)
    assert not (tmp_path / "f-k").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_hf_local_source_and_holdout(tmp_path, corpus_jsonl):
    src = DataSourceConfig(kind="hf", path=str(corpus_jsonl))
    cfg = DataConfig(sources=[src], valid_fraction=0.1, num_workers=1)
    data = load_source(src, cfg, progress=False)
    ds = data.train.dataset
    assert ds.num_documents == 201  # one empty row skipped
    assert data.valid.end == 201 and data.valid.num_documents == 20  # the last 10%
    assert data.train.num_documents == 181
    whole = load_source(src, cfg, holdout=False, progress=False)
    assert whole.valid is None and whole.train.num_documents == 201
    # a glob over a directory and max_files
    write_jsonl(tmp_path / "more.jsonl", random_texts(10, seed=9))
    glob_src = DataSourceConfig(kind="hf", path=str(tmp_path / "*.jsonl"), max_files=1)
    assert load_source(glob_src, cfg, holdout=False, progress=False).train.num_documents == 201


def test_indexed_source_and_valid_sources(tmp_path, corpus_jsonl):
    from hybrid.data.prepare import prepare

    prepare([str(corpus_jsonl)], str(tmp_path / "prep"), progress=False)
    write_jsonl(tmp_path / "val.jsonl", random_texts(30, seed=7))
    cfg = DataConfig(
        sources=[DataSourceConfig(kind="indexed", path=str(tmp_path / "prep"))],
        valid_sources=[DataSourceConfig(kind="hf", path=str(tmp_path / "val.jsonl"))],
        num_workers=1,
    )
    tok, train, valid = load_sources(cfg, progress=False)
    assert train[0].train.num_documents == 201 and train[0].valid is None
    assert len(valid) == 1 and valid[0].num_documents == 30
    assert isinstance(train[0].train.dataset, IndexedDataset)


def test_source_errors(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    cfg = DataConfig(num_workers=1)
    bad = DataSourceConfig(kind="indexed", path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*no indexed dataset"):
        load_sources(DataConfig(sources=[bad]), progress=False)
    with pytest.raises(ConfigError, match="no files match"):
        load_source(DataSourceConfig(kind="hf", path=str(tmp_path / "*.jsonl")), cfg)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="need network access"):
        load_source(DataSourceConfig(kind="hf", path="someone/some-dataset"), cfg, progress=False)
    with pytest.raises(ConfigError, match="no \\*.py files"):
        (tmp_path / "empty").mkdir()
        load_source(DataSourceConfig(kind="stdlib", path=str(tmp_path / "empty")), cfg)
