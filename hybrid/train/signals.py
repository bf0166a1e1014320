"""Preemption signals: SIGTERM / SIGUSR1 only set a flag; the trainer saves and exits cleanly.

Intended use in the training loop (the handler never saves or exits by itself: a signal may
arrive in the middle of an optimizer step, and only the loop knows a consistent moment)::

    with PreemptionHandler() as preempt:
        while step < total_steps:
            train_step(...)
            step += 1
            if preempt.requested:          # e.g. "SIGUSR1"
                log.info("stopped by %s at step %d", preempt.requested, step)
                break
    save_checkpoint(run_dir, step, ...)    # then return normally: exit status 0

On Slurm, `#SBATCH --signal=USR1@120` sends SIGUSR1 two minutes before the time limit (use
`B:USR1@120` when the batch script forwards it), and preemption sends SIGTERM a grace period
before SIGKILL; with `--requeue` the job then resumes from the checkpoint. With several
processes (torchrun), every rank must stop at the same step: agree on the flag with an
all-reduce (any rank set) before acting on it.

Signal handlers can only be installed from the main thread. Used elsewhere, the handler does
nothing (`active` is False, `requested` stays None) and says so in a log warning.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


def _resolve(sig: str | int | signal.Signals) -> signal.Signals:
    if isinstance(sig, str):
        name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
        if not isinstance(getattr(signal, name, None), signal.Signals):
            raise ValueError(f"unknown signal {sig!r} on this platform")
        return signal.Signals(getattr(signal, name))
    try:
        return signal.Signals(sig)
    except ValueError:
        raise ValueError(f"unknown signal number {sig!r}") from None


class PreemptionHandler:
    """Context manager: while inside, the given signals set `requested` to the signal's name.

    `requested` keeps the first signal received (the reason to stop); later ones are ignored.
    On exit the previous handlers are restored.
    """

    def __init__(self, signals: Iterable[str | int | signal.Signals] = DEFAULT_SIGNALS) -> None:
        self.signals: tuple[signal.Signals, ...] = tuple(_resolve(s) for s in signals)
        self.requested: str | None = None
        self.active = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set the flag: this runs between two bytecodes of whatever the loop was doing.
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def __enter__(self) -> PreemptionHandler:
        if self.active:
            raise RuntimeError("PreemptionHandler is already active; it is not reentrant")
        self.requested = None
        if threading.current_thread() is not threading.main_thread():
            names = ", ".join(s.name for s in self.signals)
            log.warning(
                "not in the main thread: %s will not be handled (no checkpoint on it)", names
            )
            return self
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except BaseException:
            self._restore()
            raise
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
        if self.requested is not None:
            log.info("preemption requested by %s", self.requested)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; SIG_DFL is the best guess
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        self.active = False
