from pathlib import Path

import pytest

from hybrid.recipe.data_config import DataConfig, DataSourceConfig, default_cache_dir
from hybrid.recipe.schema import ConfigError, from_dict, to_dict


def test_default_means_embedded_stdlib(monkeypatch):
    cfg = DataConfig()
    (src,) = cfg.resolved_sources()
    assert src.kind == "stdlib" and src.path is None
    assert cfg.tokenizer.kind == "byte"
    assert 0 < cfg.valid_fraction < 0.05
    assert from_dict(DataConfig, to_dict(cfg)) == cfg
    assert from_dict(DataConfig, {}) == cfg


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path / "c"))
    assert DataConfig().resolved_cache_dir() == str(tmp_path / "c")
    assert DataConfig(cache_dir="/x/y").resolved_cache_dir() == "/x/y"
    monkeypatch.delenv("HYBRID_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "hybrid")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == str(Path.home() / ".cache" / "hybrid")


def test_yaml_form_parses():
    cfg = from_dict(
        DataConfig,
        {
            "tokenizer": {"kind": "hf", "path": "tok/tokenizer.json"},
            "sources": [
                {"kind": "hf", "path": "web/*.jsonl", "weight": 3},
                {"kind": "indexed", "path": "/data/code_text_document"},
            ],
            "valid_fraction": 0.005,
            "eod_mask_loss": True,
            "num_workers": 4,
        },
    )
    assert [s.weight for s in cfg.resolved_sources()] == [3.0, 1.0]
    assert cfg.resolved_num_workers() == 4


@pytest.mark.parametrize(
    "data,key",
    [
        ({"sources": [{"kind": "hf"}]}, "sources[0].path"),
        ({"sources": [{"kind": "indexed"}]}, "sources[0].path"),
        ({"sources": [{"kind": "stdlib", "weight": 0}]}, "sources[0].weight"),
        ({"sources": [{"kind": "parquet", "path": "x"}]}, "sources[0].kind"),
        ({"sources": [{"kind": "stdlib", "name": "x"}]}, "sources[0].name"),
        ({"valid_fraction": 1.0}, "valid_fraction"),
        ({"num_workers": 0}, "num_workers"),
        ({"sourcse": []}, "sourcse"),
    ],
)
def test_bad_settings_name_their_key(data, key):
    with pytest.raises(ConfigError) as info:
        from_dict(DataConfig, data, path="data")
    assert info.value.key == f"data.{key}"


def test_describe():
    assert DataSourceConfig().describe() == "stdlib"
    assert DataSourceConfig(kind="hf", path="a.jsonl").describe() == "hf:a.jsonl"
