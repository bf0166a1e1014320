"""`cluster:` section of a recipe: how `hybrid submit` asks Slurm for resources and starts a run.

Example::

    cluster:
      partition: gpu
      account: my-project
      time: "2-00:00:00"          # Slurm time: MIN, MIN:SEC, H:M:S, D-H, D-H:M, D-H:M:S
      nodes: 4
      gpus_per_node: 8            # one process per GPU unless procs_per_node says otherwise
      cpus_per_task: 64           # CPUs of the one task per node (it runs the launcher)
      launcher: torchrun          # torchrun | deepspeed: what starts the processes of a node
      modules: [cuda/12.4]        # `module load` each (names are shell-quoted)
      venv: ~/envs/hybrid         # `source VENV/bin/activate` (a literal path, quoted)
      setup: ["ulimit -n 65536"]  # shell lines run as written, after modules and venv
      env: {NCCL_DEBUG: WARN}     # exported, values quoted literally (no $VAR expansion)
      signal_seconds: 300         # SIGUSR1 this long before the time limit: checkpoint, requeue
      sbatch_options: ["--exclusive", "--constraint=h100"]

Every value except `setup` is validated here and shell-quoted where the script uses it, so a
recipe value cannot run a command. `setup` lines are shell code on purpose (the user's own
environment hooks); they are written as they are, one line each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from hybrid.recipe.schema import ConfigError, check

Launcher = Literal["torchrun", "deepspeed"]

# Slurm names (partition, account, qos; a comma separates alternatives) and job names.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*", re.ASCII)
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}", re.ASCII)
_MEM = re.compile(r"\d+[KMGT]?", re.ASCII)
_MODULE = re.compile(r"[A-Za-z0-9_.+/@:-]+", re.ASCII)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# A long option with an optional value of characters that mean nothing special to sbatch's
# `#SBATCH` parser (no whitespace, quotes, backslash, `$`, backtick or `#`).
_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.,:=@%/+*&|!<>\[\]-]+)?", re.ASCII)
_TIME = re.compile(
    r"(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?)"
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?",
    re.ASCII,
)
UNLIMITED_TIMES = ("UNLIMITED", "INFINITE", "infinite", "unlimited")

# sbatch options that `hybrid submit` writes itself, with the key to set instead.
MANAGED_OPTIONS = {
    "--job-name": "cluster.job_name",
    "--nodes": "cluster.nodes",
    "--ntasks": "(one task per node is fixed)",
    "--ntasks-per-node": "(one task per node is fixed)",
    "--gpus-per-node": "cluster.gpus_per_node",
    "--cpus-per-task": "cluster.cpus_per_task",
    "--mem": "cluster.mem",
    "--time": "cluster.time",
    "--partition": "cluster.partition",
    "--account": "cluster.account",
    "--qos": "cluster.qos",
    "--output": "(logs go to RUN_DIR/logs)",
    "--error": "(logs go to RUN_DIR/logs)",
    "--open-mode": "(append, so a requeued job keeps its log)",
    "--signal": "cluster.signal_seconds",
    "--requeue": "cluster.requeue",
    "--no-requeue": "cluster.requeue",
    "--array": "hybrid submit --sweep",
}


def parse_slurm_time(text: str) -> int | None:
    """Seconds of a Slurm time limit (`MIN`, `MIN:SEC`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`);
    None for UNLIMITED / INFINITE. Raises ConfigError for anything else or for zero."""
    text = str(text).strip()
    if text in UNLIMITED_TIMES:
        return None
    m = _TIME.fullmatch(text)
    if not m:
        raise ConfigError(
            f"{text!r} is not a Slurm time; use MINUTES, H:MM:SS or D-HH:MM:SS (e.g. 2-00:00:00)"
        )
    if m["days"] is not None:
        parts = [int(m["days"]) * 24 + int(m["dh"]), int(m["dm"] or 0), int(m["ds"] or 0)]
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif m["c"] is not None:
        seconds = int(m["a"]) * 3600 + int(m["b"]) * 60 + int(m["c"])
    else:
        seconds = int(m["a"]) * 60 + int(m["b"] or 0)
    if seconds <= 0:
        raise ConfigError(f"{text!r} is a time limit of zero; give a positive duration")
    return seconds


def check_job_name(name: str, key: str) -> str:
    """`name` if it is a usable Slurm job name, else a ConfigError on `key`."""
    if not _JOB_NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} is not a usable Slurm job name (up to 128 letters, digits and _.+-, "
            "starting with a letter or digit); set cluster.job_name",
            key=key,
        )
    return name


def check_sbatch_option(option: str, key: str) -> None:
    """An extra option must be `--name` or `--name=value` (no spaces, quotes or `$`) and must not
    be one that `hybrid submit` sets itself."""
    if not isinstance(option, str) or not _OPTION.fullmatch(option):
        raise ConfigError(
            f"{option!r} is not a long option --name or --name=value made of letters, digits "
            "and ._,:=@%/+*&|!<>[]- (no spaces, quotes or $; use the --name=value form)",
            key=key,
        )
    name = option.split("=", 1)[0]
    if name in MANAGED_OPTIONS:
        raise ConfigError(
            f"{name} is written by hybrid submit; set {MANAGED_OPTIONS[name]}", key=key
        )


@dataclass(kw_only=True)
class ClusterConfig:
    """Slurm resources and job set-up (see the module docstring for an example).

    nodes: nodes of the job; one Slurm task per node runs the `launcher`, which starts
    `procs_per_node` training processes (default: `gpus_per_node`, or 1 on CPU nodes).
    job_name: default the recipe name. python: the interpreter the job runs (default:
    VENV/bin/python when `venv` is set, else the interpreter of `hybrid submit`). master_port: the
    rendezvous port on the first node (default 20000 + job id % 40000). signal_seconds: SIGUSR1
    this many seconds before the time limit (null: none); the trainer checkpoints and stops, and
    with `requeue` the job requeues itself (at most `max_requeues` times) and resumes from
    `latest`. template: a custom sbatch template (default: slurm/job.sbatch of this repository).
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    job_name: str | None = None
    launcher: Launcher = "torchrun"
    python: str | None = None
    master_port: int | None = None
    modules: list[str] = field(default_factory=list)
    venv: str | None = None
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    signal_seconds: int | None = 300
    requeue: bool = True
    max_requeues: int = 20
    sbatch_options: list[str] = field(default_factory=list)
    srun_options: list[str] = field(default_factory=list)
    template: str | None = None

    def __post_init__(self) -> None:
        self._check_names()
        self._check_counts()
        self._check_time()
        self._check_shell_values()
        for i, option in enumerate(self.sbatch_options):
            check_sbatch_option(option, f"sbatch_options[{i}]")
        for i, option in enumerate(self.srun_options):
            check(
                isinstance(option, str) and bool(_OPTION.fullmatch(option)),
                f"srun_options[{i}]",
                f"{option!r} is not a long option --name or --name=value (no spaces, quotes or $)",
            )

    def _check_names(self) -> None:
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            check(
                value is None or bool(_SLURM_NAME.fullmatch(value)),
                name,
                f"{value!r} is not a Slurm name (letters, digits and _.+-, commas between "
                "alternatives)",
            )
        if self.job_name is not None:
            check_job_name(self.job_name, "job_name")
        check(
            self.mem is None or bool(_MEM.fullmatch(self.mem)),
            "mem",
            f"{self.mem!r} is not a Slurm memory size (e.g. 64G, 500M, or 0 for all)",
        )

    def _check_counts(self) -> None:
        check(self.nodes >= 1, "nodes", "must be at least 1")
        check(self.gpus_per_node >= 0, "gpus_per_node", "must be >= 0 (0: CPU nodes)")
        for name in ("procs_per_node", "cpus_per_task"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, "must be at least 1 (or null)")
        check(self.max_requeues >= 0, "max_requeues", "must be >= 0")
        port = self.master_port
        check(port is None or 1024 <= port <= 65535, "master_port", "must be in 1024..65535")
        sig = self.signal_seconds
        check(sig is None or 1 <= sig <= 65535, "signal_seconds", "must be in 1..65535 (or null)")

    def _check_time(self) -> None:
        if self.time is None:
            return
        try:
            limit = parse_slurm_time(self.time)
        except ConfigError as err:
            raise ConfigError(err.message, key="time") from None
        sig = self.signal_seconds
        if limit is not None and sig is not None and sig >= limit:
            raise ConfigError(
                f"signal_seconds={sig} is not shorter than the time limit {self.time} "
                f"({limit} s); lower signal_seconds or raise time",
                key="signal_seconds",
            )

    def _check_shell_values(self) -> None:
        for i, module in enumerate(self.modules):
            check(
                bool(_MODULE.fullmatch(module)),
                f"modules[{i}]",
                f"{module!r} is not a module name (letters, digits and _.+/@:-)",
            )
        for i, line in enumerate(self.setup):
            check(
                "\n" not in line and "\r" not in line and "\0" not in line,
                f"setup[{i}]",
                "one shell line per list item (no line breaks)",
            )
        for name, value in self.env.items():
            check(
                bool(_ENV_NAME.fullmatch(name)) and not name.startswith(("HYBRID_", "SLURM_")),
                f"env.{name}",
                "not a usable variable name (letters, digits, _; HYBRID_* and SLURM_* are "
                "reserved)",
            )
            check("\0" not in value, f"env.{name}", "must not contain a NUL character")
        for name in ("venv", "python", "template"):
            value = getattr(self, name)
            check(
                value is None or (value.strip() != "" and "\0" not in value and "\n" not in value),
                name,
                "must be a non-empty path on one line",
            )

    @property
    def time_seconds(self) -> int | None:
        """The time limit in seconds (None: no limit set, or UNLIMITED)."""
        return None if self.time is None else parse_slurm_time(self.time)

    @property
    def processes_per_node(self) -> int:
        """Training processes per node: `procs_per_node`, else one per GPU, else 1."""
        return self.procs_per_node or self.gpus_per_node or 1
