"""Data parallel under torchrun (2 CPU processes, gloo) trains the same model as one process
with the same global batch: per-step losses agree (relative difference < 1e-5, fp32)."""

import json
import os
import subprocess
import sys

import pytest


def losses(run_dir):
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tiny_recipe_file, tmp_path):
    common = [str(tiny_recipe_file), "--set", "train.steps=5", "--set", "train.save_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "hybrid.cli", "train", *common, "--run-dir", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--standalone",
            "-m",
            "hybrid.cli",
            "train",
            *common,
            "--run-dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x - y) / abs(x) < 1e-5
    assert (tmp_path / "two" / "checkpoints" / "latest").exists()
