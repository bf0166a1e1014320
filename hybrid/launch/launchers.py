"""What starts the training processes of one node: a registry keyed by `cluster.launcher`.

Each launcher is a shell fragment in `slurm/launchers/NAME.sh`, pasted as the body of
`run_node()` in the batch script and run once per node by srun. A fragment uses only the
variables the script exports: HYBRID_PYTHON, HYBRID_PROCS_PER_NODE, HYBRID_RECIPE,
HYBRID_RUN_DIR, MASTER_ADDR, MASTER_PORT and Slurm's SLURM_JOB_NUM_NODES, SLURM_NODEID,
SLURM_JOB_ID, SLURM_JOB_NODELIST. It must `exec` the launcher (so that srun's signals reach it)
and must not install a SIGUSR1 handler: the launcher inherits "ignore SIGUSR1", only the training
processes act on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from hybrid.recipe.cluster_config import Launcher as LauncherName
from hybrid.recipe.schema import ConfigError

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"


@dataclass(frozen=True)
class Launcher:
    """name: the `cluster.launcher` value; fragment: its file under slurm/launchers/."""

    name: str
    fragment: str
    description: str

    def node_command(self) -> str:
        """The fragment's text (the body of run_node())."""
        path = SLURM_DIR / "launchers" / self.fragment
        if not path.is_file():
            raise ConfigError(
                f"launcher {self.name!r}: {path} is missing; hybrid submit needs the slurm/ "
                "folder of the hybrid repository (install it with pip install -e)"
            )
        return path.read_text().rstrip("\n")


LAUNCHERS: dict[str, Launcher] = {}


def register(launcher: Launcher) -> Launcher:
    LAUNCHERS[launcher.name] = launcher
    return launcher


register(
    Launcher(
        name="torchrun",
        fragment="torchrun.sh",
        description="torchrun per node, c10d rendezvous on the first node",
    )
)
register(
    Launcher(
        name="deepspeed",
        fragment="deepspeed.sh",
        description="the DeepSpeed launcher per node (--no_ssh, node rank from Slurm)",
    )
)

assert set(LAUNCHERS) == set(get_args(LauncherName)), "cluster.launcher and LAUNCHERS disagree"


def get_launcher(name: str) -> Launcher:
    try:
        return LAUNCHERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown launcher {name!r}; known: {', '.join(sorted(LAUNCHERS))}",
            key="cluster.launcher",
        ) from None
