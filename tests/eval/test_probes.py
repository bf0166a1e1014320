"""Probe scores equal naive re-computations: MQAR accuracy from one forward per example, passkey
accuracy from greedy decoding with full forward passes (no cache); perplexity equals the
cross-entropy computed directly."""

import math

import torch

from hybrid.data.tokenizer import ByteTokenizer
from hybrid.eval.perplexity import perplexity
from hybrid.eval.probes import PROBES, default_contexts, probe_examples, probe_settings
from hybrid.model import build_model
from hybrid.recipe.data_config import DataSourceConfig, MQARConfig, PasskeyConfig
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import from_dict

TOK = ByteTokenizer()


class SmallVocab:
    """MQAR needs only a vocabulary size and an end-of-document id: 12 ids, so that a random
    model's argmax often lands on the 4 value ids and the accuracy is neither 0 nor 1."""

    vocab_size = 12
    eod_id = 11


def tiny_model(seed: int = 0):
    cfg = from_dict(
        ModelConfig,
        {
            "d_model": 32,
            "vocab_size": 257,
            "pad_vocab_multiple": 64,
            "layout": {"pattern": "M-*-"},
            "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 16},
            "attention": {"n_heads": 4},
            "mlp": {"hidden_size": 64},
        },
    )
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a model whose argmax varies: larger output weights
        model.lm_head.weight.mul_(40)
    return model


def test_mqar_probe_equals_naive_scoring():
    model = tiny_model()
    settings = MQARConfig(num_pairs=4, key_vocab=6, value_vocab=4)
    tok = SmallVocab()
    res = PROBES["mqar"](model, settings, tok, context=40, examples=12, batch_size=5, seed=3)
    ex = probe_examples("mqar", settings, tok, context=40, examples=12, seed=3)
    right = total = whole = 0
    with torch.no_grad():
        for row, mask in zip(ex.tokens.tolist(), ex.loss_mask.tolist()):
            logits = model(torch.tensor([row])).logits[0, :, :12]
            hits = [int(logits[p - 1].argmax()) == row[p] for p, m in enumerate(mask) if m]
            right, total, whole = right + sum(hits), total + len(hits), whole + all(hits)
    assert (res.context, res.examples) == (40, 12)
    assert res.accuracy == right / total and res.secondary == whole / 12
    assert 0 < res.accuracy < 1  # a non-trivial case


def test_passkey_probe_equals_naive_greedy_decoding():
    model = tiny_model(1)
    settings = PasskeyConfig(digits=3)
    res = PROBES["passkey"](model, settings, TOK, context=120, examples=4, batch_size=3, seed=0)
    ex = probe_examples("passkey", settings, TOK, context=120, examples=4, seed=0)
    exact = right = total = 0
    with torch.no_grad():
        for row, start in zip(ex.tokens.tolist(), ex.answer_start().tolist()):
            seq, want = row[:start], row[start:119]
            for _ in want:
                seq.append(int(model(torch.tensor([seq])).logits[0, -1, :257].argmax()))
            got = seq[start:]
            same = [g == w for g, w in zip(got, want)]
            exact, right, total = exact + all(same), right + sum(same), total + len(want)
    assert res.accuracy == exact / 4 and res.secondary == right / total


def test_perplexity_equals_direct_cross_entropy():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 257, (2, 17), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, :5] = -100
        batches.append({"input_ids": ids[:, :-1], "labels": labels})
    res = perplexity(model, batches)
    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"]).logits for b in batches]).flatten(0, 1)
    labels = torch.cat([b["labels"] for b in batches]).flatten()
    ref = torch.nn.functional.cross_entropy(logits.double(), labels, ignore_index=-100).item()
    assert math.isclose(res.loss, ref, rel_tol=1e-6) and res.tokens == 3 * (32 - 5)
    assert math.isclose(res.perplexity, math.exp(ref), rel_tol=1e-6)


def test_probe_settings_come_from_the_recipe_sources():
    src = from_dict(DataSourceConfig, {"kind": "mqar", "mqar": {"num_pairs": 3, "seq_len": 48}})
    settings, found = probe_settings("mqar", [DataSourceConfig(), src])
    assert found and settings.num_pairs == 3
    default, found = probe_settings("passkey", [src])
    assert not found and default == PasskeyConfig()
    assert default_contexts(settings) == [24, 48, 96, 192]
