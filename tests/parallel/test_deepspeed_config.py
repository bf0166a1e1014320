"""The DeepSpeed backend's configuration and checks that need no process group: the
`parallel:` section, the generated DeepSpeed config, the backend registry, the expert-parallel
preconditions, and checkpoints that carry an engine's extra files."""

from __future__ import annotations

import os
import subprocess
import sys
import typing

import pytest
import torch
import yaml

pytest.importorskip("deepspeed")

from hybrid.checkpoint.store import (  # noqa: E402
    CheckpointError,
    begin_save,
    load_checkpoint,
    save_checkpoint,
)
from hybrid.cli import main  # noqa: E402
from hybrid.model import build_model  # noqa: E402
from hybrid.parallel.deepspeed_backend import build_config, deep_merge  # noqa: E402
from hybrid.parallel.expert_parallel import apply_expert_parallel  # noqa: E402
from hybrid.parallel.registry import BACKENDS  # noqa: E402
from hybrid.recipe.model_config import ModelConfig  # noqa: E402
from hybrid.recipe.recipe import ParallelConfig, recipe_from_dict  # noqa: E402
from hybrid.recipe.schema import ConfigError, from_dict  # noqa: E402
from hybrid.recipe.train_config import TrainConfig  # noqa: E402


def parallel(**kw) -> ParallelConfig:
    return from_dict(ParallelConfig, {"backend": "deepspeed", **kw})


def test_generated_config_follows_the_recipe():
    train = TrainConfig(micro_batch_size=2, global_batch=16)
    cfg = build_config(
        parallel(zero_stage=3, offload_optimizer=True, offload_params=True),
        train,
        world_size=4,
        precision="bf16",
        pin_memory=True,
    )
    assert cfg["train_batch_size"] == 16
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 2  # 16 = 2 x 2 x 4
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
    }


def test_stage0_bf16_is_autocast_and_no_clip_is_zero():
    train = from_dict(TrainConfig, {"micro_batch_size": 2, "optimizer": {"grad_clip": None}})
    cfg = build_config(parallel(), train, world_size=2, precision="bf16", pin_memory=False)
    assert cfg["bf16"] == {"enabled": False}  # fp32 parameters, bf16 autocast
    assert cfg["gradient_clipping"] == 0.0
    assert cfg["train_batch_size"] == 4  # one micro-batch per rank


def test_deepspeed_block_is_merged_last():
    extra = {"zero_optimization": {"reduce_bucket_size": 1000}, "wall_clock_breakdown": True}
    cfg = build_config(
        parallel(zero_stage=2, deepspeed=extra),
        TrainConfig(),
        world_size=1,
        precision="fp32",
        pin_memory=False,
    )
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert cfg["wall_clock_breakdown"] is True
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 4}, "d": {"e": 5}}) == {
        "a": {"b": 4, "c": 2},
        "d": {"e": 5},
    }


def test_batch_that_does_not_split_over_the_ranks_is_a_config_error():
    with pytest.raises(ConfigError, match="not divisible"):
        build_config(
            parallel(),
            TrainConfig(micro_batch_size=2, global_batch=6),
            world_size=2,
            precision="fp32",
            pin_memory=False,
        )


