"""Preemption signals: SIGTERM / SIGUSR1 set a flag; the trainer saves and exits cleanly.

    with PreemptionHandler() as preempt:
        for step in ...:
            train_step(...)
            if preempt.requested:   # e.g. "SIGUSR1"
                save_checkpoint(...); break

Slurm sends SIGUSR1 ahead of the time limit with `#SBATCH --signal=USR1@120` (and SIGTERM on
preemption); the job then requeues and resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class PreemptionHandler:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name
        log.warning("received %s: will save a checkpoint and stop after this step", self.requested)

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: preemption signals are not handled")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
