"""The rendered sbatch script: its #SBATCH lines, `bash -n` for every launcher, and a run of the
script itself with stand-in `srun` / `scontrol` / Python executables (no Slurm needed) that
record what they receive: hostile values arrive byte for byte as data and never run."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid.launch.launchers import LAUNCHERS
from hybrid.launch.render import JobSpec, JobTask, render_script
from hybrid.launch.requeue import KILLED_BY_USR1
from hybrid.recipe.recipe import recipe_from_dict
from hybrid.recipe.schema import ConfigError

HOSTILE = [
    "$(touch PWNED1)",
    "`touch PWNED2`",
    "'; touch PWNED3; echo '",
    '"; touch PWNED4; echo "',
    "a\nb; touch PWNED5",
    "\\$HOME * ? ~ ! # %j {{exports}}",
]


def cluster(**values):
    return recipe_from_dict({"cluster": values}).cluster


def spec(tmp_path, n_tasks=1, python="python3", **values) -> JobSpec:
    tasks = tuple(
        JobTask(run_dir=tmp_path / f"run{i}", recipe_path=tmp_path / f"run{i}" / "recipe.yaml")
        for i in range(n_tasks)
    )
    log = tmp_path / "logs" / ("slurm-%A_%a.out" if n_tasks > 1 else "slurm-%j.out")
    return JobSpec(
        cluster=cluster(**values),
        job_name="tiny",
        tasks=tasks,
        log=log,
        python=python,
        array=n_tasks > 1,
    )


def sbatch_options(script: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_sbatch_lines(tmp_path):
    s = spec(
        tmp_path,
        nodes=4,
        gpus_per_node=8,
        cpus_per_task=64,
        mem="0",
        time="2-00:00:00",
        partition="gpu",
        account="proj",
        qos="high",
        signal_seconds=600,
        sbatch_options=["--exclusive", "--constraint=h100"],
    )
    assert sbatch_options(render_script(s)) == [
        "--job-name=tiny",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",
        "--mem=0",
        "--time=2-00:00:00",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        f"--output={tmp_path}/logs/slurm-%j.out",
        "--open-mode=append",
        "--signal=B:USR1@600",
        "--requeue",
        "--exclusive",
        "--constraint=h100",
    ]
    opts = sbatch_options(render_script(spec(tmp_path, 3, signal_seconds=None, requeue=False)))
    assert "--array=0-2" in opts and "--no-requeue" in opts
    assert not any(o.startswith(("--signal", "--gpus", "--time")) for o in opts)


def test_sbatch_lines_come_before_any_command(tmp_path):
    lines = render_script(spec(tmp_path)).splitlines()
    last_sbatch = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(line.startswith("#") for line in lines[: last_sbatch + 1])


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_bash_syntax(tmp_path, launcher):
    s = spec(
        tmp_path,
        2,
        launcher=launcher,
        modules=["cuda/12.4"],
        venv=str(tmp_path / "venv"),
        setup=["ulimit -n 4096 || true"],
        env={"NCCL_DEBUG": "WARN"},
        srun_options=["--cpu-bind=none"],
    )
    path = tmp_path / "job.sbatch"
    path.write_text(render_script(s))
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_unsafe_run_dir_is_refused(tmp_path):
    s = spec(tmp_path / "my runs")
    with pytest.raises(ConfigError, match="cannot use the character"):
        render_script(s)


def test_custom_template(tmp_path):
    template = tmp_path / "t.sbatch"
    template.write_text("#!/bin/bash\n{{sbatch_options}}\n{{ exports }}\necho {{launcher}}\n")
    text = render_script(spec(tmp_path, template=str(template)))
    assert "#SBATCH --job-name=tiny" in text and "export HYBRID_PROCS_PER_NODE=1" in text
    assert text.endswith("echo torchrun\n")
    template.write_text("{{exports}} {{partition}}\n")
    with pytest.raises(ConfigError, match="unknown field.*partition"):
        render_script(spec(tmp_path, template=str(template)))
    with pytest.raises(ConfigError, match="cannot read the sbatch template"):
        render_script(spec(tmp_path, template=str(tmp_path / "missing")))


# ---------------------------------------------------------------- running the rendered script

RECORDER = """#!/bin/bash
# stand-in interpreter: the requeue helper runs for real, anything else records argv and env
if [[ $1 == -m && $2 == hybrid.launch.requeue ]]; then exec {python} "$@"; fi
exec {python} -c '
import json, os, signal, sys
ignored = signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
record = {{"argv": sys.argv[1:], "env": dict(os.environ), "usr1_ignored": ignored}}
json.dump(record, open(os.environ["RECORD_DIR"] + "/python.json", "w"))
sys.exit(int(os.environ.get("FAKE_STATUS", "0")))
' "$@"
"""
SRUN = """#!/bin/bash
printf '%s\\n' "$@" >"$RECORD_DIR/srun.args"
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then tr ',' '\\n' <<<"$FAKE_HOSTS"; exit 0; fi
echo "$*" >>"$RECORD_DIR/scontrol.log"
"""
MODULE = """#!/bin/bash
echo "$*" >>"$RECORD_DIR/module.log"
"""


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def stand_ins(tmp_path):
    """bin/ with srun, scontrol, module; a recording interpreter under a hostile directory."""
    bindir = tmp_path / "bin"
    executable(bindir / "srun", SRUN)
    executable(bindir / "scontrol", SCONTROL)
    executable(bindir / "module", MODULE)
    python = tmp_path / "py $(touch PWNED0) ';x" / "python"
    executable(python, RECORDER.format(python=sys.executable))
    records = tmp_path / "records"
    records.mkdir()
    return bindir, python, records


def run_script(tmp_path, stand_ins, s: JobSpec, **env) -> tuple[subprocess.CompletedProcess, dict]:
    bindir, _, records = stand_ins
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(s))
    base = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "node1",
        "FAKE_HOSTS": "node1",
        "RECORD_DIR": str(records),
        "TMPDIR": str(tmp_path),
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(script)], env={**base, **env}, cwd=tmp_path, capture_output=True, text=True
    )
    record = records / "python.json"
    return done, json.loads(record.read_text()) if record.exists() else {}


def assert_nothing_injected(tmp_path):
    assert not [p for p in tmp_path.rglob("PWNED*") if p.is_file()], "a value ran as a command"


def test_script_runs_torchrun_with_values_as_data(tmp_path, stand_ins):
    _, python, records = stand_ins
    venv = tmp_path / "venv $(touch PWNED6)"
    executable(venv / "bin" / "activate", "export VENV_ACTIVE=1\n")
    env = {f"HOSTILE_{i}": v for i, v in enumerate(HOSTILE)}
    s = spec(
        tmp_path,
        python=str(python),
        procs_per_node=2,
        modules=["cuda/12.4"],
        venv=str(venv),
        setup=["export FROM_SETUP=yes"],
        env=env,
    )
    done, rec = run_script(tmp_path, stand_ins, s)
    assert done.returncode == 0, done.stdout + done.stderr
    task = s.tasks[0]
    assert rec["argv"] == [
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=node1:{20000 + 4242}",
        "--rdzv-id=4242",
        "--max-restarts=0",
        "-m",
        "hybrid.cli",
        "train",
        str(task.recipe_path),
        "--run-dir",
        str(task.run_dir),
    ]
    for name, value in env.items():
        assert rec["env"][name] == value
    assert rec["env"]["VENV_ACTIVE"] == "1" and rec["env"]["FROM_SETUP"] == "yes"
    assert rec["env"]["MASTER_ADDR"] == "node1" and rec["env"]["MASTER_PORT"] == "24242"
    assert rec["usr1_ignored"], "the launcher must start with SIGUSR1 ignored"
    assert (records / "module.log").read_text() == "load cuda/12.4\n"
    assert not (records / "scontrol.log").exists()  # no signal: no requeue
    assert "--ntasks-per-node=1" in (records / "srun.args").read_text().split()
    assert_nothing_injected(tmp_path)


def test_script_passes_the_training_status_on(tmp_path, stand_ins):
    _, python, records = stand_ins
    done, _ = run_script(tmp_path, stand_ins, spec(tmp_path, python=str(python)), FAKE_STATUS="3")
    assert done.returncode == 3
    assert not (records / "scontrol.log").exists()


def test_array_task_picks_its_run(tmp_path, stand_ins):
    _, python, _ = stand_ins
    s = spec(tmp_path, 3, python=str(python))
    done, rec = run_script(tmp_path, stand_ins, s, SLURM_ARRAY_TASK_ID="2")
    assert done.returncode == 0, done.stderr
    assert rec["argv"][-3:] == [str(s.tasks[2].recipe_path), "--run-dir", str(s.tasks[2].run_dir)]
    assert rec["env"]["HYBRID_RUN_DIR"] == str(s.tasks[2].run_dir)


def test_deepspeed_launcher_command(tmp_path, stand_ins):
    _, python, _ = stand_ins
    s = spec(tmp_path, python=str(python), launcher="deepspeed", nodes=2, gpus_per_node=4)
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "FAKE_HOSTS": "gpu7,gpu9"}
    done, rec = run_script(tmp_path, stand_ins, s, **env)
    assert done.returncode == 0, done.stderr
    hostfile = tmp_path / "hybrid-hostfile-4242-1"
    assert hostfile.read_text() == "gpu7 slots=4\ngpu9 slots=4\n"
    task = s.tasks[0]
    assert rec["argv"] == [
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        "--no_ssh",
        "--node_rank=1",
        "--num_nodes=2",
        "--num_gpus=4",
        "--master_addr=gpu7",
        f"--master_port={20000 + 4242}",
        "--no_local_rank",
        "--module",
        "hybrid.cli",
        "train",
        str(task.recipe_path),
        "--run-dir",
        str(task.run_dir),
    ]
    assert rec["usr1_ignored"]


def test_killed_by_usr1_status_matches_the_shell():
    # bash reports a child killed by signal N as status 128 + N; the requeue rule relies on it
    done = subprocess.run(["bash", "-c", "bash -c 'kill -USR1 $$'; echo $?"], capture_output=True)
    assert int(done.stdout) == KILLED_BY_USR1
