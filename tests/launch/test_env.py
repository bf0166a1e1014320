"""SlurmJob read from SLURM_* variables."""

import pytest

from hybrid.launch.env import SlurmJob


def test_outside_slurm():
    assert SlurmJob.from_environ({"PATH": "/bin"}) is None


def test_array_task_after_a_requeue():
    job = SlurmJob.from_environ(
        {
            "SLURM_JOB_ID": "1043",
            "SLURM_RESTART_COUNT": "2",
            "SLURM_JOB_NUM_NODES": "4",
            "SLURM_NODEID": "3",
            "SLURM_JOB_NODELIST": "gpu[01-04]",
            "SLURM_ARRAY_JOB_ID": "1040",
            "SLURM_ARRAY_TASK_ID": "3",
            "SLURM_CPUS_PER_TASK": "32",
        }
    )
    assert job == SlurmJob(
        job_id=1043,
        restart_count=2,
        num_nodes=4,
        node_id=3,
        nodelist="gpu[01-04]",
        array_job_id=1040,
        array_task_id=3,
        cpus_per_task=32,
    )
    assert job.describe() == "Slurm job 1040_3 (1043), restart 2, 4 node(s)"


def test_first_run_defaults_and_bad_values():
    job = SlurmJob.from_environ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2"})
    assert (job.restart_count, job.num_nodes, job.node_id, job.array_task_id) == (0, 2, 0, None)
    with pytest.raises(ValueError, match="SLURM_RESTART_COUNT"):
        SlurmJob.from_environ({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "x"})
