"""Throughput, MFU, gradient-norm and memory figures of a training run.

MFU = achieved model FLOP/s / peak FLOP/s. Pass *training* FLOPs per token (forward + backward,
i.e. 3x the forward FLOPs; recomputation from activation checkpointing is not counted, as in
PaLM's definition) and a peak for the same set of devices as the tokens/s (one GPU, or all).
"""

from __future__ import annotations

import collections
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable

import torch

from hybrid.recipe.schema import ConfigError

PEAK_FLOPS_ENV = "HYBRID_PEAK_FLOPS"

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by device-name fragment, most specific first,
# with the SM (CU) count of the full part, to scale a MIG slice by its share of SMs.
PEAK_BF16: list[tuple[str, float, int | None]] = [
    ("H100 PCIe", 756e12, 114),
    ("H100 NVL", 835e12, 132),
    ("H200 NVL", 835e12, 132),
    ("GH200", 989e12, 132),
    ("H200", 989e12, 132),
    ("H100", 989e12, 132),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 756e12, 114),
    ("H800", 989e12, 132),
    ("GB200", 2500e12, None),
    ("B200", 2250e12, 148),
    ("B100", 1750e12, None),
    ("A100", 312e12, 108),
    ("A800", 312e12, 108),
    ("L40S", 362e12, 142),
    ("L40", 181e12, 142),
    ("L4", 121e12, 58),
    ("RTX 4090", 165e12, 128),
    ("MI325X", 1307e12, 304),
    ("MI300X", 1307e12, 304),
]


def peak_from_name(name: str, sm_count: int | None = None) -> float | None:
    """Table lookup of the peak dense bf16 FLOP/s for a device name; a MIG slice (fewer SMs
    than the full part) gets the full peak times its share of SMs. None when unknown."""
    for fragment, peak, full_sms in PEAK_BF16:
        if fragment in name:
            if full_sms and sm_count and sm_count < full_sms:
                return peak * sm_count / full_sms
            return peak
    return None


def peak_bf16_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of one `device`; None on CPU or an unknown GPU.

    The environment variable HYBRID_PEAK_FLOPS (e.g. `989e12`) overrides the table, on any
    device (so MFU can be reported for hardware the table does not know).
    """
    env = os.environ.get(PEAK_FLOPS_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"{PEAK_FLOPS_ENV}={env!r} must be a positive number of FLOP/s, e.g. 989e12"
            )
        return value
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return peak_from_name(props.name, props.multi_processor_count)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: tokens_per_s * flops_per_token / peak_flops
    (None when the peak is unknown)."""
    if not peak_flops or peak_flops <= 0:
        return None
    return tokens_per_s * flops_per_token / peak_flops


def grad_norm(parameters: Iterable[torch.Tensor], max_norm: float | None = None) -> float:
    """Global L2 norm of the gradients of `parameters` (those without a gradient are skipped);
    when `max_norm` is positive the gradients are also clipped to it (in place). Single-process
    view: sharded backends reduce the norm across ranks themselves."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm and max_norm > 0 else math.inf
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def memory_gb(device: torch.device | str) -> float:
    """Peak memory so far in GB (1e9 bytes): the CUDA caching allocator's peak allocation on a
    GPU, the process's peak resident set size (getrusage) elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return max_rss_bytes() / 1e9


def max_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Memory figures in GB: `peak_allocated`, `allocated`, `reserved` (CUDA) or `peak_rss`."""
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "peak_allocated": torch.cuda.max_memory_allocated(device) / 1e9,
            "allocated": torch.cuda.memory_allocated(device) / 1e9,
            "reserved": torch.cuda.memory_reserved(device) / 1e9,
        }
    return {"peak_rss": max_rss_bytes() / 1e9}


def reset_peak_memory(device: torch.device | str) -> None:
    """Restart CUDA peak-memory tracking (no-op elsewhere: RSS peaks cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class ThroughputMeter:
    """Tokens/s and seconds/step over a sliding window of the last `window` steps.

    Call `update(tokens)` once each optimizer step finishes. The first update only starts the
    clock: that step's time (compilation, allocator and kernel warm-up) and tokens are left out.
    Call `mark()` after a pause that is not training (evaluation, checkpointing) to restart the
    clock without counting the pause. `clock` is injectable for tests.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.clock = clock
        self._points: collections.deque[tuple[float, int]] = collections.deque(maxlen=window + 1)
        self.total_tokens = 0
        self.steps = 0

    def update(self, tokens: int) -> None:
        self._points.append((self.clock(), int(tokens)))
        self.total_tokens += int(tokens)
        self.steps += 1

    def mark(self) -> None:
        """Restart the clock now; the next step is measured from here."""
        self._points.clear()
        self._points.append((self.clock(), 0))

    def _span(self) -> tuple[float, int, int]:
        """(seconds, tokens, steps) covered by the window; the first point is the reference."""
        if len(self._points) < 2:
            return 0.0, 0, 0
        points = list(self._points)
        tokens = sum(n for _, n in points[1:])
        return points[-1][0] - points[0][0], tokens, len(points) - 1

    def tokens_per_second(self) -> float:
        """Tokens/s over the window; 0.0 until two steps have been timed."""
        seconds, tokens, _ = self._span()
        return tokens / seconds if seconds > 0 else 0.0

    def seconds_per_step(self) -> float:
        """Mean step time over the window; 0.0 until two steps have been timed."""
        seconds, _, steps = self._span()
        return seconds / steps if steps else 0.0

    def eta_seconds(self, steps_left: int) -> float | None:
        """Estimated time for `steps_left` more steps at the current pace (None if unknown)."""
        per_step = self.seconds_per_step()
        return per_step * max(steps_left, 0) if per_step > 0 else None


def format_eta(seconds: float | None) -> str:
    """`05:07`, `1:02:03`, `2d 03:04:05`; `--` for an unknown (None, negative, inf) time."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--"
    total = int(round(seconds))
    days, rem = divmod(total, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if days:
        return f"{days}d {h:02d}:{m:02d}:{s:02d}"
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_count(value: float) -> str:
    """Human scale for counts and rates: 950, 12.3K, 456K, 7.9M, 1.2G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            scaled = value / scale
            return f"{scaled:.1f}{unit}" if abs(scaled) < 100 else f"{scaled:.0f}{unit}"
    return f"{value:.0f}"
