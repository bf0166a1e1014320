"""The environment of a running Slurm job: its SLURM_* variables, read once into a dataclass.

(The training processes' RANK / LOCAL_RANK / WORLD_SIZE come from the launcher and are read by
the parallel backend, `hybrid.parallel`.)"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class SlurmJob:
    """A Slurm job as its processes see it. restart_count: how often it was requeued (0 first)."""

    job_id: int
    restart_count: int
    num_nodes: int
    node_id: int
    nodelist: str
    array_job_id: int | None = None
    array_task_id: int | None = None
    cpus_per_task: int | None = None

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> SlurmJob | None:
        """The job of this process, or None outside a Slurm job (no SLURM_JOB_ID)."""
        env = os.environ if env is None else env
        job_id = _int(env, "SLURM_JOB_ID")
        if job_id is None:
            return None
        return cls(
            job_id=job_id,
            restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
            num_nodes=_int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", 1)),
            node_id=_int(env, "SLURM_NODEID", 0),
            nodelist=env.get("SLURM_JOB_NODELIST", ""),
            array_job_id=_int(env, "SLURM_ARRAY_JOB_ID"),
            array_task_id=_int(env, "SLURM_ARRAY_TASK_ID"),
            cpus_per_task=_int(env, "SLURM_CPUS_PER_TASK"),
        )

    def describe(self) -> str:
        job = str(self.job_id)
        if self.array_job_id is not None and self.array_task_id is not None:
            job = f"{self.array_job_id}_{self.array_task_id} ({self.job_id})"
        return f"Slurm job {job}, restart {self.restart_count}, {self.num_nodes} node(s)"
