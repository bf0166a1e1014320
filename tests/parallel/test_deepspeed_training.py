"""The DeepSpeed backend on CPU (gloo, 2 processes) against the single-process local backend.

One `torchrun` launch of `deepspeed_driver.py` trains a tiny hybrid MoE model 20 steps in fp32
under ZeRO 0-3 and under expert parallelism (EP=2, 4 experts), stops and resumes some runs;
a second launch resumes a 2-rank ZeRO-3 checkpoint on 1 rank. References: the local backend on
one process (same global batch: 4 micro-batches there, 2 per rank here), and the uninterrupted
runs. Tolerance: relative 1e-5 on per-step losses (reduction order is the only difference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("deepspeed")

from hybrid.checkpoint.store import load_checkpoint  # noqa: E402
from hybrid.recipe.recipe import load_recipe  # noqa: E402
from hybrid.train.loop import train  # noqa: E402

STEPS, STOP = 20, 10
TOL = 1e-5
TINY = {
    "name": "tiny-ds",
    "model": {
        "d_model": 64,
        "vocab_size": 257,
        "layout": {"pattern": "M-*EM-"},
        "mamba": {"d_state": 8, "head_dim": 16, "chunk_size": 16},
        "attention": {"n_heads": 4},
        "mlp": {"hidden_size": 128},
        "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 64},
    },
    "data": {"sources": [{"kind": "stdlib", "max_files": 40}], "valid_fraction": 0.1},
    "train": {
        "seq_len": 64,
        "micro_batch_size": 2,
        "global_batch": 8,
        "steps": STEPS,
        "seed": 7,
        "log_every": 1,
        "eval_every": 0,
        "save_every": 0,
        "optimizer": {"lr": 3.0e-3, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
    },
}
DS = ["parallel.backend=deepspeed"]
# a small reduce bucket (several ZeRO reductions per step) through the free-form block
BUCKETS = "parallel.deepspeed={zero_optimization: {reduce_bucket_size: 20000}}"


OFFLOAD = ["parallel.offload_optimizer=true", "parallel.offload_params=true"]
BF16 = "train.precision=bf16"


def ds_args(stage: int, *extra: str) -> list[str]:
    return [*DS, f"parallel.zero_stage={stage}", *extra]


def run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train everything once; returns the base directory and the launches' logs."""
    base = tmp_path_factory.mktemp("ds")
    recipe = base / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYBRID_CACHE": str(base / "cache")}
    plan = [
        {"run_dir": str(base / "z0"), "set": ds_args(0)},
        {"run_dir": str(base / "z1"), "set": ds_args(1, BUCKETS)},
        {"run_dir": str(base / "z2"), "set": ds_args(2)},
        {"run_dir": str(base / "z3"), "set": ds_args(3)},
        {"run_dir": str(base / "z3-offload"), "set": ds_args(3, *OFFLOAD)},
        {"run_dir": str(base / "z2-bf16"), "set": ds_args(2, BF16)},
        {"run_dir": str(base / "ep2"), "set": ds_args(2, "parallel.ep=2")},
        {"run_dir": str(base / "z2-resumed"), "set": ds_args(2), "stop_at_step": STOP},
        {"run_dir": str(base / "z2-resumed"), "set": ds_args(2)},
        {
            "run_dir": str(base / "ep2-resumed"),
            "set": ds_args(2, "parallel.ep=2"),
            "stop_at_step": STOP,
        },
        {"copy": [str(base / "ep2-resumed"), str(base / "ep2-to-local")]},
        {"run_dir": str(base / "ep2-resumed"), "set": ds_args(2, "parallel.ep=2")},
        {"run_dir": str(base / "z3-to-1rank"), "set": ds_args(3), "stop_at_step": STOP},
    ]
    (base / "plan.json").write_text(json.dumps({"recipe": str(recipe), "runs": plan}))
    driver = Path(__file__).with_name("deepspeed_driver.py")
    two = run([*TORCHRUN, str(driver), str(base / "plan.json")], env, base)
    # the 2-rank ZeRO-3 checkpoint resumed by one process (no launcher), through the CLI
    sets = [a for s in ds_args(3) for a in ("--set", s)]
    one = run(
        [sys.executable, "-m", "hybrid.cli", "train", str(recipe), *sets, "--resume"]
        + ["--run-dir", str(base / "z3-to-1rank")],
        env,
        base,
    )
    # the single-process local reference, and the EP=2 checkpoint resumed by the local backend
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYBRID_CACHE", env["HYBRID_CACHE"])
        train(load_recipe(recipe), run_dir=str(base / "local"))
        train(load_recipe(recipe, [BF16]), run_dir=str(base / "local-bf16"))
        train(load_recipe(recipe), run_dir=str(base / "ep2-to-local"), resume="always")
    return base, two.stderr + two.stdout, one.stderr + one.stdout


def metrics(run_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows}


def assert_close(a: dict[int, float], b: dict[int, float], steps, tol: float = TOL) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= tol * abs(a[s]), (s, a[s], b[s])


