"""Throughput/MFU arithmetic, peak-FLOPs table, TensorBoard events and the progress line."""

import io
import math

import pytest
import torch

from hybrid.recipe.schema import ConfigError
from hybrid.train.logging_utils import MetricsLogger, ProgressLine, moe_scalars
from hybrid.train.metrics import (
    ThroughputMeter,
    format_count,
    format_eta,
    grad_norm,
    memory_gb,
    memory_stats,
    mfu,
    peak_bf16_flops,
    peak_from_name,
)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_throughput_excludes_warmup_step_and_slides():
    clock = FakeClock()
    meter = ThroughputMeter(window=3, clock=clock)
    assert meter.tokens_per_second() == 0.0 and meter.eta_seconds(10) is None
    clock.t += 30.0  # slow first step (compilation): only starts the clock
    meter.update(1000)
    assert meter.tokens_per_second() == 0.0
    for _ in range(2):
        clock.t += 2.0
        meter.update(1000)
    assert meter.tokens_per_second() == pytest.approx(500.0)
    assert meter.seconds_per_step() == pytest.approx(2.0)
    assert meter.eta_seconds(10) == pytest.approx(20.0)
    for _ in range(3):  # window of 3 steps at 1 s each pushes the 2 s steps out
        clock.t += 1.0
        meter.update(1000)
    assert meter.tokens_per_second() == pytest.approx(1000.0)
    assert meter.total_tokens == 6000 and meter.steps == 6


def test_throughput_mark_skips_a_pause():
    clock = FakeClock()
    meter = ThroughputMeter(window=10, clock=clock)
    meter.update(0)
    clock.t += 1.0
    meter.update(100)
    clock.t += 50.0  # evaluation
    meter.mark()
    clock.t += 1.0
    meter.update(100)
    assert meter.tokens_per_second() == pytest.approx(100.0)


def test_mfu_arithmetic():
    assert mfu(1e4, 6e9, 1e15) == pytest.approx(0.06)
    assert mfu(1e4, 6e9, None) is None


def test_peak_table():
    assert peak_from_name("NVIDIA H100 80GB HBM3", 132) == 989e12
    assert peak_from_name("NVIDIA H100 PCIe", 114) == 756e12
    assert peak_from_name("NVIDIA H200", 132) == 989e12
    assert peak_from_name("NVIDIA A100-SXM4-80GB", 108) == 312e12
    assert peak_from_name("NVIDIA L40S") == 362e12
    assert peak_from_name("NVIDIA L40") == 181e12
    assert peak_from_name("NVIDIA L4") == 121e12
    assert peak_from_name("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 66) == pytest.approx(989e12 / 2)
    assert peak_from_name("Tesla V100-SXM2-16GB") is None


def test_peak_on_cpu_and_env_override(monkeypatch):
    monkeypatch.delenv("HYBRID_PEAK_FLOPS", raising=False)
    assert peak_bf16_flops(torch.device("cpu")) is None
    monkeypatch.setenv("HYBRID_PEAK_FLOPS", "1.5e14")
    assert peak_bf16_flops("cpu") == 1.5e14
    monkeypatch.setenv("HYBRID_PEAK_FLOPS", "fast")
    with pytest.raises(ConfigError, match="HYBRID_PEAK_FLOPS"):
        peak_bf16_flops("cpu")


def test_format_helpers():
    assert format_eta(5) == "00:05" and format_eta(307) == "05:07"
    assert format_eta(3723) == "1:02:03" and format_eta(2 * 86400 + 3723) == "2d 01:02:03"
    assert format_eta(None) == "--" and format_eta(math.inf) == "--" and format_eta(-1) == "--"
    assert [format_count(v) for v in (950, 12_345, 456_000, 7.9e6, 1.2e9)] == [
        "950",
        "12.3K",
        "456K",
        "7.9M",
        "1.2G",
    ]


def test_grad_norm_and_memory():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0, 0.0])
    assert grad_norm([a, b, torch.nn.Parameter(torch.zeros(1))]) == pytest.approx(5.0)
    assert grad_norm([a, b], max_norm=1.0) == pytest.approx(5.0)  # norm before clipping
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(1.0, rel=1e-5)
    assert memory_gb("cpu") > 0.01  # this process holds torch: well over 10 MB
    assert set(memory_stats("cpu")) == {"peak_rss"}


def test_metrics_logger_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, enabled=True) as logger:
        for step in (1, 2, 3):
            logger.add_scalars(
                {"train/loss": 4.0 - step, "train/lr": 1e-3 * step, "train/mfu": None}, step
            )
        logger.add_scalar("val/loss", torch.tensor(2.5), 3)
        moe = {3: {"load": torch.tensor([0.75, 0.25]), "entropy": 0.5, "dropped": 0.0}}
        logger.add_scalars(moe_scalars(moe), 3)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "val/loss",
        "moe/layer3/load/expert0",
        "moe/layer3/load/expert1",
        "moe/layer3/router_entropy",
    } <= tags
    assert "train/mfu" not in tags
    loss = events.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert events.Scalars("moe/layer3/load/expert0")[0].value == pytest.approx(0.75)
    assert events.Scalars("val/loss")[0].value == pytest.approx(2.5)


def test_metrics_logger_disabled_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False)
    logger.add_scalars({"train/loss": 1.0}, 1)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_progress_line_plain_mode():
    out = io.StringIO()  # not a TTY: one plain line per update
    progress = ProgressLine(total_steps=200, stream=out)
    line = progress.update(
        step=120,
        loss=2.31414,
        lr=2.1e-3,
        grad_norm=0.4123,
        tokens_per_s=51_234.0,
        seconds_per_step=0.5,
        mfu=0.381,
    )
    assert line == (
        "step 120/200 | loss 2.3141 | lr 2.10e-03 | gnorm 0.412 | 51.2K tok/s"
        " | mfu 38.1% | eta 00:40"
    )
    progress.update(step=121, loss=2.3, lr=2e-3, grad_norm=0.4, tokens_per_s=0.0)
    progress.message("step 121: validation loss 2.2000")
    final = progress.finish(step=200, tokens=1_000_000, final_loss=2.0, stopped_by="SIGTERM")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4
    assert lines[0] == line
    assert lines[1] == "step 121/200 | loss 2.3000 | lr 2.00e-03 | gnorm 0.4 | eta --"
    assert lines[2] == "step 121: validation loss 2.2000"
    assert lines[3] == final and final.startswith("done: step 200/200 in 00:0")
    assert "1.0M tokens" in final and "final loss 2.0000" in final
    assert final.endswith("(stopped by SIGTERM)")


def test_progress_line_tty_and_disabled():
    out = io.StringIO()
    progress = ProgressLine(total_steps=10, stream=out, tty=True)
    progress.update(step=1, loss=1.0, lr=1e-3)
    progress.update(step=2, loss=0.5, lr=1e-3)
    progress.finish(step=2)
    text = out.getvalue()
    assert text.startswith("\rstep 1/10") and text.count("\r") == 2
    assert "\x1b[K\ndone: step 2/10" in text
    quiet = io.StringIO()
    ProgressLine(total_steps=10, enabled=False, stream=quiet).update(step=1, loss=1.0, lr=1e-3)
    assert quiet.getvalue() == ""
