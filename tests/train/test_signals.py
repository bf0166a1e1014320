"""PreemptionHandler: signals set the flag with their name, previous handlers come back, other
threads are refused with a warning, and the intended loop saves and exits 0 on SIGTERM."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from hybrid.train.signals import PreemptionHandler

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def wait_for_flag(handler, timeout=5.0):
    end = time.time() + timeout
    while handler.requested is None and time.time() < end:
        time.sleep(0.01)
    return handler.requested


def sentinel(signum, frame):  # a previous handler that must come back
    raise AssertionError("the sentinel handler must not run inside the context")


@pytest.fixture
def saved_handlers():
    sigs = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    before = {s: signal.getsignal(s) for s in sigs}
    yield
    for s, h in before.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_and_handlers_are_restored(saved_handlers, sig):
    signal.signal(signal.SIGTERM, sentinel)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with PreemptionHandler() as handler:
        assert handler.active and handler.requested is None
        os.kill(os.getpid(), sig)
        assert wait_for_flag(handler) == sig.name
        os.kill(os.getpid(), signal.SIGUSR1 if sig == signal.SIGTERM else signal.SIGTERM)
        time.sleep(0.05)
        assert handler.requested == sig.name  # the first signal is the reason to stop
    assert not handler.active
    assert signal.getsignal(signal.SIGTERM) is sentinel
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_configurable_signals(saved_handlers):
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler(signals=["usr2", "SIGUSR1"]) as handler:
        assert signal.getsignal(signal.SIGTERM) == before  # not ours to touch
        signal.raise_signal(signal.SIGUSR2)
        assert wait_for_flag(handler) == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    with pytest.raises(ValueError, match="unknown signal"):
        PreemptionHandler(signals=["SIGNOPE"])
    handler = PreemptionHandler()
    with handler, pytest.raises(RuntimeError, match="reentrant"):
        handler.__enter__()


def test_outside_the_main_thread_it_does_nothing_and_warns(saved_handlers, caplog):
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def body():
        with PreemptionHandler() as handler:
            seen["active"] = handler.active
            seen["handler"] = signal.getsignal(signal.SIGTERM)

    with caplog.at_level(logging.WARNING, logger="hybrid.train.signals"):
        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
    assert seen == {"active": False, "handler": before}
    assert "not in the main thread" in caplog.text


LOOP = """
import sys, time, torch
from hybrid.checkpoint.store import save_checkpoint
from hybrid.train.signals import PreemptionHandler
run_dir, step = sys.argv[1], 0
with PreemptionHandler() as preempt:
    while step < 100000:
        time.sleep(0.01)  # a training step
        step += 1
        if step == 3:
            print("RUNNING", flush=True)
        if preempt.requested:
            print("stopped by", preempt.requested, "at step", step, flush=True)
            break
save_checkpoint(run_dir, step, model_state={"w": torch.ones(2)}, train_state={"step": step},
                recipe={})
"""


def test_intended_loop_saves_and_exits_zero_on_sigterm(tmp_path):
    from hybrid.checkpoint.store import load_checkpoint

    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(LOOP), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "RUNNING"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    step = int(out.split("at step")[1])
    assert "stopped by SIGTERM" in out and load_checkpoint(tmp_path).step == step
