"""`hybrid generate` and `hybrid eval` on a checkpoint: outputs equal the library functions
they wrap, and bad flags or checkpoints give one line and exit status 2."""

import json

import pytest
import torch

from hybrid.checkpoint.store import save_checkpoint
from hybrid.cli import main
from hybrid.commands.generate import load_for_inference
from hybrid.data.loader import build_validation_batches
from hybrid.eval.perplexity import perplexity
from hybrid.infer import SamplingConfig, generate
from hybrid.model import build_model
from hybrid.recipe.recipe import recipe_from_dict

RECIPE = {
    "name": "cli-tiny",
    "model": {
        "d_model": 32,
        "vocab_size": 257,
        "layout": {"pattern": "M-*-"},
        "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 16},
        "attention": {"n_heads": 4},
        "mlp": {"hidden_size": 64},
    },
    "data": {
        "sources": [{"kind": "mqar", "mqar": {"seq_len": 32, "num_pairs": 3, "examples": 200}}],
        "valid_fraction": 0.1,
    },
    "train": {"seq_len": 64, "micro_batch_size": 2},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    recipe = recipe_from_dict(RECIPE)
    torch.manual_seed(0)
    model = build_model(recipe.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # outputs that depend on the input
    path = tmp_path_factory.mktemp("run")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(path, 7, model_state=state, train_state={}, recipe=recipe.to_dict())
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_prints_what_generate_returns(run_dir, capsys):
    code, out, _ = run(
        capsys,
        "generate",
        run_dir,
        "--prompt",
        "ab",
        "--prompt",
        "xyz",
        "--greedy",
        "--max-new-tokens",
        6,
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    loaded = load_for_inference(str(run_dir), [], "cpu", "fp32")
    tok = loaded.tokenizer
    ref = generate(
        loaded.model,
        [tok.encode("ab"), tok.encode("xyz")],
        max_new_tokens=6,
        sampling=SamplingConfig(temperature=0),
        eod_id=tok.eod_id,
        vocab_size=tok.vocab_size,
    )
    assert [o["completion"] for o in data["outputs"]] == [tok.decode(t) for t in ref.tokens]
    assert data["cache_bytes_per_sequence"] == ref.cache_bytes_per_sequence
    code, out, err = run(capsys, "generate", run_dir, "--prompt", "ab", "--max-new-tokens", 3)
    assert code == 0 and out.startswith("ab") and "ms/token" in err


def test_eval_reports_validation_and_probes(run_dir, capsys):
    code, out, _ = run(
        capsys,
        "eval",
        run_dir,
        "--batches",
        2,
        "--batch-size",
        2,
        "--examples",
        4,
        "--contexts",
        "128,192",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    loaded = load_for_inference(str(run_dir), [], "cpu", "fp32")
    batches = build_validation_batches(
        loaded.recipe.data, 64, 2, num_batches=2, tokenizer=loaded.tokenizer
    )
    ref = perplexity(loaded.model, batches)
    assert data["step"] == 7 and data["validation"]["loss"] == pytest.approx(ref.loss, rel=1e-9)
    assert data["validation"]["tokens"] == ref.tokens == 2 * 2 * 2 * 3  # answers only
    got = {(p["probe"], p["context"]) for p in data["probes"]}
    assert got == {("mqar", 128), ("mqar", 192), ("passkey", 128), ("passkey", 192)}
    assert all(0 <= p["accuracy"] <= 1 and p["examples"] == 4 for p in data["probes"])


def test_eval_on_another_source(run_dir, capsys):
    source = "{kind: passkey, passkey: {seq_len: 128, digits: 5, examples: 8}}"
    code, out, _ = run(
        capsys,
        "eval",
        run_dir,
        "--source",
        source,
        "--seq-len",
        128,
        "--batch-size",
        2,
        "--batches",
        3,
        "--probes",
        "none",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["probes"] == [] and data["validation"]["tokens"] == 3 * 2 * 6  # " NNNNN"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "{run}", "--prompt", "a", "--top-p", "1.5"], "--top-p"),
        (["generate", "{run}", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "{run}"], "--prompt"),
        (["generate", "{missing}", "--prompt", "a"], "no such checkpoint"),
        (["generate", "{run}", "--prompt", "a", "--set", "model.d_model=64"], "do not --set"),
        (["eval", "{run}", "--probes", "mqar,recall"], "unknown"),
        (["eval", "{run}", "--contexts", "12,x"], "--contexts"),
        (["eval", "{run}", "--source", "{kind: nope}"], "--source[0].kind"),
        (["eval", "{run}", "--probes", "passkey", "--contexts", "40", "--batches", "0"], "short"),
    ],
)
def test_bad_input_is_one_line_and_status_2(run_dir, tmp_path, capsys, argv, needle):
    places = {"{run}": str(run_dir), "{missing}": str(tmp_path / "nothing")}
    argv = [places.get(a, a) for a in argv]
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if not line.startswith("INFO")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
