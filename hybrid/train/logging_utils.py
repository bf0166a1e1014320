"""TensorBoard scalars and the console progress line (rank 0 only).

TensorBoard tags: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/mfu (GPU),
train/memory_gb, val/loss, val/ppl, moe/aux_loss, moe/layer{i}/router_entropy,
moe/layer{i}/dropped_fraction, moe/layer{i}/load/expert{j}. Files: RUN_DIR/tensorboard.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hybrid.train.metrics import format_eta


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class ProgressLine:
    """`step 120/200 | loss 2.3141 | lr 2.1e-03 | gnorm 0.41 | 51.2K tok/s | eta 00:31`:
    rewritten in place on a terminal, one line per update otherwise (logs, Slurm, pytest)."""

    def __init__(self, total_steps: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total_steps, enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def format(
        self,
        *,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_per_s: float,
        seconds_per_step: float = 0.0,
        mfu: float | None = None,
    ) -> str:
        parts = [
            f"step {step}/{self.total}",
            f"loss {loss:.4f}",
            f"lr {lr:.2e}",
            f"gnorm {grad_norm:.3g}",
            f"{tokens_per_s / 1e3:.1f}K tok/s",
        ]
        if mfu is not None:
            parts.append(f"mfu {100 * mfu:.1f}%")
        eta = format_eta(seconds_per_step * (self.total - step)) if seconds_per_step else "--"
        parts.append(f"eta {eta}")
        return " | ".join(parts)

    def update(self, **fields) -> None:
        if not self.enabled:
            return
        line = self.format(**fields)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, *, step: int, stopped_by: str | None = None) -> None:
        if not self.enabled:
            return
        elapsed = format_eta(time.perf_counter() - self.start)
        why = f" (stopped by {stopped_by})" if stopped_by else ""
        self.stream.write(
            ("\n" if self.tty else "") + f"done: step {step}/{self.total} in {elapsed}{why}\n"
        )
        self.stream.flush()
