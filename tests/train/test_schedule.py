"""Learning-rate schedules: values at key steps, and exact resume through state_dict."""

import io
import math

import pytest
import torch

from hybrid.recipe.train_config import ScheduleConfig
from hybrid.train.schedule import build_scheduler, lr_at, lr_factor

LR, MIN = 1e-3, 0.1


def test_cosine_key_steps():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10)
    T = 110
    assert lr_at(0, cfg, T, LR, MIN) == pytest.approx(LR / 10)
    assert lr_at(9, cfg, T, LR, MIN) == pytest.approx(LR)  # warmup end: peak
    assert lr_at(60, cfg, T, LR, MIN) == pytest.approx(LR * (MIN + (1 - MIN) / 2))  # mid decay
    assert lr_at(T, cfg, T, LR, MIN) == pytest.approx(LR * MIN)
    assert lr_at(T + 50, cfg, T, LR, MIN) == pytest.approx(LR * MIN)
    values = [lr_at(s, cfg, T, LR, MIN) for s in range(9, T + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_fraction_default_is_two_percent():
    cfg = ScheduleConfig()
    assert cfg.warmup(1000) == 20
    assert lr_factor(19, cfg, 1000, MIN) == pytest.approx(1.0)
    assert lr_factor(0, cfg, 1000, MIN) == pytest.approx(1 / 20)
    assert ScheduleConfig(warmup_steps=50).warmup(30) == 30  # clamped to the run


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_key_steps(shape):
    cfg = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape=shape)
    T = 100
    assert lr_at(0, cfg, T, LR, 0.0) == pytest.approx(LR / 10)
    assert lr_at(9, cfg, T, LR, 0.0) == pytest.approx(LR)
    assert lr_at(50, cfg, T, LR, 0.0) == LR and lr_at(80, cfg, T, LR, 0.0) == LR  # stable
    expected = {"linear": 0.5, "cosine": 0.5, "sqrt": 1 - math.sqrt(0.5)}[shape]
    assert lr_at(90, cfg, T, LR, 0.0) == pytest.approx(LR * expected)
    quarter = {"linear": 0.75, "cosine": (1 + math.cos(math.pi / 4)) / 2, "sqrt": 0.5}[shape]
    assert lr_at(85, cfg, T, LR, 0.2) == pytest.approx(LR * (0.2 + 0.8 * quarter))
    assert lr_at(T, cfg, T, LR, 0.2) == pytest.approx(LR * 0.2)


def test_wsd_decay_never_starts_inside_warmup():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=90, decay_fraction=0.5)
    assert cfg.decay_start(100) == 90
    assert lr_factor(89, cfg, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(95, cfg, 100, 0.0) == pytest.approx(0.5)


def test_constant_key_steps():
    cfg = ScheduleConfig(kind="constant", warmup_steps=4)
    assert [lr_at(s, cfg, 20, LR) for s in (0, 1, 3)] == pytest.approx([LR / 4, LR / 2, LR])
    assert lr_at(10, cfg, 20, LR) == LR and lr_at(20, cfg, 20, LR) == LR
    no_warmup = ScheduleConfig(kind="constant", warmup_steps=0)
    assert lr_at(0, no_warmup, 20, LR) == LR


def make_optimizer(lr):
    params = [torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))]
    groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:]}]
    return torch.optim.AdamW(groups, lr=lr)


def advance(opt, sched, n):
    lrs = []
    for _ in range(n):
        opt.step()
        sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return lrs


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_scheduler_follows_lr_at(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=3, decay_shape="sqrt")
    opt = make_optimizer(LR)
    sched = build_scheduler(opt, cfg, 30, min_lr_ratio=MIN)
    assert sched.get_last_lr() == pytest.approx([lr_at(0, cfg, 30, LR, MIN)] * 2)
    lrs = advance(opt, sched, 30)
    for step, pair in enumerate(lrs, start=1):
        assert pair == pytest.approx([lr_at(step, cfg, 30, LR, MIN)] * 2)


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_scheduler_state_round_trips_exactly(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=4)
    opt = make_optimizer(LR)
    sched = build_scheduler(opt, cfg, 40, min_lr_ratio=MIN)
    advance(opt, sched, 17)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    expected = advance(opt, sched, 10)

    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain data: no pickled callables
    opt2 = make_optimizer(LR)
    sched2 = build_scheduler(opt2, cfg, 40, min_lr_ratio=MIN)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.last_epoch == 17
    assert advance(opt2, sched2, 10) == expected  # bit-identical


def test_build_scheduler_checks_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(make_optimizer(LR), ScheduleConfig(), 0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_scheduler(make_optimizer(LR), ScheduleConfig(), 10, min_lr_ratio=1.5)
