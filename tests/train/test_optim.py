"""Parameter groups of `build_optimizer` and the `TrainConfig` batch arithmetic."""

import pytest
import torch
from torch import nn

from hybrid.model import build_model
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError, from_dict, to_dict
from hybrid.recipe.train_config import OptimizerConfig, ScheduleConfig, TrainConfig
from hybrid.train.optim import build_optimizer, split_parameters


class LayerNormish(nn.Module):  # class name contains "Norm": every parameter exempt
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, d))  # 2-D on purpose


class Toy(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8, bias=True)
        self.conv = nn.Conv1d(8, 8, 4, groups=8)  # (8, 1, 4): decayed, as mamba_ssm
        self.norm = LayerNormish(8)
        self.A_log = nn.Parameter(torch.zeros(2, 2))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(8))
        self.experts = nn.Parameter(torch.zeros(4, 8, 16))
        self.experts_bias = nn.Parameter(torch.zeros(4, 16))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.head = nn.Linear(8, 11, bias=False)
        if tie:
            self.head.weight = self.embed.weight


@pytest.mark.parametrize("tie", [False, True])
def test_toy_groups_follow_the_rules(tie):
    model = Toy(tie)
    decay, plain = split_parameters(model)
    assert {n for n, _ in decay} == {"proj.weight", "conv.weight", "experts"} | (
        set() if tie else {"head.weight"}
    )
    assert {n for n, _ in plain} == {
        "embed.weight",
        "proj.bias",
        "conv.bias",
        "norm.scale",
        "A_log",
        "D",
        "experts_bias",
    }
    opt, summary = build_optimizer(model, OptimizerConfig(weight_decay=0.05), "cpu")
    g_decay, g_plain = opt.param_groups
    assert (g_decay["name"], g_decay["weight_decay"]) == ("decay", 0.05)
    assert (g_plain["name"], g_plain["weight_decay"]) == ("no_decay", 0.0)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable  # each once, frozen left out
    assert summary["decayed_tensors"] == len(decay) and summary["undecayed_tensors"] == len(plain)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary["decayed_params"] + summary["undecayed_params"] == n_trainable
    assert summary["implementation"] == "foreach"


def hybrid_model(tie):
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
def test_hybrid_model_groups(tie):
    model = hybrid_model(tie)
    decay, plain = split_parameters(model)
    names_decay, names_plain = {n for n, _ in decay}, {n for n, _ in plain}
    assert not names_decay & names_plain
    assert names_decay | names_plain == {n for n, _ in model.named_parameters()}
    for leaf in ("A_log", "D", "dt_bias"):
        assert f"layers.0.mixer.{leaf}" in names_plain
    assert "embed.weight" in names_plain
    assert ("lm_head.weight" in names_decay) == (not tie)
    assert {
        "layers.0.mixer.in_proj.weight",
        "layers.0.mixer.conv1d.weight",
        "layers.3.mixer.experts.up_proj",
    } <= names_decay
    assert all(p.ndim >= 2 for _, p in decay)
    assert all("norm" not in n for n in names_decay)
    _, summary = build_optimizer(model, OptimizerConfig(), "cpu")
    assert summary["decayed_params"] + summary["undecayed_params"] == model.num_params()


def test_fused_choice():
    model = Toy(False)
    opt, summary = build_optimizer(model, OptimizerConfig(fused=True), "cpu")  # torch has CPU fused
    assert opt.defaults["fused"] and summary["implementation"] == "fused"
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(ConfigError, match="fused AdamW is not available on meta"):
        build_optimizer(model, OptimizerConfig(fused=True), "meta")


def test_optimizer_config_checks():
    assert OptimizerConfig().min_lr == pytest.approx(3e-5)
    assert not OptimizerConfig(grad_clip=0).clip_enabled
    assert not OptimizerConfig(grad_clip=None).clip_enabled
    with pytest.raises(ConfigError, match="betas"):
        from_dict(OptimizerConfig, {"betas": [0.9, 1.0]})
    with pytest.raises(ConfigError, match="grad_clip"):
        OptimizerConfig(grad_clip=-1.0)


def test_default_train_config_round_trips():
    cfg = TrainConfig()
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    assert cfg.grad_accum_steps() == 1 and cfg.tokens_per_step(2) == 2 * 8 * 512
    assert isinstance(cfg.schedule, ScheduleConfig)


def test_grad_accum_steps():
    assert TrainConfig(micro_batch_size=4, global_batch=32).grad_accum_steps(2) == 4
    cfg = TrainConfig(seq_len=128, micro_batch_size=2, global_batch_tokens=2048)
    assert cfg.global_batch_sequences() == 16 and cfg.grad_accum_steps(4) == 2
    assert TrainConfig(micro_batch_size=3).grad_accum_steps(5) == 1  # default: no accumulation


def test_grad_accum_errors_are_clear():
    with pytest.raises(ConfigError) as err:
        TrainConfig(micro_batch_size=3, global_batch=16).grad_accum_steps(2)
    assert err.value.key == "train.global_batch"
    msg = str(err.value)
    assert "global_batch=16 sequences is not divisible by micro_batch_size=3 x 2" in msg
    assert "multiple of 6 sequences (e.g. 12 or 18)" in msg
    with pytest.raises(ConfigError) as err:
        TrainConfig(seq_len=64, micro_batch_size=4, global_batch_tokens=64 * 6).grad_accum_steps(1)
    assert err.value.key == "train.global_batch_tokens" and "(6 sequences)" in str(err.value)
    with pytest.raises(ConfigError, match="multiple of seq_len=100"):
        TrainConfig(seq_len=100, global_batch_tokens=1024)
    with pytest.raises(ConfigError, match="not both") as err:
        from_dict(TrainConfig, {"global_batch": 8, "global_batch_tokens": 4096})
    assert err.value.key == "global_batch"
