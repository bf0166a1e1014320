"""MQAR and passkey generators against a naive reading of each example, the `mqar` / `passkey`
source kinds through the data pipeline (loss on answers only, whole examples per row), and
one-line errors for bad settings."""

import json
import math

import numpy as np
import pytest
import torch

from hybrid.data.loader import TrainDataLoader, build_validation_batches
from hybrid.data.synthetic import generate_examples, passkey_info
from hybrid.data.tokenizer import ByteTokenizer
from hybrid.recipe.data_config import DataConfig, MQARConfig, PasskeyConfig
from hybrid.recipe.schema import ConfigError, from_dict

TOK = ByteTokenizer()


def naive_mqar_answers(row: list[int], cfg: MQARConfig) -> dict[int, int]:
    """Position -> expected token for every query in the example, read naively."""
    pairs = {row[2 * i]: row[2 * i + 1] for i in range(cfg.num_pairs)}
    answers = {}
    for pos in range(2 * cfg.num_pairs, len(row) - 1):
        if row[pos] in pairs and (pos - 2 * cfg.num_pairs) % 2 == 0:
            answers[pos + 1] = pairs[row[pos]]
    return answers


def test_mqar_examples_match_a_naive_reading():
    cfg = MQARConfig(seq_len=48, num_pairs=5, num_queries=3, key_vocab=12, value_vocab=7)
    ex = generate_examples("mqar", cfg, TOK, 200)
    assert ex.tokens.shape == ex.loss_mask.shape == (200, 48)
    for row, mask in zip(ex.tokens.tolist(), ex.loss_mask.tolist()):
        keys = row[0:10:2]
        assert len(set(keys)) == 5 and all(0 <= k < 12 for k in keys)
        assert all(12 <= v < 19 for v in row[1:10:2]) and row[-1] == TOK.eod_id
        answers = naive_mqar_answers(row, cfg)
        assert sorted(answers) == [i for i, m in enumerate(mask) if m] and len(answers) == 3
        assert all(row[p] == v for p, v in answers.items())
        rest = [
            t for i, t in enumerate(row[10:-1], 10) if i not in answers and i + 1 not in answers
        ]
        assert set(rest) <= {cfg.filler_id}
    again = generate_examples("mqar", cfg, TOK, 200)
    assert np.array_equal(again.tokens, ex.tokens)  # reproducible from the seed


def test_passkey_examples_hold_the_key_once_and_end_with_it():
    cfg = PasskeyConfig(seq_len=200, digits=4)
    ex = generate_examples("passkey", cfg, TOK, 20)
    for row, mask in zip(ex.tokens.tolist(), ex.loss_mask.tolist()):
        assert len(row) == 200 and row[-1] == TOK.eod_id
        text = TOK.decode(row)
        answer = TOK.decode([t for t, m in zip(row, mask) if m])
        key = answer.strip()
        assert len(key) == 4 and key.isdigit() and text.endswith("The pass key is " + key)
        assert text.count(passkey_info(key)) == 1


@pytest.mark.parametrize(
    "settings,needle",
    [
        ({"kind": "mqar", "mqar": {"seq_len": 10, "num_pairs": 4}}, "seq_len 10 is too short"),
        (
            {"kind": "mqar", "mqar": {"num_pairs": 9, "key_vocab": 8}},
            "num_pairs must be <= key_vocab",
        ),
        ({"kind": "hf", "path": "x.jsonl", "mqar": {}}, "only a source of kind 'mqar'"),
        ({"kind": "passkey", "path": "x"}, "takes no path"),
        ({"kind": "mqar", "mqar": {"seq_lenn": 4}}, "did you mean 'seq_len'"),
    ],
)
def test_bad_source_settings_are_config_errors(settings, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(DataConfig, {"sources": [settings]})


def test_ids_outside_the_vocabulary_and_short_passkeys_are_config_errors():
    with pytest.raises(ConfigError, match="vocabulary"):
        generate_examples("mqar", MQARConfig(first_id=200, key_vocab=64), TOK, 2)
    with pytest.raises(ConfigError, match="too short"):
        generate_examples("passkey", PasskeyConfig(seq_len=40), TOK, 2)


def data_cfg(**mqar) -> DataConfig:
    settings = {"seq_len": 32, "num_pairs": 3, "key_vocab": 16, "value_vocab": 16, "examples": 400}
    return from_dict(DataConfig, {"sources": [{"kind": "mqar", "mqar": {**settings, **mqar}}]})


def test_mqar_source_batches_have_whole_examples_and_answer_labels_only():
    cfg = data_cfg()
    loader = TrainDataLoader(cfg, seq_len=128, micro_batch_size=3, seed=0)
    batch = next(loader)
    ids, labels, seq_idx = batch["input_ids"], batch["labels"], batch["seq_idx"]
    assert torch.equal(seq_idx, (torch.arange(128) // 32).expand(3, -1).int())
    settings = cfg.sources[0].mqar
    for row, lab in zip(ids.tolist(), labels.tolist()):
        expected = {}
        for e in range(4):  # four 32-token examples per row
            example = row[32 * e : 32 * e + 32]
            for pos, value in naive_mqar_answers(example, settings).items():
                expected[32 * e + pos - 1] = value  # the label of the position before
        assert {i: v for i, v in enumerate(lab) if v != -100} == expected
    valid = build_validation_batches(cfg, 128, 1)
    assert len(valid) == 1 and int((valid[0]["labels"] != -100).sum()) == 4 * 3


def test_example_length_must_divide_seq_len():
    with pytest.raises(ConfigError, match="must divide train.seq_len"):
        TrainDataLoader(data_cfg(), seq_len=100, micro_batch_size=1, seed=0)


def test_hybrid_train_trains_on_mqar(tmp_path, capsys):
    from hybrid.cli import main

    recipe = {
        "name": "mqar-train",
        "model": {
            "d_model": 32,
            "vocab_size": 257,
            "layout": {"pattern": "M*"},
            "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 16},
            "attention": {"n_heads": 4},
        },
        "data": {
            "sources": [{"kind": "mqar", "mqar": {"seq_len": 32, "num_pairs": 4, "examples": 200}}]
        },
        "train": {"seq_len": 64, "micro_batch_size": 2, "steps": 3, "eval_every": 0},
    }
    path = tmp_path / "mqar.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
