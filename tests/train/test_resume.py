"""Exact resume: a run of 2N steps equals a run stopped at N and resumed (losses equal, not
close), for a hybrid with Mamba-2, attention, MLP and MoE sublayers, on CPU in fp32."""

import json

import pytest

from hybrid.checkpoint.store import find_latest, list_checkpoints, load_checkpoint
from hybrid.recipe.recipe import load_recipe
from hybrid.recipe.schema import ConfigError
from hybrid.train.loop import train


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.parametrize("overrides", [[], ["train.activation_checkpointing=full"]])
def test_stop_and_resume_gives_identical_losses(tiny_recipe_file, tmp_path, overrides):
    recipe = load_recipe(tiny_recipe_file, overrides)
    full = train(recipe, run_dir=str(tmp_path / "full"))
    assert sorted(full.losses) == list(range(1, 9))

    first = train(recipe, run_dir=str(tmp_path / "split"), stop_at_step=4)
    assert first.step == 4
    second = train(recipe, run_dir=str(tmp_path / "split"))
    assert sorted(second.losses) == [5, 6, 7, 8]
    resumed = {**first.losses, **second.losses}
    assert resumed == full.losses  # exact equality at every step
    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")


def test_checkpoint_contents_and_keep(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["train.keep_checkpoints=2"])
    train(recipe, run_dir=str(tmp_path / "run"))
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["step-00000006", "step-00000008"]
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 8 and ckpt.path == find_latest(tmp_path / "run")
    assert set(ckpt.train_state) >= {"optimizer", "scheduler", "rng", "data", "step"}
    assert ckpt.recipe["model"]["d_model"] == 64
    assert "embed.weight" in ckpt.model_state
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/memory_gb",
        "val/loss",
        "val/ppl",
        "moe/aux_loss",
        "moe/layer3/router_entropy",
        "moe/layer3/load/expert0",
    }
    assert expected <= tags, expected - tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


def test_resume_flags(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["train.steps=2"])
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(recipe, run_dir=str(tmp_path / "r"), resume="always")
    train(recipe, run_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="already has checkpoints"):
        train(recipe, run_dir=str(tmp_path / "r"), resume="never")
    other = load_recipe(tiny_recipe_file, ["model.d_model=32", "train.steps=2"])
    with pytest.raises(ConfigError, match="different model"):
        train(other, run_dir=str(tmp_path / "r"))


def test_sigmoid_router_bias_moves_and_resumes_exactly(tiny_recipe_file, tmp_path):
    sets = ["model.moe.router=sigmoid", "train.steps=4"]
    recipe = load_recipe(tiny_recipe_file, sets)
    full = train(recipe, run_dir=str(tmp_path / "full"))
    bias = load_checkpoint(tmp_path / "full").model_state["layers.3.mixer.router.expert_bias"]
    assert bias.abs().max() > 0  # aux-loss-free balancing moved it
    train(recipe, run_dir=str(tmp_path / "split"), stop_at_step=2)
    second = train(recipe, run_dir=str(tmp_path / "split"))
    assert second.losses == {k: v for k, v in full.losses.items() if k > 2}
    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")  # no duplicated rows