@pytest.mark.parametrize(
    "section, key, words",
    [
        ({"zero_stage": 2}, "parallel.zero_stage", "needs parallel.backend: deepspeed"),
        ({"ep": 2}, "parallel.ep", "needs parallel.backend: deepspeed"),
        ({"deepspeed": {"a": 1}}, "parallel.deepspeed", "needs parallel.backend: deepspeed"),
        ({"backend": "deepspeed", "zero_stage": 4}, "parallel.zero_stage", "not one of"),
        ({"backend": "deepspeed", "ep": 0}, "parallel.ep", "must be >= 1"),
        ({"backend": "deepspeed", "zero_stage": 3, "ep": 2}, "parallel.ep", "zero_stage 1 or 2"),
        ({"backend": "deepspeed", "ep": 2}, "parallel.ep", "zero_stage 1 or 2"),
        ({"backend": "deepspeed", "offload_params": True}, "parallel.offload_params", "stage 3"),
        ({"backend": "deepspeed", "offload_optimizer": True}, "parallel.offload_optimizer", "1, 2"),
        (
            {"backend": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
            "parallel.deepspeed.zero_optimization.stage",
            "set parallel.zero_stage instead",
        ),
        (
            {"backend": "deepspeed", "deepspeed": {"train_batch_size": 64}},
            "parallel.deepspeed.train_batch_size",
            "set train.global_batch instead",
        ),
        ({"backend": "fsdp"}, "parallel.backend", "not one of"),
    ],
)
def test_bad_parallel_section_names_the_key(section, key, words):
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({"parallel": section})
    assert err.value.key == key
    assert words in err.value.message


def test_cli_reports_a_bad_parallel_section_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"parallel": {"backend": "deepspeed", "offload_params": 1}}))
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "parallel.offload_params" in err
    assert not (tmp_path / "run").exists()


def test_every_backend_choice_is_registered():
    hint = typing.get_type_hints(ParallelConfig)["backend"]
    assert set(typing.get_args(hint)) == set(BACKENDS)


def tiny_model(layout: str, n_experts: int = 4):
    cfg = from_dict(
        ModelConfig,
        {
            "d_model": 32,
            "vocab_size": 64,
            "layout": {"pattern": layout},
            "attention": {"n_heads": 2},
            "mlp": {"hidden_size": 64},
            "moe": {"n_experts": n_experts, "top_k": 2, "expert_hidden_size": 32},
        },
    )
    return build_model(cfg, device="meta")


@pytest.mark.parametrize(
    "layout, n_experts, words", [("*-", 4, "no MoE layer"), ("*E", 6, "not divisible")]
)
def test_expert_parallel_preconditions(layout, n_experts, words):
    with pytest.raises(ConfigError, match=words):
        apply_expert_parallel(tiny_model(layout, n_experts), ep_size=4)


def _state(step: int) -> dict:
    return {
        "model_state": {"w": torch.full((3,), float(step))},
        "train_state": {"step": step},
        "recipe": {"name": "x"},
    }


def test_engine_files_in_the_tmp_dir_become_part_of_the_checkpoint(tmp_path):
    tmp = begin_save(tmp_path, 5)
    (tmp / "deepspeed").mkdir()
    (tmp / "deepspeed" / "rank0.pt").write_bytes(b"0123456789")
    step_dir = save_checkpoint(tmp_path, 5, **_state(5), tmp_dir=tmp)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == step_dir and ckpt.meta["files"]["deepspeed/rank0.pt"] == 10
    (step_dir / "deepspeed" / "rank0.pt").write_bytes(b"01234")  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path)
    (step_dir / "deepspeed" / "rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)


def test_tmp_dir_must_come_from_begin_save_of_that_step(tmp_path):
    tmp = begin_save(tmp_path, 5)
    with pytest.raises(ValueError, match="begin_save"):
        save_checkpoint(tmp_path, 6, **_state(6), tmp_dir=tmp)


@pytest.mark.slow
def test_deepspeed_rejecting_the_merged_config_is_one_line_and_exit_2(tmp_path):
    """A value DeepSpeed's own validation refuses (here through the free-form block) stops the
    run before training with one line naming parallel.deepspeed and the written config."""
    recipe = {
        "model": {"d_model": 32, "vocab_size": 257, "layout": {"pattern": "*-"}},
        "data": {"sources": [{"kind": "stdlib", "max_files": 5}]},
        "train": {"seq_len": 32, "micro_batch_size": 1, "steps": 1},
        "parallel": {
            "backend": "deepspeed",
            "zero_stage": 1,
            "deepspeed": {"zero_optimization": {"reduce_bucket_size": "abc"}},
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYBRID_CACHE": str(tmp_path / "cache")}
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "hybrid.cli", "train", str(path), "--run-dir", run_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("hybrid train: error: parallel.deepspeed: DeepSpeed rejected")
    assert "reduce_bucket_size" in last and "deepspeed_config.json" in last
