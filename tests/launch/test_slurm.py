"""`hybrid submit` on a real Slurm: a one-node cluster on this machine (slurm/local-cluster.sh,
started here when Slurm is installed and not running, stopped again afterwards). Skipped, with
the reason, when Slurm is not installed or the cluster cannot start.

Three jobs run side by side, each a 2-process CPU run of the debug recipe under torchrun:
- A trains 16 steps: checkpoint, metrics.jsonl and TensorBoard events are checked;
- B is the same run, sent `scancel --signal=USR1 --batch` after a few steps: it must checkpoint,
  requeue itself, resume and finish with steps 1..16 logged once each and the same per-step
  losses as A (fp32 on CPU: exact resume; relative difference < 1e-6);
- C is a 2-task job array (--sweep train.seed=1,2) of 2 steps each.
And sbatch refusing a job (an unknown partition) is one error line, exit status 2.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import DEBUG_RECIPE, ROOT

from hybrid.checkpoint.store import find_latest, list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

LOCAL_CLUSTER = ROOT / "slurm" / "local-cluster.sh"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
STEPS = 16
COMMON = [
    "--time",
    "10",
    "--set",
    "cluster.procs_per_node=2",
    "--set",
    "cluster.cpus_per_task=1",
    "--set",
    "data.sources=[{kind: stdlib, max_files: 40}]",
    "--set",
    "data.valid_fraction=0.1",
    "--set",
    "train.log_every=1",
    "--set",
    "train.save_every=0",
    "--set",
    "train.eval_every=8",
    "--set",
    "train.eval_batches=1",
]


def cluster_script(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LOCAL_CLUSTER), command], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment for Slurm commands and jobs: the local cluster's SLURM_CONF, a private data
    cache, one thread per training process."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} not found); install it with "
            "apt-get install -y slurm-wlm munge (as .ci/run does)"
        )
    if os.geteuid() != 0:
        pytest.skip("the local test cluster (slurm/local-cluster.sh) must be started as root")
    started = False
    if cluster_script("status").returncode != 0:
        start = cluster_script("start")
        if start.returncode != 0:
            pytest.skip(f"the local Slurm cluster did not start: {start.stderr.strip()}")
        started = True
    conf = cluster_script("env").stdout.strip().removeprefix("export SLURM_CONF=")
    cache = tmp_path_factory.mktemp("slurm-cache")
    yield {**os.environ, "SLURM_CONF": conf, "HYBRID_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    if started:
        cluster_script("stop")


def submit(env, run_dir: Path, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "hybrid.cli", "submit", str(DEBUG_RECIPE), "--run-dir", str(run_dir)]
        + COMMON
        + list(extra),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"submitted job (\d+)", done.stdout).group(1)


def job_records(env, job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o`: one dict per job (per task of an array)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True
    ).stdout
    return [
        dict(token.split("=", 1) for token in line.split() if "=" in token)
        for line in out.splitlines()
        if line.strip()
    ]


def wait_done(env, job_id: str, timeout: float = 150.0) -> list[dict[str, str]]:
    end = time.time() + timeout
    while time.time() < end:
        records = job_records(env, job_id)
        if records and all(r["JobState"] in DONE_STATES for r in records):
            return records
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job_records(env, job_id)}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def jobs(slurm_env, tmp_path_factory):
    """Submit A, B and C at once (they share the node's two CPUs); cancel leftovers at the end."""
    root = tmp_path_factory.mktemp("slurm-runs")
    steps = f"train.steps={STEPS}"
    ids = {
        "A": submit(slurm_env, root / "a", "--set", steps),
        "B": submit(slurm_env, root / "b", "--set", steps),
        "C": submit(
            slurm_env,
            root / "c",
            "--set",
            "train.steps=2",
            "--set",
            "cluster.procs_per_node=1",
            "--sweep",
            "train.seed=1,2",
        ),
    }
    yield {"root": root, "ids": ids, "env": slurm_env}
    for job_id in ids.values():
        subprocess.run(["scancel", job_id], env=slurm_env, capture_output=True)


def test_usr1_checkpoints_requeues_and_resumes(jobs):
    env, run_dir, job_id = jobs["env"], jobs["root"] / "b", jobs["ids"]["B"]
    end = time.time() + 120
    while len(metrics(run_dir)) < 3:
        assert time.time() < end, "job B logged no steps"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    (record,) = wait_done(env, job_id)
    log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    assert record["Restarts"] == "1", log
    assert "stopped by SIGUSR1" in log and "requeueing (restart 1" in log
    assert "(restart 1) on 1 node(s)" in log and "resumed from" in log
    saved = sorted(int(p.name.removeprefix("step-")) for p in list_checkpoints(run_dir))
    assert len(saved) == 2 and 3 <= saved[0] < STEPS and saved[1] == STEPS, saved
    assert load_checkpoint(find_latest(run_dir)).step == STEPS
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # continuous, nothing lost
    (reference,) = wait_done(env, jobs["ids"]["A"])
    a_rows = metrics(jobs["root"] / "a")
    assert len(a_rows) == STEPS
    for a, b in zip(a_rows, rows):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (a, b)


def test_job_writes_checkpoint_and_tensorboard(jobs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env, run_dir, job_id = jobs["env"], jobs["root"] / "a", jobs["ids"]["A"]
    (record,) = wait_done(env, job_id)
    log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "0", log
    assert f"done: step {STEPS}/{STEPS}" in log
    ckpt = load_checkpoint(find_latest(run_dir))
    assert ckpt.step == STEPS and ckpt.recipe["train"]["steps"] == STEPS
    rows = metrics(run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for e, r in zip(losses, rows):
        assert math.isclose(e.value, r["loss"], rel_tol=1e-6)  # TensorBoard stores float32
    assert [e.step for e in events.Scalars("val/loss")] == [8, 16]
    submitted = list((run_dir / "slurm").glob("*/job.sbatch"))
    assert len(submitted) == 1 and "#SBATCH --signal=B:USR1@300" in submitted[0].read_text()


def test_sweep_runs_as_a_job_array(jobs):
    env, root, job_id = jobs["env"], jobs["root"] / "c", jobs["ids"]["C"]
    records = wait_done(env, job_id)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    for r in records:
        i = r["ArrayTaskId"]
        log = (root / "logs" / f"slurm-{job_id}_{i}.out").read_text()
        assert r["JobState"] == "COMPLETED", log
        run_dir = root / f"{i}-seed={int(i) + 1}"
        ckpt = load_checkpoint(find_latest(run_dir))
        assert ckpt.step == 2 and ckpt.recipe["train"]["seed"] == int(i) + 1
    first, second = (metrics(root / f"{i}-seed={i + 1}")[0]["loss"] for i in (0, 1))
    assert first != second  # different seeds, different initial weights


def test_sbatch_refusal_is_one_line(slurm_env, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hybrid.cli", "submit", str(DEBUG_RECIPE), "--partition", "nope"]
        + ["--run-dir", str(tmp_path / "run")],
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("hybrid submit: error:")]
    assert "sbatch refused the job" in line and "Invalid partition" in line
    assert "Traceback" not in done.stderr
