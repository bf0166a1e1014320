"""Optimizer parameter groups and learning-rate schedules."""

import math

import pytest
import torch

from hybrid.model import build_model
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError, from_dict
from hybrid.recipe.train_config import OptimizerConfig, ScheduleConfig, TrainConfig
from hybrid.train.optim import build_optimizer
from hybrid.train.schedule import build_scheduler, lr_factor


def small_model(tie=False):
    cfg = from_dict(
        ModelConfig,
        {
            "d_model": 32,
            "vocab_size": 40,
            "tie_embeddings": tie,
            "layout": {"pattern": "M-*E"},
            "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 8},
            "attention": {"n_heads": 4, "bias": True},
            "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 16},
        },
    )
    return build_model(cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_cover_every_parameter_once(tie):
    model = small_model(tie)
    opt, summary = build_optimizer(model, OptimizerConfig(weight_decay=0.1), "cpu")
    decay, plain = (set(map(id, g["params"])) for g in opt.param_groups)
    assert not decay & plain
    assert decay | plain == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[i] for i in plain}
    assert "embed.weight" in plain_names
    for n in plain_names:
        assert (
            "norm" in n
            or n.endswith("bias")
            or n.split(".")[-1] in ("A_log", "D", "dt_bias")
            or n == "embed.weight"
        ), n
    decay_names = {names[i] for i in decay}
    assert "layers.0.mixer.in_proj.weight" in decay_names
    assert "layers.3.mixer.experts.up_proj" in decay_names
    assert ("lm_head.weight" in decay_names) == (not tie)
    assert summary["decayed_params"] + summary["undecayed_params"] == model.num_params()


def test_cosine_schedule_values():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10)
    f = [lr_factor(s, cfg, 110, 0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg, 110, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_schedule_values(shape):
    cfg = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape=shape)
    assert lr_factor(50, cfg, 100, 0.0) == 1.0 and lr_factor(79, cfg, 100, 0.0) == 1.0
    mid = lr_factor(90, cfg, 100, 0.0)
    expected = {"linear": 0.5, "cosine": 0.5, "sqrt": 1 - math.sqrt(0.5)}[shape]
    assert mid == pytest.approx(expected)
    assert lr_factor(100, cfg, 100, 0.0) == pytest.approx(0.0)


def test_scheduler_state_round_trips():
    model = small_model()
    opt, _ = build_optimizer(model, OptimizerConfig(lr=1.0), "cpu")
    cfg = ScheduleConfig(kind="cosine", warmup_steps=3)
    sched = build_scheduler(opt, cfg, 20)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    expected = [sched.get_last_lr()[0]]
    for _ in range(3):
        opt.step()
        sched.step()
        expected.append(sched.get_last_lr()[0])
    opt2, _ = build_optimizer(model, OptimizerConfig(lr=1.0), "cpu")
    sched2 = build_scheduler(opt2, cfg, 20)
    sched2.load_state_dict(state)
    got = [sched2.get_last_lr()[0]]
    for _ in range(3):
        opt2.step()
        sched2.step()
        got.append(sched2.get_last_lr()[0])
    assert got == expected


def test_global_batch_accumulation():
    assert TrainConfig(micro_batch_size=4, global_batch=16).grad_accum_steps(2) == 2
    cfg = TrainConfig(seq_len=128, micro_batch_size=2, global_batch_tokens=1024)
    assert cfg.grad_accum_steps() == 4
    with pytest.raises(ConfigError, match="not divisible"):
        TrainConfig(micro_batch_size=3, global_batch=16).grad_accum_steps(2)
    with pytest.raises(ConfigError, match="multiple of seq_len"):
        TrainConfig(seq_len=100, global_batch_tokens=1024)


def test_selective_checkpointing_gives_the_same_gradients():
    from hybrid.parallel.activation_checkpoint import apply_activation_checkpointing

    torch.manual_seed(0)
    ref = small_model()
    ids = torch.randint(0, 40, (2, 17))
    grads = {}
    for mode in ("none", "selective", "full"):
        model = small_model()
        model.load_state_dict(ref.state_dict())
        apply_activation_checkpointing(model, mode)
        torch.manual_seed(1)
        out = model(ids[:, :-1], labels=ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        grads[mode] = {
            n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
            for n, p in model.named_parameters()
        }
        assert set(model.state_dict()) == set(ref.state_dict())  # canonical names kept
    for mode in ("selective", "full"):
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=1e-5, atol=1e-6)
