"""`hybrid submit`: recipe (+ --set, + flags, + --sweep) -> run directories, resolved recipes and
an sbatch script written under the run directory, then `sbatch`.

Layout written for one submission (STAMP = UTC time of the submission)::

    RUN_DIR/slurm/STAMP/job.sbatch       the script given to sbatch
    RUN_DIR/slurm/STAMP/recipe.yaml      the resolved recipe the job trains (sweep: recipe-I.yaml
                                         per task, and sweep.yaml mapping tasks to values/run dirs)
    RUN_DIR/logs/slurm-JOBID.out         the job's log (sweep: slurm-ARRAYID_TASK.out)

A sweep task trains in RUN_DIR/I-KEY=VALUE/. Files of earlier submissions are never touched; a
run directory that holds checkpoints is resumed by the job (as `hybrid train` does), after a
check here that they belong to the same model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from hybrid.launch.render import JobSpec, JobTask, check_safe_path, render_script
from hybrid.launch.sweep import expand, overrides_of, parse_sweep, run_dir_name
from hybrid.recipe.cluster_config import check_job_name
from hybrid.recipe.loader import apply_overrides, load_recipe_dict
from hybrid.recipe.recipe import Recipe, recipe_from_dict
from hybrid.recipe.schema import ConfigError, to_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitRequest:
    """What the user asked for. flags: cluster keys set by command-line flags (they win over the
    recipe and --set), e.g. {"nodes": 2, "partition": "gpu"}."""

    recipe: str
    overrides: Sequence[str] = ()
    flags: Mapping[str, Any] = field(default_factory=dict)
    sweeps: Sequence[str] = ()
    run_dir: str | None = None
    dry_run: bool = False


@dataclass
class Submission:
    """The rendered job. job_dir: where its files go (not written on a dry run); job_id: None
    until submitted."""

    spec: JobSpec
    script: str
    recipes: list[Recipe]
    combos: list[tuple[tuple[str, str], ...]]
    job_dir: Path
    job_id: str | None = None

    def log_paths(self) -> list[Path]:
        """The log file of each task (known once the job id is)."""
        job = self.job_id or "JOBID"
        text = str(self.spec.log)
        if not self.spec.array:
            return [Path(text.replace("%j", job))]
        return [
            Path(text.replace("%A", job).replace("%a", str(i))) for i in range(len(self.combos))
        ]


def load_with_flags(path: str, overrides: Sequence[str], flags: Mapping[str, Any]) -> Recipe:
    """Like `load_recipe`, with `cluster.KEY` flag values applied after the --set overrides; an
    error about a flag's key names the flag."""
    data, provenance = load_recipe_dict(path)
    data = apply_overrides(data, overrides, provenance)
    data.setdefault("name", Path(path).stem)
    cluster = data.setdefault("cluster", {})
    if not isinstance(cluster, dict):
        raise ConfigError("cluster must be a mapping", key="cluster", file=path)
    for key, value in flags.items():
        if value is not None:
            cluster[key] = value
            provenance[f"cluster.{key}"] = "--" + key.replace("_", "-")
    return recipe_from_dict(data, provenance=provenance, file=str(path))


def run_dir_of(recipe: Recipe, override: str | None) -> Path:
    """The absolute run directory, resolved as `hybrid train` does (hybrid.train.loop.
    resolve_run_dir: `{name}` placeholder, `~`), made absolute against the current directory."""
    text = override or recipe.train.run_dir
    try:
        path = Path(text.format(name=recipe.name)).expanduser()
    except (KeyError, IndexError, ValueError):
        raise ConfigError(
            f"run dir {text!r}: only the placeholder {{name}} is known", key="train.run_dir"
        ) from None
    return check_safe_path(path.absolute(), "run dir")


def interpreter(recipe: Recipe) -> str:
    """The Python the job runs: cluster.python, else VENV/bin/python, else this interpreter."""
    c = recipe.cluster
    if c.python:
        return c.python
    if c.venv:
        python = str(Path(c.venv).expanduser() / "bin" / "python")
        log.info("cluster.python not set: the job runs %s (cluster.venv)", python)
        return python
    log.info("cluster.python not set: the job runs %s (the Python of this command)", sys.executable)
    return sys.executable


