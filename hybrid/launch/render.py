"""Render the sbatch script of a job from the template (slurm/job.sbatch) and a `JobSpec`.

Safety: the template is ours (or the user's own `cluster.template`); what comes from a recipe or
the command line is either checked against a strict pattern before it goes into a `#SBATCH`
line (names, sizes, times, paths: sbatch parses those lines itself, not the shell) or written
with `shlex.quote` into shell code (paths, the interpreter, env values, module names), so no
value can end a line or a quote and run a command. `cluster.setup` lines are the one exception:
they are shell code by design and are written as they are.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from hybrid import __version__
from hybrid.launch.launchers import SLURM_DIR, get_launcher
from hybrid.recipe.cluster_config import ClusterConfig
from hybrid.recipe.schema import ConfigError

DEFAULT_TEMPLATE = SLURM_DIR / "job.sbatch"
FIELDS = (
    "header",
    "sbatch_options",
    "setup",
    "exports",
    "launcher",
    "node_command",
    "srun_options",
    "max_requeues",
)
_FIELD = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")
# Paths that go into #SBATCH lines (the log file): characters sbatch and the shell both leave
# alone. `%` is excluded because sbatch expands %j, %A, ... in file names.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_.,+=@:/~-]*", re.ASCII)


@dataclass(frozen=True)
class JobTask:
    """One training run of the job (one array task of a sweep). Paths are absolute."""

    run_dir: Path
    recipe_path: Path


@dataclass(frozen=True)
class JobSpec:
    """Everything the script needs. log: the `--output` pattern (absolute; %j or %A_%a)."""

    cluster: ClusterConfig
    job_name: str
    tasks: tuple[JobTask, ...]
    log: Path
    python: str
    array: bool = False


def check_safe_path(path: Path, what: str) -> Path:
    """`path` (absolute) if every character is safe in a #SBATCH line; else a ConfigError."""
    text = str(path)
    if not _SAFE_PATH.fullmatch(text):
        bad = sorted({c for c in text if not _SAFE_PATH.fullmatch("/" + c)} - {"/"})
        raise ConfigError(
            f"{what} {text!r}: Slurm job files cannot use the character(s) {''.join(bad)!r}; "
            "use an absolute path of letters, digits and _.,+=@:/~-"
        )
    return path


def sbatch_lines(spec: JobSpec) -> list[str]:
    """The `#SBATCH` lines, in a fixed order; every value was validated by ClusterConfig."""
    c = spec.cluster
    opts = [f"--job-name={spec.job_name}", f"--nodes={c.nodes}", "--ntasks-per-node=1"]
    if c.gpus_per_node:
        opts.append(f"--gpus-per-node={c.gpus_per_node}")
    for name, value in (
        ("cpus-per-task", c.cpus_per_task),
        ("mem", c.mem),
        ("time", c.time),
        ("partition", c.partition),
        ("account", c.account),
        ("qos", c.qos),
    ):
        if value is not None:
            opts.append(f"--{name}={value}")
    check_safe_path(spec.log.parent, "log directory")  # the file name is ours: slurm-%j.out
    opts += [f"--output={spec.log}", "--open-mode=append"]
    if c.signal_seconds is not None:
        opts.append(f"--signal=B:USR1@{c.signal_seconds}")
    opts.append("--requeue" if c.requeue else "--no-requeue")
    if spec.array:
        opts.append(f"--array=0-{len(spec.tasks) - 1}")
    opts += c.sbatch_options
    return [f"#SBATCH {o}" for o in opts]


def setup_lines(c: ClusterConfig) -> list[str]:
    """cluster.modules (quoted), cluster.venv (quoted), then cluster.setup (as written)."""
    lines = [f"module load {shlex.quote(m)}" for m in c.modules]
    if c.venv:
        lines.append(f"source {shlex.quote(str(Path(c.venv).expanduser() / 'bin' / 'activate'))}")
    lines += c.setup
    return lines or ["# (none)"]


def export_lines(spec: JobSpec) -> list[str]:
    """Variables the script and the launcher fragment read; every value shell-quoted."""
    c = spec.cluster
    q = shlex.quote
    lines = [
        f"export HYBRID_PYTHON={q(spec.python)}",
        f"export HYBRID_PROCS_PER_NODE={c.processes_per_node}",
    ]
    if c.master_port is not None:
        lines.append(f"export HYBRID_MASTER_PORT={c.master_port}")
    lines.append("HYBRID_RUN_DIRS=(" + " ".join(q(str(t.run_dir)) for t in spec.tasks) + ")")
    lines.append("HYBRID_RECIPES=(" + " ".join(q(str(t.recipe_path)) for t in spec.tasks) + ")")
    lines += [f"export {name}={q(value)}" for name, value in c.env.items()]
    return lines


def fill_template(text: str, fields: dict[str, str], source: str) -> str:
    """Replace each `{{name}}` of `text` by fields[name] (one pass: inserted text is not
    searched again). An unknown name is a ConfigError naming the template."""
    unknown = sorted({m.group(1) for m in _FIELD.finditer(text)} - set(fields))
    if unknown:
        raise ConfigError(
            f"template {source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}",
            key="cluster.template",
        )
    return _FIELD.sub(lambda m: fields[m.group(1)], text)


def read_template(c: ClusterConfig) -> tuple[str, str]:
    path = Path(c.template).expanduser() if c.template else DEFAULT_TEMPLATE
    try:
        return path.read_text(), str(path)
    except OSError as err:
        raise ConfigError(
            f"cannot read the sbatch template {path}: {err.strerror}", key="cluster.template"
        ) from None


def render_script(spec: JobSpec) -> str:
    """The complete sbatch script of `spec` (text ending in a newline)."""
    if not spec.tasks:
        raise ValueError("a job needs at least one task")
    c = spec.cluster
    launcher = get_launcher(c.launcher)
    for task in spec.tasks:
        check_safe_path(task.run_dir, "run dir")
    kind = f"a job array of {len(spec.tasks)} runs" if spec.array else "one run"
    fields = {
        "header": f"# {spec.job_name}: hybrid train, {kind}, launcher {launcher.name} "
        f"({launcher.description}); written by hybrid submit {__version__}",
        "sbatch_options": "\n".join(sbatch_lines(spec)),
        "setup": "\n".join(setup_lines(c)),
        "exports": "\n".join(export_lines(spec)),
        "launcher": launcher.name,
        "node_command": launcher.node_command(),
        "srun_options": "".join(" " + shlex.quote(o) for o in c.srun_options),
        "max_requeues": str(c.max_requeues if c.requeue else 0),
    }
    text, source = read_template(c)
    return fill_template(text, fields, source).rstrip("\n") + "\n"
