"""Preemption at the trainer level, in real subprocesses of `hybrid train`:
SIGUSR1 / SIGTERM save a checkpoint and exit 0; SIGKILL during a save (at every phase of it)
leaves the previous `latest` loadable, and the run resumes to its full step count."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hybrid.checkpoint.store import find_latest, load_checkpoint


def start(recipe_file, run_dir, *extra, env=None):
    cmd = [
        sys.executable,
        "-m",
        "hybrid.cli",
        "train",
        str(recipe_file),
        "--run-dir",
        str(run_dir),
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_for(predicate, proc, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def steps_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_and_exits_cleanly_then_resumes(tiny_recipe_file, tmp_path, sig):
    run = tmp_path / "run"
    proc = start(tiny_recipe_file, run, "--set", "train.steps=400", "--set", "train.save_every=0")
    wait_for(lambda: len(steps_logged(run)) >= 3, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"stopped by {sig.name}" in out
    stopped = load_checkpoint(run).step
    assert stopped == max(steps_logged(run)) and 3 <= stopped < 400
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid.cli",
            "train",
            str(tiny_recipe_file),
            "--run-dir",
            str(run),
            "--set",
            "train.steps=400",
            "--set",
            "train.save_every=0",
            "--stop-at-step",
            str(stopped + 2),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert steps_logged(run) == list(range(1, stopped + 3))  # continuous, nothing lost
    assert load_checkpoint(run).step == stopped + 2


@pytest.mark.parametrize("phase", ["after_tmp_write", "before_latest", "after_latest"])
def test_sigkill_during_save_keeps_previous_checkpoint(tiny_recipe_file, tmp_path, phase):
    run = tmp_path / "run"
    # saves at steps 2, 4, ...; the hook sleeps inside the save of step 4 at `phase`
    proc = start(tiny_recipe_file, run, env={"HYBRID_CKPT_TEST_PAUSE": f"{phase}@4:60"})
    ckpts = run / "checkpoints"
    if phase == "after_tmp_write":
        wait_for(
            lambda: (ckpts / "latest").exists() and list(ckpts.glob(".tmp-step-00000004*")), proc
        )
    elif phase == "before_latest":
        wait_for(lambda: (ckpts / "step-00000004").exists(), proc)
    else:
        wait_for(
            lambda: (ckpts / "latest").exists() and "00000004" in (ckpts / "latest").read_text(),
            proc,
        )
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    expected = 4 if phase == "after_latest" else 2
    latest = find_latest(run)
    assert load_checkpoint(latest).step == expected
    # the run resumes from there and finishes
    done = subprocess.run(
        [sys.executable, "-m", "hybrid.cli", "train", str(tiny_recipe_file), "--run-dir", str(run)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert load_checkpoint(run).step == 8
    assert not list(ckpts.glob(".tmp-*"))
