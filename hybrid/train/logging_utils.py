"""TensorBoard scalars and the console progress line (rank 0 only).

Standard TensorBoard tags (event files under RUN_DIR/tensorboard):

    train/loss               mean next-token cross-entropy of the step (global batch)
    train/lr                 learning rate of the first parameter group
    train/grad_norm          global gradient L2 norm before clipping
    train/tokens_per_s       all ranks together, sliding window (`ThroughputMeter`)
    train/mfu                model FLOPs utilisation in [0, 1] (when the peak is known)
    train/memory_gb          peak CUDA allocation, or peak process RSS on CPU (1e9 bytes)
    val/loss, val/ppl        validation cross-entropy and its exp
    moe/aux_loss             summed auxiliary (load-balancing / z) losses
    moe/layer{i}/router_entropy      mean entropy of the router distribution of layer i
    moe/layer{i}/dropped_fraction    share of token-expert assignments over capacity
    moe/layer{i}/load/expert{j}      share of layer i's routed tokens sent to expert j
    moe/layer{i}/load                (histogram, optional) the same loads as one histogram

Layer indices i are positions in the model's sublayer list. Tag helpers below build them.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import torch

from hybrid.train.metrics import format_count, format_eta

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
TRAIN_MFU = "train/mfu"
TRAIN_MEMORY_GB = "train/memory_gb"
VAL_LOSS = "val/loss"
VAL_PPL = "val/ppl"
MOE_AUX_LOSS = "moe/aux_loss"


def moe_load_tag(layer: int, expert: int) -> str:
    return f"moe/layer{layer}/load/expert{expert}"


def moe_entropy_tag(layer: int) -> str:
    return f"moe/layer{layer}/router_entropy"


def moe_dropped_tag(layer: int) -> str:
    return f"moe/layer{layer}/dropped_fraction"


def moe_scalars(stats: Mapping[int, Mapping[str, Any]]) -> dict[str, float]:
    """Scalars of per-layer MoE statistics {layer: {"load": (E,) tensor or list, "entropy": x,
    "dropped": x}} (keys optional) under the standard tags."""
    out: dict[str, float] = {}
    for layer, s in stats.items():
        if "entropy" in s:
            out[moe_entropy_tag(layer)] = _scalar(s["entropy"])
        if "dropped" in s:
            out[moe_dropped_tag(layer)] = _scalar(s["dropped"])
        if "load" in s:
            load = s["load"]
            values = load.tolist() if isinstance(load, torch.Tensor) else list(load)
            for expert, value in enumerate(values):
                out[moe_load_tag(layer, expert)] = float(value)
    return out


def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class MetricsLogger:
    """TensorBoard event writer under RUN_DIR/tensorboard; every method is a no-op when
    `enabled` is false (pass `enabled=is_main_rank`). Usable as a context manager."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, *, flush_secs: int = 30):
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def add_scalar(self, tag: str, value: float | torch.Tensor | None, step: int) -> None:
        """One scalar; None is skipped."""
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, _scalar(value), step)

    def add_scalars(self, scalars: Mapping[str, float | torch.Tensor | None], step: int) -> None:
        """Each (tag, value) as its own scalar series (unlike SummaryWriter.add_scalars, which
        makes one sub-run per key); None values are skipped."""
        for tag, value in scalars.items():
            self.add_scalar(tag, value, step)

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        """Free text, e.g. the resolved recipe (shown in TensorBoard's Text tab)."""
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressLine:
    """One console line per logged step, for example

        step 120/200 | loss 2.3141 | lr 2.10e-03 | gnorm 0.412 | 51.2K tok/s | mfu 38.1% | eta 00:31

    rewritten in place (carriage return) when the stream is a terminal, one line per update
    otherwise (log files, Slurm, pytest). `message()` prints a line of its own (evaluation,
    checkpoints) without garbling the in-place line; `finish()` prints the summary line.
    """

    def __init__(
        self,
        total_steps: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
    ):
        self.total, self.enabled = total_steps, enabled
        self.stream = stream if stream is not None else sys.stdout
        self.tty = _isatty(self.stream) if tty is None else tty
        self.start = time.perf_counter()
        self._open = False  # an in-place line is on screen without its newline

    def format(
        self,
        *,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float | None = None,
        tokens_per_s: float | None = None,
        seconds_per_step: float = 0.0,
        mfu: float | None = None,
        eta_s: float | None = None,
        memory_gb: float | None = None,
    ) -> str:
        """The progress line. ETA: `eta_s` if given, else seconds_per_step x steps left."""
        parts = [f"step {step}/{self.total}", f"loss {loss:.4f}", f"lr {lr:.2e}"]
        if grad_norm is not None and math.isfinite(grad_norm):
            parts.append(f"gnorm {grad_norm:.3g}")
        if tokens_per_s:
            parts.append(f"{format_count(tokens_per_s)} tok/s")
        if mfu is not None:
            parts.append(f"mfu {100 * mfu:.1f}%")
        if memory_gb is not None:
            parts.append(f"mem {memory_gb:.1f}GB")
        if eta_s is None and seconds_per_step > 0:
            eta_s = seconds_per_step * max(self.total - step, 0)
        parts.append(f"eta {format_eta(eta_s)}")
        return " | ".join(parts)

    def update(self, **fields: Any) -> str:
        """Print (and return) the line for `fields` (the keywords of `format`)."""
        line = self.format(**fields)
        if not self.enabled:
            return line
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def message(self, text: str) -> None:
        """A line of its own (ends an in-place progress line first)."""
        if not self.enabled:
            return
        self._end_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def summary(
        self,
        *,
        step: int,
        stopped_by: str | None = None,
        tokens: int | None = None,
        final_loss: float | None = None,
    ) -> str:
        elapsed = time.perf_counter() - self.start
        parts = [f"done: step {step}/{self.total} in {format_eta(elapsed)}"]
        if tokens:
            parts.append(f"{format_count(tokens)} tokens")
            if elapsed > 0:
                parts.append(f"{format_count(tokens / elapsed)} tok/s overall")
        if final_loss is not None:
            parts.append(f"final loss {final_loss:.4f}")
        why = f" (stopped by {stopped_by})" if stopped_by else ""
        return " | ".join(parts) + why

    def finish(
        self,
        *,
        step: int,
        stopped_by: str | None = None,
        tokens: int | None = None,
        final_loss: float | None = None,
    ) -> str:
        """Print (and return) the final summary line: steps, wall time, tokens, final loss."""
        line = self.summary(step=step, stopped_by=stopped_by, tokens=tokens, final_loss=final_loss)
        if self.enabled:
            self._end_line()
            self.stream.write(line + "\n")
            self.stream.flush()
        return line

    def _end_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
