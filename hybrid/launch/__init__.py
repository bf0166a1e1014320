"""Slurm: render and submit sbatch scripts for `hybrid train`, sweeps as job arrays, the requeue
decision of a preempted job, and the SLURM_* environment of a running job.

- `launchers`: which program starts the processes of a node (`cluster.launcher` -> fragment)
- `render`: recipe `cluster:` section + run directories -> sbatch script text (values quoted)
- `sweep`: `--sweep key=v1,v2` specs -> one task per combination (job array)
- `submit`: write script and resolved recipes into the run directory, call `sbatch`
- `requeue`: `python -m hybrid.launch.requeue`, run by the batch script after a SIGUSR1 stop
- `env`: the SLURM_* variables of a running job

The shell lives in `slurm/` of the repository: `job.sbatch` (the template) and `launchers/*.sh`.
"""
