"""`hybrid convert` from the command line: to-hf / from-hf with --verify, bf16, shards and an HF
tokenizer; every bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_helpers import perturbed_model, save_run, tiny_recipe

from hybrid.cli import main
from hybrid.data.tokenizer import HFTokenizer, train_bpe_tokenizer


def run(capsys, *argv):
    code = main(["convert", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def hf_tokenizer(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("def main():\n    return 'héllo wörld'\n" * 50 + "import os, sys\n" * 30)
    return train_bpe_tokenizer([str(text)], 280, str(tmp_path / "tok" / "tokenizer.json"))


@pytest.fixture
def tiny_run(tmp_path, hf_tokenizer):
    recipe = tiny_recipe(
        "cli-tiny",
        {"layout": {"pattern": "M-*-"}},
        data={"tokenizer": {"kind": "hf", "path": hf_tokenizer.path}},
    )
    return save_run(tmp_path / "run", recipe, perturbed_model(recipe))


def test_to_hf_bf16_shards_tokenizer_verify_and_back(capsys, tmp_path, tiny_run, hf_tokenizer):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    args = ("to-hf", str(tiny_run), str(out), "--dtype", "bf16", "--max-shard-size", "60KB")
    code, stdout, stderr = run(capsys, *args, "--verify")
    assert code == 0, stderr
    assert "BambaForCausalLM" in stdout and "verify passed" in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == Path(hf_tokenizer.path).read_bytes()
    text = "def main():\n    return 'héllo'"
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text)
    assert hf_tok.eos_token_id == hf_tokenizer.eod_id

    code, stdout, stderr = run(capsys, "from-hf", str(out), str(tmp_path / "back"), "--verify")
    assert code == 0, stderr
    assert "restored from hybrid_recipe.yaml" in stdout and "verify passed" in stdout
    copied = tmp_path / "back" / "tokenizer" / "tokenizer.json"
    assert HFTokenizer(str(copied)).encode(text) == hf_tokenizer.encode(text)
    recipe_text = (tmp_path / "back" / "recipe.yaml").read_text()
    assert str(copied) in recipe_text


def test_force_replaces_an_existing_export(capsys, tmp_path, tiny_run):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code, _, err = run(capsys, "to-hf", str(tiny_run), str(out))
    assert code == 2 and "not empty" in err and (out / "old.txt").exists()
    code, _, err = run(capsys, "to-hf", str(tiny_run), str(out), "--force")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["to-hf", "{tmp}/nothing", "{tmp}/o"], "no such checkpoint"),
        (["to-hf", "{run}", "{tmp}/o", "--target", "nemotron_h"], "NemotronHForCausalLM cannot"),
        (["to-hf", "{run}", "{tmp}/o", "--target", "llama"], "known targets"),
        (["to-hf", "{run}", "{tmp}/o", "--max-shard-size", "lots"], "--max-shard-size"),
        (["to-hf", "{run}", "{tmp}/o", "--tokenizer", "{tmp}/none.json"], "--tokenizer PATH"),
        (["from-hf", "{tmp}", "{tmp}/o"], "no config.json"),
        (["from-hf", "{llama}", "{tmp}/o"], "model_type 'llama'"),
        (["from-hf", "{tmp}/absent", "{tmp}/o"], "no such directory"),
        (["from-hf", "{tmp}/hfdir", "{run}"], "already holds a run"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, tmp_path, tiny_run, argv, needle):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "hfdir").mkdir()
    (tmp_path / "hfdir" / "config.json").write_text('{"model_type": "mamba2"}')
    names = {"tmp": tmp_path, "run": tiny_run, "llama": llama}
    code, _, err = run(capsys, *[a.format(**names) for a in argv])
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_capacity_factor_needs_dropless(capsys, tmp_path):
    moe = {"router": "topk_softmax", "n_shared_experts": 1, "capacity_factor": 1.25}
    recipe = tiny_recipe("cap", {"layout": {"pattern": "ME*E"}, "moe": moe})
    run_dir = save_run(tmp_path / "run", recipe, perturbed_model(recipe))
    code, _, err = run(capsys, "to-hf", str(run_dir), str(tmp_path / "o"))
    assert code == 2 and "--dropless" in err
    code, out, err = run(
        capsys, "to-hf", str(run_dir), str(tmp_path / "o"), "--dropless", "--verify"
    )
    assert code == 0 and "GraniteMoeHybridForCausalLM" in out and "verify passed" in out, err


def test_verify_fails_on_a_wrong_export(tmp_path, tiny_run):
    from hybrid.convert import ExportOptions, export_to_hf, verify_export

    result = export_to_hf(tiny_run, tmp_path / "hf", ExportOptions())
    wrong = dict(result.state)
    wrong["layers.1.mixer.up_proj.weight"] = wrong["layers.1.mixer.up_proj.weight"] * 1.01
    report = verify_export(tmp_path / "hf", result.model, wrong, remote_code=False)
    assert not report.passed and report.max_rel_error > 1e-4
    assert "FAILED" in report.summary()
    good = verify_export(tmp_path / "hf", result.model, result.state, remote_code=False)
    assert good.passed and good.greedy_equal == good.greedy_total
    assert torch.isfinite(torch.tensor(good.max_rel_error))
