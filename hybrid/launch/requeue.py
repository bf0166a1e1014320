"""Should a job that received SIGUSR1 requeue itself? Run by the batch script (slurm/job.sbatch)
once, after srun has ended, never by the training processes:

    python -m hybrid.launch.requeue --run-dir D --recipe R --signal USR1 --srun-status S \
        --max-requeues N

prints one line saying why, and exits 0 when the job should requeue, 1 when it should not. It
requeues only when the training processes stopped cleanly on the signal (srun status 0, or 138 =
killed by SIGUSR1 while still starting, before any step ran) and the run directory's latest
checkpoint is short of train.steps, at most `max_requeues` times (SLURM_RESTART_COUNT).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from hybrid.launch.env import SlurmJob
from hybrid.recipe.recipe import load_recipe
from hybrid.recipe.schema import ConfigError

KILLED_BY_USR1 = 128 + int(signal.SIGUSR1)


@dataclass(frozen=True)
class Decision:
    requeue: bool
    reason: str


def decide(
    *,
    signal_name: str | None,
    srun_status: int,
    checkpoint_step: int | None,
    total_steps: int,
    restarts: int,
    max_requeues: int,
) -> Decision:
    """The requeue rule (see the module docstring); checkpoint_step None: no checkpoint yet."""
    if not signal_name:
        return Decision(False, "no stop signal was received; nothing to requeue")
    if srun_status not in (0, KILLED_BY_USR1):
        return Decision(
            False,
            f"the training exited with status {srun_status} after {signal_name}; not "
            "requeued (see the errors above)",
        )
    step = checkpoint_step or 0
    if step >= total_steps:
        return Decision(False, f"training is complete (step {step} of {total_steps})")
    if restarts >= max_requeues:
        return Decision(
            False,
            f"stopped at step {step} of {total_steps}, but the job was requeued "
            f"{restarts} times already (cluster.max_requeues={max_requeues}); resubmit to resume",
        )
    where = f"checkpoint at step {step}" if checkpoint_step is not None else "no checkpoint yet"
    return Decision(
        True,
        f"{signal_name}: {where} of {total_steps}; requeueing (restart {restarts + 1} of "
        f"at most {max_requeues})",
    )


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run directory's latest complete checkpoint (None: there is none)."""
    from hybrid.checkpoint.store import META_FILE, find_latest  # torch: only when asked

    latest = find_latest(run_dir)
    if latest is None:
        return None
    return int(json.loads((latest / META_FILE).read_text())["step"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid.launch.requeue", description=__doc__)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--recipe", required=True, help="the recipe file the job trains")
    p.add_argument("--signal", default="", help="the signal the batch shell received, if any")
    p.add_argument("--srun-status", required=True, type=int)
    p.add_argument("--max-requeues", required=True, type=int)
    args = p.parse_args(argv)
    job = SlurmJob.from_environ()
    try:
        decision = decide(
            signal_name=args.signal or None,
            srun_status=args.srun_status,
            checkpoint_step=checkpoint_step(args.run_dir),
            total_steps=load_recipe(args.recipe).train.steps,
            restarts=job.restart_count if job else 0,
            max_requeues=args.max_requeues,
        )
    except (ConfigError, OSError, ValueError, KeyError) as err:
        print(f"hybrid: not requeued: cannot read the run's state: {err}", file=sys.stderr)
        return 1
    where = f"{job.describe()}: " if job else ""
    print(f"hybrid: {where}{decision.reason}", flush=True)
    return 0 if decision.requeue else 1


if __name__ == "__main__":
    sys.exit(main())