ALL = range(1, STEPS + 1)
AFTER_STOP = range(STOP + 1, STEPS + 1)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process(runs, stage):
    base, _, _ = runs
    ref = metrics(base / "local")
    assert sorted(ref) == list(ALL)
    assert_close(ref, metrics(base / f"z{stage}"), ALL)
    # gradient norms (DeepSpeed's, or measured after its all-reduce at stage 0) agree as well
    assert_close(
        metrics(base / "local", "grad_norm"), metrics(base / f"z{stage}", "grad_norm"), ALL, 1e-4
    )


@pytest.mark.slow
def test_zero3_with_optimizer_and_parameter_offload_matches(runs):
    base, log, _ = runs
    assert "optimizer offload, parameter offload" in log
    assert_close(metrics(base / "local"), metrics(base / "z3-offload"), ALL)


@pytest.mark.slow
def test_bf16_with_fp32_masters_tracks_local_bf16(runs):
    """DeepSpeed's bf16 (bf16 weights, fp32 masters in ZeRO) against the local backend's bf16
    autocast over fp32 weights: the same training up to bf16 rounding (0.5% per step)."""
    base, log, _ = runs
    assert "DeepSpeed bf16 (fp32 masters)" in log
    assert_close(metrics(base / "local-bf16"), metrics(base / "z2-bf16"), ALL, 5e-3)


@pytest.mark.slow
def test_expert_parallel_matches_ep1(runs):
    base, log, _ = runs
    assert "2 of 4 experts on each rank" in log
    assert_close(metrics(base / "z2"), metrics(base / "ep2"), ALL)
    assert_close(metrics(base / "local"), metrics(base / "ep2"), ALL)


@pytest.mark.slow
def test_same_layout_resume_loads_deepspeed_shards_exactly(runs):
    base, log, _ = runs
    assert f"z2-resumed/checkpoints/step-{STOP:08d} at step {STOP} (deepspeed shards)" in log
    assert_close(metrics(base / "z2"), metrics(base / "z2-resumed"), ALL, 0.0)


@pytest.mark.slow
def test_expert_parallel_resume_is_exact(runs):
    base, log, _ = runs
    assert f"ep2-resumed/checkpoints/step-{STOP:08d} at step {STOP} (canonical state)" in log
    assert_close(metrics(base / "ep2"), metrics(base / "ep2-resumed"), ALL, 0.0)


@pytest.mark.slow
def test_zero3_on_two_ranks_resumes_on_one(runs):
    base, _, log = runs
    assert "(canonical state)" in log
    got = metrics(base / "z3-to-1rank")
    assert sorted(got) == list(ALL)
    assert_close(metrics(base / "z3"), got, AFTER_STOP)


@pytest.mark.slow
def test_expert_parallel_checkpoint_resumes_under_local_backend(runs):
    base, _, _ = runs
    got = metrics(base / "ep2-to-local")
    assert sorted(got) == list(ALL)
    assert_close(metrics(base / "ep2"), got, AFTER_STOP)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["z3", "ep2"])
def test_checkpoint_is_canonical_and_sharded(runs, run):
    """model.safetensors holds full single-device tensors (equal to the local run's weights),
    the optimizer state has the single-device AdamW layout, and DeepSpeed's own files are in
    the step directory, listed with their sizes in meta.json."""
    base, _, _ = runs
    ds, ref = load_checkpoint(base / run), load_checkpoint(base / "local")
    assert ds.step == ref.step == STEPS
    assert list(ds.model_state) == list(ref.model_state)
    for key, value in ref.model_state.items():
        torch.testing.assert_close(ds.model_state[key], value, rtol=1e-3, atol=1e-5, msg=key)
    opt, ref_opt = ds.train_state["optimizer"], ref.train_state["optimizer"]
    assert [g["params"] for g in opt["param_groups"]] == [
        g["params"] for g in ref_opt["param_groups"]
    ]
    for i, st in ref_opt["state"].items():
        assert float(opt["state"][i]["step"]) == float(st["step"]) == STEPS
        assert opt["state"][i]["exp_avg"].shape == st["exp_avg"].shape
    shards = [n for n in ds.meta["files"] if n.startswith("deepspeed/")]
    assert any("optim_states" in n for n in shards) and any("model_states" in n for n in shards)
    assert ds.train_state["backend"]["world_size"] == 2


@pytest.mark.slow
def test_generated_config_merges_the_deepspeed_block(runs):
    base, _, _ = runs
    config = json.loads((base / "z1" / "deepspeed_config.json").read_text())
    assert config["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 20000}
    assert config["train_batch_size"] == 8 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0


@pytest.mark.slow
def test_zero3_checkpoint_converts_to_hugging_face(runs, tmp_path, capsys):
    """The consolidated checkpoint of the 2-rank ZeRO-3 run exports to transformers with logits
    parity (`hybrid convert to-hf --verify`, tolerance 1e-4 relative)."""
    pytest.importorskip("transformers")
    from hybrid.cli import main

    base, _, _ = runs
    assert main(["convert", "to-hf", str(base / "z3"), str(tmp_path / "hf"), "--verify"]) == 0
    assert "verify passed" in capsys.readouterr().out
