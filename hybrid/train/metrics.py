"""Throughput, MFU and memory figures of a training run."""

from __future__ import annotations

import collections
import os
import resource
import time

import torch

# Dense bf16 tensor-core peak (FLOP/s) by GPU name fragment, most specific first.
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
]


def peak_bf16_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (env HYBRID_PEAK_FLOPS overrides); None on CPU."""
    env = os.environ.get("HYBRID_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_BF16:
        if fragment in name:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return tokens_per_s * flops_per_token / peak_flops


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, process max RSS on CPU (GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class ThroughputMeter:
    """Tokens per second over the last `window` steps (the first step, warm-up, is excluded)."""

    def __init__(self, window: int = 20):
        self.times: collections.deque[float] = collections.deque(maxlen=window + 1)
        self.tokens: collections.deque[int] = collections.deque(maxlen=window + 1)

    def update(self, tokens: int) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(tokens)

    def tokens_per_second(self) -> float:
        if len(self.times) < 2:
            return 0.0
        elapsed = self.times[-1] - self.times[0]
        return sum(list(self.tokens)[1:]) / elapsed if elapsed > 0 else 0.0

    def seconds_per_step(self) -> float:
        if len(self.times) < 2:
            return 0.0
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
