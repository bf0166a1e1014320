"""`hybrid submit RECIPE`: train a recipe on a Slurm cluster (sbatch), or a sweep as a job array."""

from __future__ import annotations

import argparse

from hybrid.commands.common import add_recipe_args
from hybrid.launch.submit import Submission, SubmitRequest, submit

HELP = """Submit `hybrid train RECIPE` to Slurm. The job is built from the recipe's `cluster:`
section (partition, account, time, nodes, GPUs, launcher, modules/venv/setup, env, extra sbatch
options; see hybrid/recipe/cluster_config.py), with the flags below taking precedence. The sbatch
script and the resolved recipe are written under the run directory (RUN_DIR/slurm/STAMP/), the
log goes to RUN_DIR/logs/. One srun task per node starts torchrun (or the DeepSpeed launcher,
cluster.launcher: deepspeed) with a c10d rendezvous on the first node. Near the time limit
(cluster.signal_seconds) Slurm sends SIGUSR1: the run checkpoints, the job requeues itself and
resumes from the checkpoint with a continuous step count. A run directory that already holds
checkpoints is resumed."""

EPILOG = """examples:
  hybrid submit recipes/jamba-1to3-moe16.yaml --nodes 4 --gpus-per-node 8 -p gpu -t 2-00:00:00
  hybrid submit recipes/debug/hybrid-tiny.yaml --dry-run
  hybrid submit my.yaml --sweep model.layout.attention_ratio=1:3,1:7,1:15 --time 12:00:00
  hybrid submit my.yaml --set cluster.launcher=deepspeed --set 'cluster.modules=[cuda/12.4]'

try it on one machine (root, Debian's slurm-wlm and munge installed):
  slurm/local-cluster.sh start && export SLURM_CONF=/tmp/hybrid-slurm/slurm.conf
  hybrid submit recipes/debug/hybrid-tiny.yaml --set cluster.procs_per_node=2 --set train.steps=50
"""

# flag -> ClusterConfig field
FLAGS = ("nodes", "gpus_per_node", "partition", "account", "time", "qos")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="train a recipe on Slurm (sbatch; sweeps as job arrays)",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_recipe_args(p)
    p.add_argument("--nodes", "-N", type=int, metavar="N", help="nodes (cluster.nodes)")
    p.add_argument(
        "--gpus-per-node", type=int, metavar="G", help="GPUs per node (cluster.gpus_per_node)"
    )
    p.add_argument("--partition", "-p", metavar="P", help="partition (cluster.partition)")
    p.add_argument("--account", "-A", metavar="A", help="account (cluster.account)")
    p.add_argument(
        "--time", "-t", metavar="T", help="time limit, e.g. 12:00:00 or 2-00:00:00 (cluster.time)"
    )
    p.add_argument("--qos", "-q", metavar="Q", help="quality of service (cluster.qos)")
    p.add_argument(
        "--sweep",
        dest="sweeps",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="submit a job array with one run per value (repeat for a grid); each run trains in "
        "RUN_DIR/INDEX-KEY=VALUE",
    )
    p.add_argument(
        "--run-dir", default=None, help="where checkpoints and logs go (default: train.run_dir)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch script; write and submit nothing",
    )
    p.set_defaults(func=run)


def report(sub: Submission) -> str:
    """What was submitted, where its script, run directories and logs are."""
    spec = sub.spec
    c = spec.cluster
    runs = f"a job array of {len(spec.tasks)} runs" if spec.array else "1 run"
    lines = [
        f"submitted job {sub.job_id} ({spec.job_name}): {runs} on {c.nodes} node(s) x "
        f"{c.processes_per_node} process(es), launcher {c.launcher}",
        f"  script: {sub.job_dir / 'job.sbatch'}",
    ]
    for i, (task, logfile) in enumerate(zip(spec.tasks, sub.log_paths())):
        values = " ".join(f"{k}={v}" for k, v in sub.combos[i])
        prefix = f"  task {i} ({values}): " if spec.array else "  "
        lines.append(f"{prefix}run dir {task.run_dir}, log {logfile}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name) for name in FLAGS}
    req = SubmitRequest(
        recipe=args.recipe,
        overrides=args.overrides,
        flags=flags,
        sweeps=args.sweeps,
        run_dir=args.run_dir,
        dry_run=args.dry_run,
    )
    sub = submit(req)
    if args.dry_run:
        print(sub.script, end="")
    else:
        print(report(sub))
    return 0