def check_resumable(recipe: Recipe, run_dir: Path) -> None:
    """A run dir with checkpoints must hold the same model: the job resumes it."""
    if not (run_dir / "checkpoints").exists():
        return
    from hybrid.checkpoint.store import META_FILE, RECIPE_FILE, find_latest  # imports torch

    latest = find_latest(run_dir)
    if latest is None:
        return
    saved = recipe_from_dict(yaml.safe_load((latest / RECIPE_FILE).read_text()))
    if to_dict(saved.model) != to_dict(recipe.model):
        raise ConfigError(
            f"{run_dir} holds checkpoints of a different model; use another --run-dir or the "
            "original recipe (nothing was submitted)"
        )
    step = json.loads((latest / META_FILE).read_text())["step"]
    log.info("%s has a checkpoint at step %s: the job resumes from it", run_dir, step)


def plan(req: SubmitRequest) -> Submission:
    """Load and check everything, render the script; writes nothing."""
    base = load_with_flags(req.recipe, req.overrides, req.flags)
    root = run_dir_of(base, req.run_dir)
    combos = expand([parse_sweep(s) for s in req.sweeps])
    array = bool(req.sweeps)
    job_dir = root / "slurm" / new_stamp(root)
    recipes, tasks = [], []
    for i, combo in enumerate(combos):
        recipe = (
            load_with_flags(req.recipe, [*req.overrides, *overrides_of(combo)], req.flags)
            if combo
            else base
        )
        run_dir = root / run_dir_name(i, combo) if array else root
        recipe.train = dataclasses.replace(recipe.train, run_dir=str(run_dir))
        check_resumable(recipe, run_dir)
        recipes.append(recipe)
        name = f"recipe-{i}.yaml" if array else "recipe.yaml"
        tasks.append(JobTask(run_dir=run_dir, recipe_path=job_dir / name))
    job_name = base.cluster.job_name or check_job_name(base.name, "name")
    spec = JobSpec(
        cluster=base.cluster,
        job_name=job_name,
        tasks=tuple(tasks),
        log=root / "logs" / ("slurm-%A_%a.out" if array else "slurm-%j.out"),
        python=interpreter(base),
        array=array,
    )
    return Submission(spec, render_script(spec), recipes, combos, job_dir)


def write_files(sub: Submission) -> Path:
    """Write recipes, sweep table and script; returns the script's path."""
    try:
        sub.job_dir.mkdir(parents=True, exist_ok=False)
        sub.spec.log.parent.mkdir(parents=True, exist_ok=True)
        for task, recipe in zip(sub.spec.tasks, sub.recipes):
            task.run_dir.mkdir(parents=True, exist_ok=True)
            task.recipe_path.write_text(recipe.to_yaml())
        if sub.spec.array:
            table = [
                {"task": i, "run_dir": str(t.run_dir), "values": dict(combo)}
                for i, (t, combo) in enumerate(zip(sub.spec.tasks, sub.combos))
            ]
            (sub.job_dir / "sweep.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
        script = sub.job_dir / "job.sbatch"
        script.write_text(sub.script)
    except OSError as err:
        raise ConfigError(f"cannot write the job files under {sub.job_dir}: {err}") from None
    return script


def sbatch(script: Path) -> str:
    """Submit `script`; returns the job id. sbatch's refusal is a ConfigError (one line)."""
    done = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
    )
    job_id = done.stdout.strip().split(";")[0]
    if done.returncode != 0 or not job_id.isdigit():
        reason = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ConfigError(f"sbatch refused the job: {reason} (script: {script})")
    return job_id


def new_stamp(root: Path) -> str:
    """A submission directory name not used yet under ROOT/slurm/."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    n = 1
    candidate = stamp
    while (root / "slurm" / candidate).exists():
        n += 1
        candidate = f"{stamp}-{n}"
    return candidate


def submit(req: SubmitRequest) -> Submission:
    """Plan; unless a dry run: check sbatch exists, write the files, submit."""
    if not req.dry_run and shutil.which("sbatch") is None:
        raise ConfigError(
            "sbatch not found: run hybrid submit where Slurm's commands are installed (a login "
            "node), or add --dry-run to print the script"
        )
    sub = plan(req)
    if req.dry_run:
        return sub
    script = write_files(sub)
    sub.job_id = sbatch(script)
    log.info("submitted job %s: %s", sub.job_id, script)
    return sub
