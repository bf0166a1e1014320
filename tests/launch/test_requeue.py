"""The requeue decision of a job stopped by SIGUSR1: the rule itself, and
`python -m hybrid.launch.requeue` on a real run directory (checkpoint written by
save_checkpoint, step read back from it)."""

import subprocess
import sys

import pytest
import torch

from hybrid.checkpoint.store import save_checkpoint
from hybrid.launch.requeue import KILLED_BY_USR1, decide, main


def rule(**kw):
    args = dict(
        signal_name="USR1",
        srun_status=0,
        checkpoint_step=40,
        total_steps=100,
        restarts=0,
        max_requeues=3,
    )
    args.update(kw)
    return decide(**args)


@pytest.mark.parametrize(
    "kw,requeue,words",
    [
        ({}, True, "checkpoint at step 40 of 100"),
        ({"srun_status": KILLED_BY_USR1, "checkpoint_step": None}, True, "no checkpoint yet"),
        ({"signal_name": None}, False, "no stop signal"),
        ({"srun_status": 1}, False, "status 1"),
        ({"checkpoint_step": 100}, False, "complete"),
        ({"restarts": 3}, False, "requeued 3 times"),
        ({"restarts": 2}, True, "restart 3 of at most 3"),
        ({"max_requeues": 0}, False, "max_requeues=0"),
    ],
)
def test_rule(kw, requeue, words):
    d = rule(**kw)
    assert d.requeue is requeue and words in d.reason


@pytest.fixture
def run(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train: {steps: 10}\n")
    run_dir = tmp_path / "run"
    return recipe, run_dir


def save(run_dir, step):
    save_checkpoint(
        run_dir,
        step,
        model_state={"w": torch.zeros(2)},
        train_state={"step": step},
        recipe={"train": {"steps": 10}},
    )


def args(recipe, run_dir, status=0, signal="USR1", max_requeues=5):
    return [
        "--run-dir",
        str(run_dir),
        "--recipe",
        str(recipe),
        "--signal",
        signal,
        "--srun-status",
        str(status),
        "--max-requeues",
        str(max_requeues),
    ]


def test_main_reads_the_run(run, monkeypatch, capsys):
    recipe, run_dir = run
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    save(run_dir, 4)
    assert main(args(recipe, run_dir)) == 0
    out = capsys.readouterr().out
    assert "Slurm job 12, restart 1" in out and "checkpoint at step 4 of 10" in out
    assert main(args(recipe, run_dir, max_requeues=1)) == 1
    save(run_dir, 10)
    assert main(args(recipe, run_dir)) == 1
    assert "complete (step 10 of 10)" in capsys.readouterr().out


def test_main_broken_run_is_not_requeued(run, capsys):
    recipe, run_dir = run
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("garbage")
    assert main(args(recipe, run_dir)) == 1
    assert "not requeued: cannot read the run's state" in capsys.readouterr().err


def test_module_runs_as_a_script(run):
    recipe, run_dir = run
    done = subprocess.run(
        [sys.executable, "-m", "hybrid.launch.requeue", *args(recipe, run_dir)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "no checkpoint yet of 10; requeueing" in done.stdout
