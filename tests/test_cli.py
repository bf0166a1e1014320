"""The command line: `hybrid inspect` output, and one-line errors with exit status 2 for bad
recipes, flags and overrides (never a traceback)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "debug" / "hybrid-tiny.yaml"


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_table(capsys):
    code, out, _ = run(capsys, "inspect", str(TINY))
    assert code == 0
    assert "M-M-*-M-" in out and "attention-only" in out and "cache / sequence" in out


def test_inspect_json_keys_and_overrides(capsys):
    code, out, _ = run(
        capsys,
        "inspect",
        str(TINY),
        "--json",
        "--context",
        "1000",
        "--set",
        "model.layout.pattern=M*M*",
        "--set",
        "model.d_model=256",
    )
    assert code == 0
    data = json.loads(out)
    for key in ("pattern", "params_total", "params_active", "flops_per_token", "cache_bytes"):
        assert key in data and key in data["baseline"]
    assert data["pattern"] == "M*M*" and data["baseline"]["pattern"] == "****"
    assert data["context"] == 1000
    assert data["cache_bytes"] < data["baseline"]["cache_bytes"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text,needles",
    [
        ("model:\n  d_modle: 64\n", ["bad.yaml", "model.d_modle", "did you mean 'd_model'"]),
        ("model:\n  d_model: wide\n", ["bad.yaml", "model.d_model", "expected int"]),
        ("model:\n  d_model: -4\n", ["model.d_model", "must be positive"]),
        ("model:\n  layout: {pattern: 'M*X'}\n", ["model.layout.pattern", "unknown symbol 'X'"]),
        (
            "model:\n  d_model: 96\n  attention: {n_heads: 5}\n",
            ["model.attention.n_heads", "not divisible"],
        ),
        ("model: [1, 2]\n", ["model", "expected a mapping"]),
        ("model:\n  d_model: 64\n  bad: [\n", ["invalid YAML", "line"]),
        ("base: missing.yaml\n", ["base recipe 'missing.yaml' not found"]),
    ],
)
def test_bad_recipes_give_one_line_and_exit_2(capsys, tmp_path, text, needles):
    path = write(tmp_path, "bad.yaml", text)
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err


def test_base_inheritance_and_cycle(capsys, tmp_path):
    write(tmp_path, "a.yaml", f"base: {TINY}\nmodel:\n  d_model: 64\n")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "a.yaml"), "--json")
    assert code == 0 and json.loads(out)["pattern"] == "M-M-*-M-"
    write(tmp_path, "x.yaml", "base: y.yaml\n")
    write(tmp_path, "y.yaml", "base: x.yaml\n")
    code, _, err = run(capsys, "inspect", str(tmp_path / "x.yaml"))
    assert code == 2 and "base: cycle x.yaml -> y.yaml -> x.yaml" in err


def test_error_names_the_file_that_set_the_key(capsys, tmp_path):
    write(tmp_path, "base.yaml", "model:\n  mamba: {head_dim: 48}\n")
    write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  d_model: 64\n")
    code, _, err = run(capsys, "inspect", str(tmp_path / "child.yaml"))
    assert code == 2 and "base.yaml" in err and "model.mamba.head_dim" in err


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.d_model", "--set expects key.path=value"),
        ("model.mamba.d_stat=4", "did you mean 'd_state'"),
        ("model.d_model.x=4", "is not a mapping"),
        ("train.seq_len=0", "train.seq_len"),
    ],
)
def test_bad_overrides(capsys, override, needle):
    code, _, err = run(capsys, "inspect", str(TINY), "--set", override)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_missing_recipe_and_bad_flag(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", str(tmp_path / "nope.yaml"))
    assert code == 2 and "recipe file not found" in err
    code, _, err = run(capsys, "inspect", str(TINY), "--context", "0")
    assert code == 2 and "--context" in err


def test_real_process_prints_no_traceback(tmp_path):
    path = write(tmp_path, "bad.yaml", "model:\n  layout: {pattern: 'MGM'}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid.cli", "inspect", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not implement" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_print_recipe_round_trips(capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", str(TINY), "--print-recipe", "--set", "model.d_model=64")
    assert code == 0 and "d_state: 16" in out and "d_model: 64" in out
    path = write(tmp_path, "resolved.yaml", out)
    from hybrid.recipe.recipe import load_recipe

    assert load_recipe(path) == load_recipe(TINY, ["model.d_model=64"])


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.layout.attention_ratio=1:7", "M-M-M-M-*-M-M-M-"),  # YAML 1.1 would read 67
        ("name=2024", "M-M-*-M-"),
    ],
)
def test_yaml_scalars_are_read_as_written(capsys, override, expected):
    extra = ["--set", "model.layout.pattern=null", "--set", "model.layout.n_layers=8"]
    argv = ["inspect", str(TINY), "--json", "--set", override]
    if "attention_ratio" in override:
        argv += extra
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["pattern"] == expected


def test_unused_attention_settings_name_the_comparison_model(capsys):
    mamba = ROOT / "recipes" / "debug" / "mamba-tiny.yaml"
    code, _, err = run(capsys, "inspect", str(mamba), "--set", "model.attention.n_heads=3")
    assert code == 2 and "model.attention.n_heads" in err and "comparison model" in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--run-dir", "/tmp/{nme}"], "only the placeholder {name}"),
        (["--stop-at-step", "0"], "--stop-at-step must be at least 1"),
        (["--set", "train.global_batch=6"], "not divisible"),
    ],
)
def test_train_flag_errors(capsys, argv, needle):
    code, _, err = run(capsys, "train", str(TINY), *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
