import argparse

import pytest
from data_helpers import random_texts, write_jsonl

from hybrid.commands import data as data_command
from hybrid.data.indexed import IndexedDataset
from hybrid.data.tokenizer import HFTokenizer
from hybrid.recipe.schema import ConfigError


def parse(argv):
    parser = argparse.ArgumentParser(prog="hybrid")
    sub = parser.add_subparsers(dest="command", required=True)
    data_command.add_parser(sub)
    return parser.parse_args(argv)


def run(argv):
    args = parse(argv)
    return args.func(args)


def test_help_has_examples(capsys):
    for argv in (
        ["data", "--help"],
        ["data", "prepare", "--help"],
        ["data", "train-tokenizer", "--help"],
    ):
        with pytest.raises(SystemExit) as info:
            parse(argv)
        assert info.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_train_tokenizer_then_prepare(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", random_texts(300, seed=2))
    tok_path = tmp_path / "tok" / "tokenizer.json"
    code = run(
        [
            "data",
            "train-tokenizer",
            str(corpus),
            "--vocab-size",
            "300",
            "--output",
            str(tok_path),
            "--quiet",
        ]
    )
    assert code == 0 and tok_path.is_file()
    assert "end-of-document '<|endoftext|>'" in capsys.readouterr().out
    code = run(
        [
            "data",
            "prepare",
            str(corpus),
            "--output",
            str(tmp_path / "out"),
            "--tokenizer",
            str(tok_path),
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert "300 documents" in line and "tokens" in line and " s " in line
    ds = IndexedDataset(tmp_path / "out")
    tok = HFTokenizer(str(tok_path))
    assert ds.document(0)[-1] == tok.eod_id
    assert tok.decode(ds.document(0)[:-1]) == random_texts(300, seed=2)[0]


def test_user_errors_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no files match"):
        run(["data", "prepare", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "o"), "-q"])
    with pytest.raises(ConfigError, match="--tokenizer"):
        run(["data", "prepare", "x.jsonl", "-o", "o", "--tokenizer", str(tmp_path / "no.json")])
    with pytest.raises(ConfigError, match="--workers"):
        run(["data", "prepare", "x.jsonl", "-o", "o", "--workers", "0"])
    with pytest.raises(ConfigError, match="at least 258"):
        run(["data", "train-tokenizer", "x.txt", "--vocab-size", "10", "-o", "t.json"])
